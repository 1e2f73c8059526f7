"""The per-machine shard cache: an object copied to local disk once, shared by the processes here.

Training reads samples by random access; on a store that would cost a request per sample (a quarter
of local speed in ``benchmarks/bench_storage.py``), and an epoch visits every shard anyway. So a
shard is downloaded once into ``$UNET_DIST_CACHE`` (default ``<tmp>/unet-dist-cache``) and read
from there with seeks. A lock file per object lets one process download while the others on the
machine wait; the copy is keyed by URL and size, so a rewritten object is fetched again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("UNET_DIST_CACHE") or Path(tempfile.gettempdir()) / "unet-dist-cache")


def cached_copy(loc) -> Path:
    import fcntl

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(f"{loc.url}\n{loc.size()}".encode()).hexdigest()[:24]
    path = cache / f"{digest}-{loc.name}"
    with open(cache / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = cache / f".{digest}.{os.getpid()}.tmp"
            with loc.open_read() as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, path)
    return path
