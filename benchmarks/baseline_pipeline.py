"""Today's pipeline before issue 16, kept as the baseline the loader benchmark measures against in
the same run: Pillow decodes the whole photo and label, the worker scales, crops and flips on the
CPU (Pillow bilinear on the window) and ships float32 CHW images and int64 labels.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from unet_dist.data.augment import Augment
from unet_dist.data.decode import normalize
from unet_dist.errors import UnetDistError
from unet_dist.labels import IGNORE

__all__ = ["Augment", "augment", "decode_sample", "train_sample"]


def decode_sample(sample: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Photo (H, W, 3) uint8 and label (H, W) uint8 trainIds from one shard sample."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', 'shard')}: sample {key}"
    raw = sample.get("image.jpg") or sample.get("image.png")
    if raw is None or "label.png" not in sample:
        raise UnetDistError(f"{where}: expected members image.jpg|image.png and label.png")
    try:
        photo = Image.open(io.BytesIO(raw))
        image = np.asarray(photo if photo.mode == "RGB" else photo.convert("RGB"))  # no extra copy
        # Labels are decoded by hand: a generic "rgb8" decoder would turn them into 3 channels.
        label = np.asarray(Image.open(io.BytesIO(sample["label.png"])))
    except OSError as e:
        raise UnetDistError(f"{where}: cannot decode image ({e})") from None
    if label.ndim != 2 or label.shape != image.shape[:2]:
        raise UnetDistError(f"{where}: label {label.shape} does not match image {image.shape[:2]}")
    return image, label, key


def augment(image: np.ndarray, label: np.ndarray, aug: Augment, rng: np.random.Generator):
    """Random scale, crop and flip, applied identically to photo and label (label: nearest only)."""
    h, w = label.shape
    s = rng.uniform(*aug.scale)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    ch, cw = aug.crop
    m = aug.margin
    if nh >= ch and nw >= cw:  # no padding: the crop window is drawn before any resampling
        y = int(rng.integers(0, nh - ch + 1))
        x = int(rng.integers(0, nw - cw + 1))
        if y >= m and x >= m and y + ch + m <= nh and x + cw + m <= nw:
            image, label = _scaled_window(image, label, (nh, nw), (y - m, x - m), (ch + 2 * m, cw + 2 * m), m)
            return _flip(image, label, aug, rng)
        image, label = _scaled(image, label, nh, nw)
    else:
        image, label = _scaled(image, label, nh, nw)
        ph, pw = max(0, ch - nh), max(0, cw - nw)  # smaller than the crop: pad, labels with ignore
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if ph < nh and pw < nw else "edge")
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
        y = int(rng.integers(0, label.shape[0] - ch + 1))
        x = int(rng.integers(0, label.shape[1] - cw + 1))
    if m:  # 'valid' padding: the photo window carries `m` pixels of mirrored context per side
        image = np.pad(image, ((m, m), (m, m), (0, 0)), mode="symmetric")
    image = image[y : y + ch + 2 * m, x : x + cw + 2 * m]
    label = label[y : y + ch, x : x + cw]
    return _flip(image, label, aug, rng)


def _scaled(image: np.ndarray, label: np.ndarray, nh: int, nw: int):
    if (nh, nw) != label.shape:
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    return image, label


def _scaled_window(image, label, size, top_left, window, m):
    """The (window) photo region at (top_left) of the image scaled to ``size``, and the label
    region ``m`` pixels inside it, resampled directly: only the crop is interpolated, not the whole
    scaled image (benchmarks/bench_loader.py: the augment step several times faster). Photo pixels
    match a full resize then crop up to float rounding of the sample positions (a grey level or two)."""
    (nh, nw), (y, x), (wh, ww) = size, top_left, window
    h, w = label.shape
    if (nh, nw) == (h, w):
        return image[y : y + wh, x : x + ww], label[y + m : y + wh - m, x + m : x + ww - m]
    sy, sx = h / nh, w / nw
    # Only the source region under the window (plus the filter's reach, <= max(1, 1/scale) pixels)
    # goes to PIL: converting the whole photo into a PIL image costs more than the resize itself.
    reach = math.ceil(max(sx, sy, 1.0)) + 1
    y0, x0 = max(0, math.floor(y * sy) - reach), max(0, math.floor(x * sx) - reach)
    y1, x1 = min(h, math.ceil((y + wh) * sy) + reach), min(w, math.ceil((x + ww) * sx) + reach)
    box = (x * sx - x0, y * sy - y0, (x + ww) * sx - x0, (y + wh) * sy - y0)
    region = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
    image = np.asarray(region.resize((ww, wh), Image.BILINEAR, box=box))
    # Nearest neighbour by index: the source pixel under each target pixel centre, floor((i + 0.5)
    # * h / nh) in exact integer arithmetic (PIL's own NEAREST rounds in fixed point).
    rows = (2 * np.arange(y + m, y + wh - m) + 1) * h // (2 * nh)
    cols = (2 * np.arange(x + m, x + ww - m) + 1) * w // (2 * nw)
    return image, label[rows[:, None], cols]


def _flip(image: np.ndarray, label: np.ndarray, aug: Augment, rng: np.random.Generator):
    if aug.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


def train_sample(aug: Augment, sample: dict):
    image, label, _ = decode_sample(sample)
    image, label = augment(image, label, aug, np.random.default_rng(np.random.randint(2**31)))
    return normalize(image), torch.from_numpy(label.astype(np.int64))
