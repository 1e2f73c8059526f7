"""Bytes on disk, one way: sha256 of a file, atomic writes, and deterministic image encoders.

Shards, the quantizer, preprocess progress files, checkpoints' manifest digests and the synthetic
generator all use these, so "atomic" and "same bytes for the same input" mean one thing.
A file appears under its final name only once complete: it is written as ``.<name>.tmp`` beside
the target, then renamed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 95
PNG_LEVEL = 6


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj, indent: int | None = 1) -> bytes:
    """Write JSON (sorted keys, trailing newline) via a hidden temp file and a rename."""
    data = (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()
    write_bytes_atomic(path, data)
    return data


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Fixed encoder settings (4:2:0, no optimiser pass, baseline) so the bytes depend on pixels only."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2,
                              optimize=False, progressive=False)
    return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    """(H, W) -> grey, (H, W, 3) -> RGB, (H, W, 4) -> RGBA PNG at a fixed compression level."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=PNG_LEVEL, optimize=False)
    return buf.getvalue()
