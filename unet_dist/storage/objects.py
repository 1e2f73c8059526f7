"""The object-store backend: one class over a ``pyarrow.fs`` filesystem for S3, GCS and Azure.

What differs between the stores (the filesystem's settings, where credentials come from, how their
SDKs word an error) lives in :mod:`.s3`, :mod:`.gcs` and :mod:`.azure`; everything else is here:

- **Atomic objects.** A file is written by one upload (a single PUT, or a multipart / resumable /
  block upload that the store makes visible only when it is committed), so a reader sees the whole
  object or none. A group of objects is marked complete by writing its marker (``manifest.json``,
  ``meta.json``) last.
- **Counted retries** around every request (:mod:`.retry`); the SDKs' own retries are turned down.
- **Resumable reads.** A read is a series of ranged GETs (4 MiB each); one cut by the network is
  retried at the offset it was reading, so a long shard is never fetched from the start again.
- **One-line errors** for a missing bucket, missing credentials, denied access and an endpoint that
  does not answer, checked once per bucket and process before the first request.
- pyarrow keeps an empty ``prefix/`` marker object when a delete empties a "folder" (S3, Azure
  without a hierarchical namespace); :meth:`listdir` never lists it.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
from pathlib import Path

from unet_dist.errors import UnetDistError
from unet_dist.storage import retry

READ_CHUNK = 4 << 20  # bytes per ranged GET (and the read buffer)


class ObjectStore:
    """The operations of :class:`~unet_dist.storage.Location` on one store (a scheme and, for
    Azure, an account), with this process's filesystem objects (a forked process makes its own)."""

    def __init__(self, scheme_module, account: str = ""):
        self.s, self.account = scheme_module, account
        self._lock = threading.Lock()
        self._fs: tuple[int, object] | None = None
        self._checked: set[str] = set()

    # ------------------------------------------------------------------ plumbing
    @property
    def fs(self):
        with self._lock:
            if self._fs is None or self._fs[0] != os.getpid():
                self._fs = (os.getpid(), self.s.filesystem(self.account, sdk_attempts=1))
            return self._fs[1]

    def attempts(self) -> int:
        return retry.attempts(self.s.ATTEMPTS_VARS)

    def endpoint(self) -> str:
        return self.s.endpoint(self.account)

    @staticmethod
    def path(loc) -> str:
        return f"{loc.bucket}/{loc.key}" if loc.key else loc.bucket

    def explain(self, loc, e: BaseException, attempts: int) -> Exception:
        """One line for the user, naming the URL and what to do."""
        text, first = str(e), retry.first_line(e)
        if isinstance(e, UnetDistError):
            return e
        if any(s in text for s in self.s.NO_CREDENTIALS):
            return UnetDistError(f"{loc.url}: no {self.s.NAME} credentials found or accepted ({first[:200]})")
        if any(s in text for s in self.s.NO_BUCKET):
            return UnetDistError(f"{loc.url}: bucket '{loc.bucket}' does not exist at {self.endpoint()}")
        if any(s in text for s in self.s.DENIED) or isinstance(e, PermissionError):
            return UnetDistError(f"{loc.url}: access denied ({first[:200]}); {self.s.hint_denied()}")
        if retry.transient(e):
            return UnetDistError(f"{loc.url}: cannot reach {self.endpoint()} after {attempts} attempts ({first[:300]})")
        return UnetDistError(f"{loc.url}: {self.s.NAME} error: {first[:300]}")

    def call(self, op: str, loc, fn):
        return retry.call(op, loc, fn, self.attempts(), lambda e, n: self.explain(loc, e, n))

    def check(self, loc) -> None:
        """Once per bucket and process: credentials present, endpoint answering, bucket there, so
        a typo in the bucket name is reported as such rather than as 'file not found'."""
        if loc.bucket in self._checked:
            return
        import pyarrow.fs as pafs

        self.s.check_credentials(loc.url)
        info = self.call("head-bucket", loc, lambda: self.fs.get_file_info(loc.bucket))
        if info.type == pafs.FileType.NotFound:
            raise UnetDistError(f"{loc.url}: bucket '{loc.bucket}' does not exist at {self.endpoint()}")
        self._checked.add(loc.bucket)

    def info(self, loc):
        self.check(loc)
        return self.call("head", loc, lambda: self.fs.get_file_info(self.path(loc)))

    # ------------------------------------------------------------------ reading
    def exists(self, loc) -> bool:
        import pyarrow.fs as pafs

        return self.info(loc).type == pafs.FileType.File

    def is_dir(self, loc) -> bool:
        import pyarrow.fs as pafs

        return self.info(loc).type == pafs.FileType.Directory

    def size(self, loc) -> int:
        import pyarrow.fs as pafs

        info = self.info(loc)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(loc.url)
        return int(info.size)

    def _below(self, loc) -> tuple[str, list]:
        """The prefix and every entry below it, from one recursive listing ([] when none)."""
        import pyarrow.fs as pafs

        self.check(loc)
        base = self.path(loc).rstrip("/") + "/"
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        try:
            return base, self.call("list", loc, lambda: self.fs.get_file_info(selector))
        except FileNotFoundError:
            return base, []

    def listdir(self, loc) -> list[str]:
        # Recursive, then the first component below the prefix: pyarrow's GCS listing leaves out
        # the "folders" of a non-recursive one (prefixes without a marker object).
        base, infos = self._below(loc)
        return sorted({i.path[len(base):].split("/", 1)[0] for i in infos if i.path.startswith(base)} - {""})

    def walk(self, loc) -> list[str]:
        import pyarrow.fs as pafs

        base, infos = self._below(loc)
        return sorted(i.path[len(base):] for i in infos
                      if i.type == pafs.FileType.File and i.path.startswith(base) and not i.path.endswith("/"))

    def open_read(self, loc):
        self.check(loc)
        return io.BufferedReader(_RangedReader(self, loc), buffer_size=READ_CHUNK)

    # ------------------------------------------------------------------ writing
    def upload(self, loc, src: Path) -> None:
        """The local file ``src`` written whole as ``loc`` (retried whole on a transient error)."""
        self.check(loc)

        def put() -> None:
            with open(src, "rb") as f, self.fs.open_output_stream(self.path(loc)) as out:
                for block in iter(lambda: f.read(READ_CHUNK), b""):
                    out.write(block)

        self.call("put", loc, put)

    def write_bytes(self, loc, data: bytes) -> None:
        self.check(loc)

        def put() -> None:
            with self.fs.open_output_stream(self.path(loc)) as out:
                out.write(data)

        self.call("put", loc, put)

    def staging(self, loc) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{loc.name}.", suffix=".tmp")
        os.close(fd)
        return Path(tmp)

    def publish_file(self, loc, tmp: Path) -> None:
        try:
            self.upload(loc, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_tree(self, loc, src: Path, last: str | None) -> None:
        self.remove_tree(loc)  # e.g. a half upload of the same checkpoint by a killed attempt
        files = sorted(p for p in src.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)  # stable: the marker moves to the end
        for p in files:
            self.upload(loc / p.relative_to(src).as_posix(), p)

    def remove(self, loc) -> None:
        if self.exists(loc):
            try:
                self.call("delete", loc, lambda: self.fs.delete_file(self.path(loc)))
            except FileNotFoundError:
                pass

    def remove_tree(self, loc) -> None:
        import pyarrow.fs as pafs

        if self.info(loc).type == pafs.FileType.NotFound:
            return
        path = self.path(loc)
        try:
            self.call("delete", loc, lambda: self.fs.delete_dir(path))
        except FileNotFoundError:  # GCS: no marker object for the prefix itself
            self.call("delete", loc, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=True))

    def ray_storage(self, loc):
        self.check(loc)
        return self.s.filesystem(self.account, sdk_attempts=self.attempts()), self.path(loc)


class _RangedReader(io.RawIOBase):
    """An object read as ranged GETs in order; a GET cut short (or refused for a moment) is asked
    again from the offset it was reading, counted as a retry."""

    def __init__(self, store: ObjectStore, loc):
        self.store, self.loc = store, loc
        self.total = store.attempts()
        self.failures, self.pos = 0, 0
        self.file = store.call("open", loc, lambda: store.fs.open_input_file(store.path(loc)))
        self.length = self.file.size()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = min(len(b), self.length - self.pos)
        if want <= 0:
            return 0
        while True:
            try:
                data = self.file.read_at(want, self.pos)
                break
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as e:
                if not retry.transient(e) or self.failures + 1 >= self.total:
                    raise self.store.explain(self.loc, e, self.total) from None
                retry.note_retry(self.loc.scheme, "get", self.loc.url, e, self.failures, self.total)
                self.failures += 1
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def readall(self) -> bytes:
        chunks = []
        while True:
            buf = bytearray(READ_CHUNK)
            n = self.readinto(buf)
            if not n:
                return b"".join(chunks)
            chunks.append(bytes(buf[:n]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        super().close()
