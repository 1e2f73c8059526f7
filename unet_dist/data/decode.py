"""Decoding shard samples: photo (whole, or only the JPEG tiles under a box), label trainIds, and
the ImageNet normalisation of evaluation and prediction.

The training stream (:mod:`unet_dist.data.stream`) decodes only the box its augmentation window
needs (:mod:`unet_dist.data.augment`); evaluation and prediction decode whole photos.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image

from unet_dist.data import shards
from unet_dist.errors import UnetDistError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


def _photo_members(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if k.startswith("image.")}


def photo_size(members: dict[str, bytes]) -> tuple[int, int]:
    """(height, width) of a stored photo from its header alone (no pixel decoding)."""
    if "image.tiles" in members:
        return shards.unpack_tiles(members["image.tiles"])[0]
    data = members.get("image.jpg")
    if data is not None and data[:2] == b"\xff\xd8":
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return h, w
    w, h = Image.open(io.BytesIO(data or members["image.png"])).size
    return h, w


def _rgb(data: bytes) -> np.ndarray:
    """A JPEG through simplejpeg (libjpeg-turbo straight into numpy: ~25% less CPU than Pillow's
    decode + copy), with the fast integer IDCT and plain chroma upsampling: another 25% less for
    0.5 dB of PSNR (benchmarks/bench_loader.py); anything else through Pillow."""
    if data[:2] == b"\xff\xd8":
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True)
    photo = Image.open(io.BytesIO(data))
    return np.asarray(photo if photo.mode == "RGB" else photo.convert("RGB"))  # no extra copy


def decode_photo(members: dict[str, bytes], box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The photo (H, W, 3) uint8, or only its ``box`` = (y0, x0, y1, x1). Tiles (``image.tiles``)
    are decoded only where the box touches them; a single PNG or JPEG is decoded whole and sliced."""
    if "image.tiles" not in members:
        image = _rgb(members.get("image.jpg") or members["image.png"])
        return image if box is None else image[box[0]:box[2], box[1]:box[3]]
    (h, w), tiles = shards.unpack_tiles(members["image.tiles"])
    y0, x0, y1, x1 = box or (0, 0, h, w)
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    for ty, tx, ty1, tx1, data in tiles:
        a, b, c, d = max(y0, ty), min(y1, ty1), max(x0, tx), min(x1, tx1)
        if a < b and c < d:  # tiles not under the box are never decoded
            out[a - y0:b - y0, c - x0:d - x0] = _rgb(data)[a - ty:b - ty, c - tx:d - tx]
    return out


def decode_label(data: bytes, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Label trainIds (H, W) uint8, or only their ``box``. Labels are decoded by hand: a generic
    "rgb8" decoder would turn them into 3 channels. An unfiltered PNG (what preprocess writes)
    inflates only up to the box's last row; any other PNG goes through Pillow."""
    label = shards.decode_label_rows(data, *((box[0], box[2]) if box else ()))
    if label is not None:
        return label if box is None else label[:, box[1]:box[3]]
    label = np.asarray(Image.open(io.BytesIO(data)))
    return label if box is None else label[box[0]:box[2], box[1]:box[3]]


def _members(sample: dict) -> tuple[str, dict[str, bytes]]:
    """Where the sample is (for messages) and its photo members; an error when a member is missing."""
    where = f"{sample.get('__url__', 'shard')}: sample {sample.get('__key__', '?')}"
    photo = _photo_members(sample)
    if not photo or "label.png" not in sample:
        raise UnetDistError(f"{where}: expected members image.jpg|image.png|image.tiles and label.png")
    return where, photo


def sample_size(sample: dict) -> tuple[int, int]:
    """(height, width) of one shard sample's photo, from its header (the augmentation draws its window
    from it before any pixel is decoded)."""
    where, photo = _members(sample)
    try:
        return photo_size(photo)
    except (OSError, ValueError, KeyError) as e:
        raise UnetDistError(f"{where}: cannot decode image ({e})") from None


def decode_sample(sample: dict, box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Photo (H, W, 3) uint8 and label (H, W) uint8 trainIds from one shard sample, and its key; with
    ``box`` = (y0, x0, y1, x1) only the pixels under it."""
    where, photo = _members(sample)
    try:
        image = decode_photo(photo, box)
        label = decode_label(sample["label.png"], box)
    except (OSError, ValueError, KeyError) as e:
        raise UnetDistError(f"{where}: cannot decode image ({e})") from None
    if label.ndim != 2 or label.shape != image.shape[:2]:
        raise UnetDistError(f"{where}: label {label.shape} does not match image {image.shape[:2]}")
    return image, label, sample.get("__key__", "?")


def normalize(image: np.ndarray, mean: np.ndarray = MEAN, std: np.ndarray = STD) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet mean/std (or those a logged model carries), for
    evaluation and prediction; training batches are normalised on the device by
    :func:`unet_dist.data.augment.to_device`.

    Transposed while still uint8, then normalised in place per channel plane: the same float32
    values as ``(image - MEAN) / STD``, several times faster (benchmarks/bench_loader.py).
    """
    x = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)
    x -= mean[:, None, None]
    x /= std[:, None, None]
    return torch.from_numpy(x)
