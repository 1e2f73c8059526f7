"""Where data lives: a local path or ``s3://bucket/prefix``, behind one small API.

Everything that names a location (shards, checkpoints, models) goes through this module; nothing
else parses URLs. Local paths keep today's behaviour (temp file + rename + fsync). On S3 an object
is written by one complete PUT, so a reader sees the whole object or none, and a caller that needs
"complete" semantics for a group of objects writes its marker (manifest, meta.json) last.

Client: boto3. It is the AWS SDK itself, so the endpoint, credentials, region and profile come
from the standard places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws/*``, instance/pod roles), never from our YAML; it is synchronous (safe in
forked DataLoader workers with one client per process); and the MLflow server needs it anyway for
its S3 artifact store, so it adds no second S3 stack (s3fs would add aiobotocore + aiohttp, whose
botocore pins often disagree with boto3's). botocore's own retries are turned off so that every
retry is ours: exponential backoff with jitter, ``AWS_MAX_ATTEMPTS`` attempts (default 5), each one
counted (:func:`retry_count`) and logged.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from unet_dist.errors import UnetDistError
from unet_dist.files import fsync_dir, json_bytes, tmp_path, write_bytes_atomic

log = logging.getLogger("unet_dist.storage")
# botocore logs at INFO where it found the credentials and the endpoint: noise on our CLIs' stderr.
logging.getLogger("botocore").setLevel(logging.WARNING)
SCHEME = "s3://"
T = TypeVar("T")
_RETRIES = 0
_LOCK = threading.Lock()
_CLIENT: tuple[int, object] | None = None  # (pid, client): a forked process makes its own
_CHECKED: set[str] = set()  # buckets already found reachable by this process


# ------------------------------------------------------------------------------------------ URLs
def is_remote(url: str | Path) -> bool:
    return str(url).startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    rest = str(url)[len(SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UnetDistError(f"{url}: expected s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


def absolute(url: str | Path) -> str:
    """A local path made absolute (every worker sees the same place); an S3 URL normalised.

    A path that looks like an S3 URL mangled by a filesystem path join (``s3:/bucket``) is refused,
    so a typo never turns into a local folder named ``s3:``.
    """
    text = str(url)
    if is_remote(text):
        bucket, key = split(text)
        return f"{SCHEME}{bucket}/{key}" if key else f"{SCHEME}{bucket}"
    if "://" in text or text.startswith("s3:"):
        raise UnetDistError(f"{text}: expected a local path or s3://BUCKET/PREFIX (other schemes are not supported)")
    return str(Path(text).resolve())


def join(url: str | Path, *parts: str) -> str:
    if is_remote(url):
        return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(url).joinpath(*parts))


def name(url: str | Path) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1] if is_remote(url) else Path(url).name


# ----------------------------------------------------------------------------- client and retries
def retry_count() -> int:
    """Transient S3 errors retried by this process so far."""
    return _RETRIES


def reset() -> None:
    """Forget the client and the buckets checked (after the AWS_* variables changed)."""
    global _CLIENT
    with _LOCK:
        _CLIENT = None
        _CHECKED.clear()


def _client():
    global _CLIENT
    with _LOCK:
        if _CLIENT is None or _CLIENT[0] != os.getpid():
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=60,
                         max_pool_connections=32)
            _CLIENT = (os.getpid(), boto3.session.Session().client("s3", config=cfg))
        return _CLIENT[1]


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS S3 endpoint"


def _attempts() -> int:
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "5")))
    except ValueError:
        raise UnetDistError(f"AWS_MAX_ATTEMPTS: expected an integer, got {os.environ['AWS_MAX_ATTEMPTS']!r}") from None


def _transient(e: BaseException) -> bool:
    from botocore import exceptions as bx

    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                      bx.ConnectTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError)):
        return True
    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or err.get("Code") in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}
    import urllib3.exceptions as ux

    return isinstance(e, (ux.ProtocolError, ux.ReadTimeoutError, ConnectionError))


def _backoff(attempt: int) -> float:
    return min(8.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0)


def _note_retry(op: str, url: str, e: BaseException, attempt: int, attempts: int) -> None:
    global _RETRIES
    delay = _backoff(attempt)
    with _LOCK:
        _RETRIES += 1
    log.warning("s3 %s %s: %s; retry %d of %d in %.2fs (%d retries in this process)",
                op, url, str(e).splitlines()[0] if str(e) else type(e).__name__, attempt + 1, attempts - 1,
                delay, _RETRIES)
    time.sleep(delay)


def _error(url: str, e: BaseException, attempts: int) -> Exception:
    """One line for the user; a missing object becomes FileNotFoundError (callers decide)."""
    from botocore import exceptions as bx

    bucket = split(url)[0]
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return UnetDistError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in {"NoSuchKey", "404", "NotFound"}:
            return FileNotFoundError(url)
        if code == "NoSuchBucket":
            return UnetDistError(f"{url}: bucket '{bucket}' does not exist at {_endpoint()}")
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}:
            return UnetDistError(f"{url}: access denied ({code}); check the AWS credentials and the bucket policy")
        return UnetDistError(f"{url}: S3 error {code}: {err.get('Message', '')}".rstrip(": "))
    if _transient(e):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return UnetDistError(f"{url}: cannot reach {_endpoint()} after {attempts} attempts ({first})")
    return UnetDistError(f"{url}: {type(e).__name__}: {e}")


def _call(op: str, url: str, fn: Callable[[], T]) -> T:
    """``fn()`` with retries on transient errors; other errors become one line."""
    from botocore import exceptions as bx

    attempts = _attempts()
    for attempt in range(attempts):
        try:
            return fn()
        except (bx.BotoCoreError, bx.ClientError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            if _transient(e) and attempt + 1 < attempts:
                _note_retry(op, url, e, attempt, attempts)
                continue
            raise _error(url, e, attempts) from None
    raise AssertionError("unreachable")


def _bucket_ok(url: str) -> None:
    """Once per bucket and process: the bucket exists and the credentials are accepted, so a typo
    in the bucket name is reported as such rather than as 'file not found'."""
    bucket = split(url)[0]
    if bucket in _CHECKED:
        return
    from botocore import exceptions as bx

    try:
        _call("head-bucket", f"{SCHEME}{bucket}", lambda: _client().head_bucket(Bucket=bucket))
    except FileNotFoundError:
        raise UnetDistError(f"{url}: bucket '{bucket}' does not exist at {_endpoint()}") from None
    except UnetDistError as e:
        if "access denied" in str(e) and "(403)" in str(e):  # HEAD has no body: 403 says no more
            raise UnetDistError(f"{url}: access to bucket '{bucket}' denied; check the AWS credentials") from None
        raise
    except bx.BotoCoreError as e:  # pragma: no cover - mapped inside _call
        raise _error(url, e, 1) from None
    _CHECKED.add(bucket)


def _s3(url: str) -> tuple[object, str, str]:
    _bucket_ok(url)
    bucket, key = split(url)
    return _client(), bucket, key


# --------------------------------------------------------------------------------- reading
def check(url: str | Path) -> None:
    """Preflight for a location: on S3, the endpoint answers, the credentials work and the bucket
    exists (one-line errors); locally nothing to check."""
    if is_remote(url):
        _bucket_ok(str(url))


def exists(url: str | Path) -> bool:
    """A file or an object (not a folder / prefix)."""
    if not is_remote(url):
        return Path(url).is_file()
    try:
        size(url)
        return True
    except FileNotFoundError:
        return False


def size(url: str | Path) -> int:
    if not is_remote(url):
        return Path(url).stat().st_size
    c, bucket, key = _s3(str(url))
    return int(_call("head", str(url), lambda: c.head_object(Bucket=bucket, Key=key))["ContentLength"])


def is_dir(url: str | Path) -> bool:
    """A local folder, or an S3 prefix holding at least one object."""
    if not is_remote(url):
        return Path(url).is_dir()
    c, bucket, key = _s3(str(url))
    prefix = f"{key}/" if key else ""
    got = _call("list", str(url), lambda: c.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1))
    return got.get("KeyCount", 0) > 0


def listdir(url: str | Path) -> list[str]:
    """Sorted names of the direct children (files and folders); [] when there is nothing."""
    if not is_remote(url):
        p = Path(url)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
    c, bucket, key = _s3(str(url))
    prefix = f"{key}/" if key else ""
    names: set[str] = set()
    token: dict = {}
    while True:
        got = _call("list", str(url), lambda: c.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", **token))
        names.update(o["Key"][len(prefix):] for o in got.get("Contents", []))
        names.update(p["Prefix"][len(prefix):].rstrip("/") for p in got.get("CommonPrefixes", []))
        if not got.get("IsTruncated"):
            return sorted(n for n in names if n)
        token = {"ContinuationToken": got["NextContinuationToken"]}


def read_bytes(url: str | Path) -> bytes:
    """The whole file or object; FileNotFoundError when it is not there."""
    if not is_remote(url):
        return Path(url).read_bytes()
    with open_read(url) as f:
        return f.read()


def cached_copy(url: str | Path) -> Path:
    """A local file with the bytes of ``url``: itself when local; for an object, a copy in this
    machine's cache (``$UNET_DIST_CACHE``, default ``<tmp>/unet-dist-cache``), downloaded once and
    shared by every process here (a lock file: one downloads, the others wait). Keyed by URL and
    size, so a rewritten object is fetched again. For random access to tar shards, which S3 makes
    one request per read."""
    if not is_remote(url):
        return Path(url)
    import fcntl

    cache = Path(os.environ.get("UNET_DIST_CACHE") or Path(tempfile.gettempdir()) / "unet-dist-cache")
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(f"{url}\n{size(url)}".encode()).hexdigest()[:24]
    path = cache / f"{digest}-{name(url)}"
    with open(cache / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = cache / f".{digest}.{os.getpid()}.tmp"
            with open_read(url) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, path)
    return path


def read_text(url: str | Path) -> str:
    return read_bytes(url).decode()


class _ObjectReader(io.RawIOBase):
    """A GET streamed in order; a connection lost mid-object is resumed with a Range request from
    the byte where it stopped (counted as a retry), so a long shard never restarts from zero."""

    def __init__(self, url: str):
        self.url = url
        self.client, self.bucket, self.key = _s3(url)
        self.pos, self.body, self.failures = 0, None, 0
        self._open()

    def _open(self) -> None:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        self.body = _call("get", self.url, lambda: self.client.get_object(Bucket=self.bucket, Key=self.key, **extra))["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        attempts = _attempts()
        while True:
            try:
                if self.body is None:
                    self._open()
                data = self.body.read(len(b))
                b[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted by _transient
                if not _transient(e) or self.failures + 1 >= attempts:
                    raise _error(self.url, e, attempts) from None
                with contextlib.suppress(Exception):
                    self.body.close()
                self.body = None
                _note_retry("get", self.url, e, self.failures, attempts)
                self.failures += 1

    def close(self) -> None:
        if self.body is not None:
            with contextlib.suppress(Exception):
                self.body.close()
        super().close()


def open_read(url: str | Path, buffer_size: int = 1 << 20):
    """A binary stream of the file or object (FileNotFoundError when missing)."""
    if not is_remote(url):
        return open(url, "rb")
    return io.BufferedReader(_ObjectReader(str(url)), buffer_size=buffer_size)


def sha256(url: str | Path) -> str:
    """The hex sha256 of the file or object's bytes (on S3: streamed, never trusted from metadata)."""
    h = hashlib.sha256()
    with open_read(url) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def local_copy(url: str | Path) -> Iterator[Path]:
    """A local folder with the contents of ``url`` (itself when local; a temp copy of an S3 prefix)."""
    if not is_remote(url):
        yield Path(url)
        return
    with tempfile.TemporaryDirectory(prefix="unet_dist-") as tmp:
        download_tree(str(url), Path(tmp))
        yield Path(tmp)


def download_tree(url: str, dest: Path) -> None:
    c, bucket, key = _s3(url)
    prefix = f"{key}/" if key else ""
    for obj in _all_objects(url):
        target = dest / obj[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        _call("get", f"{SCHEME}{bucket}/{obj}", lambda: c.download_file(bucket, obj, str(target)))


def _all_objects(url: str) -> list[str]:
    c, bucket, key = _s3(url)
    prefix = f"{key}/" if key else ""
    keys, token = [], {}
    while True:
        got = _call("list", url, lambda: c.list_objects_v2(Bucket=bucket, Prefix=prefix, **token))
        keys += [o["Key"] for o in got.get("Contents", [])]
        if not got.get("IsTruncated"):
            return sorted(keys)
        token = {"ContinuationToken": got["NextContinuationToken"]}


# --------------------------------------------------------------------------------- writing
def staging_path(url: str | Path) -> Path:
    """Where to build a file before :func:`publish_file`: ``dir/.name.tmp`` beside a local target
    (hidden from ``*`` and ``*.tar`` globs, same filesystem for the rename); a local temp file for
    an S3 target."""
    if not is_remote(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return tmp_path(url)
    fd, tmp = tempfile.mkstemp(prefix=f".{name(url)}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def publish_file(tmp: Path, url: str | Path) -> None:
    """Make a finished file visible under ``url`` in one step, then drop ``tmp``.

    Local: fsync + rename + fsync of the folder. S3: one PUT of the whole file (no multipart, so
    the object exists complete or not at all; S3's 5 GB single-PUT limit is far above a shard)."""
    tmp = Path(tmp)
    if not is_remote(url):
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, url)
        fsync_dir(Path(url).parent)
        return
    c, bucket, key = _s3(str(url))

    def put():
        with open(tmp, "rb") as f:
            c.put_object(Bucket=bucket, Key=key, Body=f)

    try:
        _call("put", str(url), put)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(url: str | Path, data: bytes) -> None:
    """Atomic write of a small file or object."""
    if not is_remote(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(url, data)
        return
    c, bucket, key = _s3(str(url))
    _call("put", str(url), lambda: c.put_object(Bucket=bucket, Key=key, Body=data))


def write_json(url: str | Path, obj, indent: int | None = 1) -> bytes:
    """JSON with sorted keys and a trailing newline, written atomically; returns the bytes."""
    data = json_bytes(obj, indent)
    write_bytes(url, data)
    return data


def upload_tree(src: Path, url: str, last: str | None = None) -> None:
    """Copy a local folder to ``url``, the file named ``last`` after all the others (a marker)."""
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: the marker moves to the end
    for p in files:
        target = join(url, *p.relative_to(src).parts)
        if is_remote(url):
            c, bucket, key = _s3(target)
            _call("put", target, lambda: c.upload_file(str(p), bucket, key))
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)


def remove(url: str | Path) -> None:
    """Delete a file or object; nothing when it is absent."""
    if not is_remote(url):
        Path(url).unlink(missing_ok=True)
        return
    c, bucket, key = _s3(str(url))
    _call("delete", str(url), lambda: c.delete_object(Bucket=bucket, Key=key))


def remove_tree(url: str | Path) -> None:
    """Delete a folder or every object under a prefix."""
    if not is_remote(url):
        shutil.rmtree(url, ignore_errors=True)
        return
    c, bucket, _ = _s3(str(url))
    keys = _all_objects(str(url))
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
        _call("delete", str(url), lambda: c.delete_objects(Bucket=bucket, Delete=batch))


# --------------------------------------------------------------------------------- integrations
def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported (mode {mode!r})")
    return open_read(url)


def register_gopen() -> None:
    """Let webdataset open ``s3://`` shard URLs through this module (its retries, its client)."""
    import importlib

    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3


def pyarrow_filesystem(url: str | Path):
    """``(filesystem, path)`` for Ray Train's ``RunConfig(storage_filesystem, storage_path)``: None
    for a local path; for S3 a ``pyarrow.fs.S3FileSystem`` on the same endpoint and region as boto3
    (credentials stay with pyarrow's own AWS chain: the same variables, files and roles)."""
    if not is_remote(url):
        return None, str(url)
    import pyarrow.fs as pafs

    check(url)
    bucket, key = split(str(url))
    opts: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_override"] = endpoint
    region = _client().meta.region_name
    if region:
        opts["region"] = region
    return pafs.S3FileSystem(**opts), f"{bucket}/{key}".rstrip("/")
