"""The files a prediction is written as: their names and their bytes, one definition for
``predict`` and ``batch_predict``, so the two write the same bytes for the same photo.

Formats (``--format``):

- ``trainid``: ``<stem>_trainIds.png``, 8-bit trainIds 0..18 (255 never occurs: every pixel is
  predicted);
- ``color``: ``<stem>_color.png``, RGB in the Cityscapes palette;
- ``cityscapes``: ``<stem>_labelIds.png``, 8-bit labelIds (trainId 0 road -> labelId 7, ...): what the
  Cityscapes benchmark and its evaluator read for ``<city>_<seq>_<frame>*.png``.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from unet_dist.labels import colorize, train_id_to_id_lut

FORMATS = ("trainid", "color", "cityscapes")
SUFFIX = {"trainid": "_trainIds.png", "color": "_color.png", "cityscapes": "_labelIds.png"}
PHOTO_SUFFIX = "_leftImg8bit"  # a Cityscapes photo's name ends with it; outputs drop it


def png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array, encoded one way everywhere."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode(train_ids: np.ndarray, fmt: str) -> bytes:
    """The file of one format for a (H, W) uint8 trainId map."""
    if fmt == "trainid":
        return png(train_ids)
    if fmt == "color":
        return png(colorize(train_ids))
    if fmt == "cityscapes":
        return png(train_id_to_id_lut()[train_ids])
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def output_stem(name: str) -> str:
    """``berlin_000000_000019_leftImg8bit.png`` -> ``berlin_000000_000019``; other names lose their suffix."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return stem[: -len(PHOTO_SUFFIX)] if stem.endswith(PHOTO_SUFFIX) else stem


def output_name(stem: str, fmt: str) -> str:
    return f"{stem}{SUFFIX[fmt]}"


def parse_formats(text: str) -> tuple[str, ...]:
    """``"trainid,color"`` -> ("trainid", "color"), in the order of :data:`FORMATS`; an argparse type."""
    import argparse

    wanted = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in wanted if f not in FORMATS]
    if not wanted or bad:
        raise argparse.ArgumentTypeError(f"expected one or more of {'|'.join(FORMATS)}, comma-separated, got {text!r}")
    return tuple(f for f in FORMATS if f in wanted)
