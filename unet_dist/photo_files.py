"""Photos as files: which suffixes count as photos, and a photo's bytes as RGB pixels, read one
way by ``predict`` and ``batch_predict`` (PIL, any mode converted to RGB, as the served model does)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from unet_dist.errors import UnetDistError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def photo_rgb(data: bytes, name: str, pairs: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an image file's bytes; with ``pairs``, the left half of a side-by-side pair."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            photo = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise UnetDistError(f"{name}: not a readable image (no image format PIL knows)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnetDistError(f"{name}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if pairs:
        h, w = photo.shape[:2]
        if w != 2 * h:
            raise UnetDistError(f"{name}: a pairs image must be twice as wide as high, got {w}x{h}")
        photo = photo[:, : w // 2]
    return np.ascontiguousarray(photo)
