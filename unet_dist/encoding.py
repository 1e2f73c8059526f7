"""Deterministic bytes: JSON with sorted keys and fixed-setting image encoders.

Shards, the quantizer, preprocess progress files and the synthetic generator all encode through
these, so "the same bytes for the same input" means one thing. Writing the bytes somewhere
(atomically, locally or to an object store) is :mod:`unet_dist.storage`'s job.
"""
from __future__ import annotations

import io
import json

import numpy as np

JPEG_QUALITY = 95
PNG_LEVEL = 6


def json_bytes(obj, indent: int | None = 1) -> bytes:
    """JSON with sorted keys and a trailing newline: the same bytes for the same object."""
    return (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Fixed encoder settings (4:2:0, no optimiser pass, baseline) so the bytes depend on pixels only."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2,
                              optimize=False, progressive=False)
    return buf.getvalue()


def encode_png(arr: np.ndarray) -> bytes:
    """(H, W) -> grey, (H, W, 3) -> RGB, (H, W, 4) -> RGBA PNG at a fixed compression level."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=PNG_LEVEL, optimize=False)
    return buf.getvalue()
