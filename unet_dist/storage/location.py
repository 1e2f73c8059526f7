"""``Location``: where a file or a folder lives, and :func:`location`, the one URL parser.

A location is a local path or an object-store URL: ``s3://BUCKET/PREFIX``, ``gs://BUCKET/PREFIX``,
``az://CONTAINER/PREFIX`` (the account from ``AZURE_STORAGE_ACCOUNT_NAME`` or the connection
string) or ``abfs[s]://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX``. It is an immutable value
(plain strings, picklable, hashable) whose methods do the I/O through the backend of its scheme
(:mod:`.local` or :mod:`.objects`), so callers never ask which kind of place they hold.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Union

from unet_dist.encoding import json_bytes
from unet_dist.errors import UnetDistError

LOCAL = "file"
REMOTE = ("s3", "gs", "az")  # the schemes a Location can have besides LOCAL
EXPECTED = {"s3": "s3://BUCKET/PREFIX", "gs": "gs://BUCKET/PREFIX", "az": "az://CONTAINER/PREFIX",
            "abfs": "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX"}
ALIASES = {"s3": "s3", "gs": "gs", "az": "az", "abfs": "abfs", "abfss": "abfs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.S)
_ABFS_HOST = re.compile(r"^([^@/]+)@([a-z0-9]+)\.(?:dfs|blob)\.[^/]+$")


@dataclass(frozen=True)
class Location:
    """One place: ``scheme`` (``file``, ``s3``, ``gs``, ``az``), ``bucket`` (the S3/GCS bucket or
    Azure container; empty for local), ``key`` (the absolute path for local, else the key prefix
    without slashes at either end) and ``account`` (Azure, when the URL names it)."""

    scheme: str
    bucket: str
    key: str
    account: str = ""

    # ------------------------------------------------------------------------------ naming
    @property
    def url(self) -> str:
        """The string form: an absolute local path or a URL that :func:`location` reads back."""
        if self.scheme == LOCAL:
            return self.key
        tail = f"/{self.key}" if self.key else ""
        if self.scheme == "az" and self.account:
            return f"abfs://{self.bucket}@{self.account}.dfs.core.windows.net{tail}"
        return f"{self.scheme}://{self.bucket}{tail}"

    def __str__(self) -> str:
        return self.url

    def __truediv__(self, name: str) -> "Location":
        parts = [p for p in str(name).split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UnetDistError(f"{self.url}: '..' in {name!r}; expected a name below this location")
        if self.scheme == LOCAL:
            return Location(LOCAL, "", str(Path(self.key).joinpath(*parts)))
        return Location(self.scheme, self.bucket, "/".join(p for p in (self.key, *parts) if p), self.account)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name if self.key else self.bucket

    @property
    def parent(self) -> "Location":
        if self.scheme == LOCAL:
            return Location(LOCAL, "", str(Path(self.key).parent))
        return Location(self.scheme, self.bucket, self.key.rpartition("/")[0], self.account)

    @property
    def local_path(self) -> Path | None:
        """The path on this machine's filesystem, or None for an object in a store."""
        return Path(self.key) if self.scheme == LOCAL else None

    @property
    def _backend(self):
        from unet_dist.storage import backends

        return backends.backend(self)

    # ------------------------------------------------------------------------------ reading
    def check(self) -> None:
        """Preflight: on an object store the endpoint answers, the credentials work and the bucket
        exists (one-line errors, once per bucket and process); locally nothing to check."""
        self._backend.check(self)

    def exists(self) -> bool:
        """A file or an object (not a folder or prefix)."""
        return self._backend.exists(self)

    def is_dir(self) -> bool:
        """A local folder, or a prefix holding at least one object."""
        return self._backend.is_dir(self)

    def size(self) -> int:
        """Bytes of the file or object; FileNotFoundError when it is not there."""
        return self._backend.size(self)

    def listdir(self) -> list[str]:
        """Sorted names of the direct children (files and folders); [] when there is nothing."""
        return self._backend.listdir(self)

    def walk(self) -> list[str]:
        """Sorted POSIX paths, relative to this folder, of every file below it at any depth (one
        recursive listing on an object store; files being written, ``.NAME.tmp``, left out locally)."""
        return self._backend.walk(self)

    def open_read(self) -> BinaryIO:
        """A buffered binary stream (FileNotFoundError when missing). On an object store it is a
        series of 4 MiB ranged reads; one cut by the network is asked again at its own offset,
        never from the object's start."""
        return self._backend.open_read(self)

    def read_bytes(self) -> bytes:
        with self.open_read() as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def sha256(self) -> str:
        """The hex sha256 of the bytes, streamed (on a store: read back, never taken from metadata)."""
        import hashlib

        h = hashlib.sha256()
        with self.open_read() as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def cached_copy(self) -> Path:
        """A local file with these bytes: the file itself when local; for an object, a copy in
        this machine's cache, downloaded once and shared by its processes (see :mod:`.cache`)."""
        from unet_dist.storage.cache import cached_copy

        return self.local_path if self.local_path is not None else cached_copy(self)

    # ------------------------------------------------------------------------------ writing
    def write_bytes(self, data: bytes) -> None:
        """Atomic: readers see the old bytes or all of the new ones (local: temp file, fsync,
        rename; store: one object written whole)."""
        self._backend.write_bytes(self, data)

    def write_json(self, obj, indent: int | None = 1) -> bytes:
        """JSON with sorted keys and a trailing newline, written atomically; returns the bytes."""
        data = json_bytes(obj, indent)
        self.write_bytes(data)
        return data

    def staging(self) -> Path:
        """A local file to build this file in before :meth:`publish_file`: ``.NAME.tmp`` beside a
        local target (hidden from globs, same filesystem for the rename), a temp file otherwise."""
        return self._backend.staging(self)

    def publish_file(self, tmp: Path) -> None:
        """Make the finished file ``tmp`` visible here in one step, then drop ``tmp``."""
        self._backend.publish_file(self, Path(tmp))

    def upload_tree(self, src: Union[str, os.PathLike], last: str | None = None) -> None:
        """Make this folder a copy of the local folder ``src``, replacing what was here. Local: a
        staged copy renamed into place. Store: the old objects removed, then every file written
        whole, the one named ``last`` (a marker such as ``meta.json``) after all the others."""
        self._backend.upload_tree(self, Path(src), last)

    def remove(self) -> None:
        """Delete the file or object; nothing when it is absent."""
        self._backend.remove(self)

    def remove_tree(self) -> None:
        """Delete the folder, or every object under the prefix."""
        self._backend.remove_tree(self)

    # ------------------------------------------------------------------------------ Ray
    def ray_storage(self):
        """``(storage_filesystem, storage_path)`` for Ray's ``RunConfig``: ``(None, path)`` for a
        local folder (Ray's own local handling), a ``pyarrow.fs`` filesystem and ``BUCKET/KEY``
        otherwise, on the same endpoint and credentials as this package's own I/O."""
        return self._backend.ray_storage(self)


PathOrUrl = Union[Location, str, os.PathLike]


def location(where: PathOrUrl) -> Location:
    """The :class:`Location` for a local path (made absolute, so every worker sees the same place)
    or an object-store URL. The only function in the package that parses a URL.

    Mangled URLs (``s3:/bucket``, ``gs:bucket``: what a filesystem path join makes of a URL) and
    unknown schemes are refused, so a typo never becomes a local folder named ``s3:``."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if not isinstance(text, str):
        raise UnetDistError(f"{text!r}: expected a local path or a URL as text")
    m = _SCHEME.match(text)
    scheme = ALIASES.get(m.group(1).lower()) if m else None
    if m is None or (scheme is None and "://" not in text):
        return Location(LOCAL, "", str(Path(text).resolve()))
    if scheme is None:
        raise UnetDistError(f"{text}: expected a local path, {EXPECTED['s3']}, {EXPECTED['gs']} or "
                            f"{EXPECTED['az']} (other schemes are not supported)")
    rest = m.group(2)
    if not rest.startswith("//"):
        raise UnetDistError(f"{text}: expected {EXPECTED[scheme]} (two slashes after '{m.group(1)}:')")
    host, _, key = rest[2:].partition("/")
    key = key.strip("/")
    if scheme == "abfs":
        return _abfs(text, host, key)
    if not host:
        raise UnetDistError(f"{text}: expected {EXPECTED[scheme]}")
    return Location(scheme, host, key)


def _abfs(text: str, host: str, key: str) -> Location:
    """``abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH`` (the Hadoop/fsspec form), or
    ``abfs://CONTAINER/PATH`` with the account from the environment."""
    if "@" not in host:
        if not host:
            raise UnetDistError(f"{text}: expected {EXPECTED['abfs']}")
        return Location("az", host, key)
    m = _ABFS_HOST.match(host)
    if m is None:
        raise UnetDistError(f"{text}: expected {EXPECTED['abfs']}")
    return Location("az", m.group(1), key, m.group(2))
