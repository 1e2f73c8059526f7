"""The local backend: a folder on this machine (a local disk or a shared mount such as NFS).

A file appears under its final name only once complete: written as ``.<name>.tmp`` beside the
target, fsynced, renamed, and the folder fsynced, so a crash leaves the old file or the new one,
never half of it. A folder copied in (:func:`upload_tree`) is staged as ``.staging-*`` beside it and
renamed into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def tmp_path(path: str | Path) -> Path:
    """``dir/.name.tmp``: hidden from ``*`` and ``*.tar`` globs while being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Local:
    """The operations of :class:`~unet_dist.storage.Location` on this machine's filesystem."""

    def check(self, loc) -> None:
        pass

    def exists(self, loc) -> bool:
        return Path(loc.key).is_file()

    def is_dir(self, loc) -> bool:
        return Path(loc.key).is_dir()

    def size(self, loc) -> int:
        return Path(loc.key).stat().st_size

    def listdir(self, loc) -> list[str]:
        p = Path(loc.key)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def walk(self, loc) -> list[str]:
        root = Path(loc.key)
        out = []
        for d, _, files in os.walk(root):
            rel = Path(d).relative_to(root)
            out += [(rel / f).as_posix() for f in files if not (f.startswith(".") and f.endswith(".tmp"))]
        return sorted(out)

    def open_read(self, loc):
        return open(loc.key, "rb")

    def write_bytes(self, loc, data: bytes) -> None:
        write_bytes_atomic(loc.key, data)

    def staging(self, loc) -> Path:
        Path(loc.key).parent.mkdir(parents=True, exist_ok=True)
        return tmp_path(loc.key)

    def publish_file(self, loc, tmp: Path) -> None:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, loc.key)
        fsync_dir(Path(loc.key).parent)

    def upload_tree(self, loc, src: Path, last: str | None) -> None:
        """One rename of a staged copy: the folder is complete under its name or not there (the
        marker file needs no order here)."""
        final = Path(loc.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
        shutil.copytree(src, staging, dirs_exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)

    def remove(self, loc) -> None:
        Path(loc.key).unlink(missing_ok=True)

    def remove_tree(self, loc) -> None:
        shutil.rmtree(loc.key, ignore_errors=True)

    def ray_storage(self, loc):
        return None, loc.key
