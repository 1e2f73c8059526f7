"""Training augmentation: a random scale, window and flip drawn per sample, applied in two halves.

The loader worker only draws the plan and decodes the source pixels under its window
(:func:`train_sample`); resampling, padding, flipping and normalising run on the training device
(:func:`to_device`), where they cost next to nothing. The worker ships uint8: a quarter of float32's
bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unet_dist.data.decode import MEAN, STD, decode_sample, sample_size
from unet_dist.labels import IGNORE


@dataclass(frozen=True)
class Augment:
    crop: tuple[int, int]  # label crop (height, width)
    scale: tuple[float, float]
    flip: bool
    margin: int = 0  # extra context per side for 'valid' padding (mirror-padded)


@dataclass(frozen=True)
class Plan:
    """One sample's augmentation: the source ``box`` (y0, x0, y1, x1) is resampled to ``size``
    (h, w) and placed at ``offset`` (top, left) of the window (padding around it when the scaled
    image is smaller than the window), then flipped left-right if ``flip``."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    offset: tuple[int, int]
    flip: bool


def draw_plan(height: int, width: int, aug: Augment, rng: np.random.Generator) -> Plan:
    """Random scale in ``aug.scale``, a window of the crop (+ ``margin`` context per side) at a
    uniformly random place of the scaled image, and a coin for the flip."""
    s = rng.uniform(*aug.scale)
    box, size, offset = [], [], []
    for extent, crop in ((height, aug.crop[0] + 2 * aug.margin), (width, aug.crop[1] + 2 * aug.margin)):
        span = max(1, round(crop / s))  # source pixels under the window
        if span <= extent:
            start = int(rng.integers(0, extent - span + 1))
            box.append((start, start + span)), size.append(crop), offset.append(0)
        else:  # the scaled image is smaller than the window: all of it, padded at a random place
            out = max(1, min(crop, round(extent * s)))
            box.append((0, extent)), size.append(out), offset.append(int(rng.integers(0, crop - out + 1)))
    flip = bool(aug.flip and rng.random() < 0.5)
    (y0, y1), (x0, x1) = box
    return Plan((y0, x0, y1, x1), tuple(size), tuple(offset), flip)


def _plan_row(plan: Plan) -> list[int]:
    return [*plan.size, *plan.offset, int(plan.flip)]


def _device_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(device)
    if key not in _CONSTANTS:  # made once per device: no host-to-device copy per step
        _CONSTANTS[key] = (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
                           torch.tensor(STD, device=device).view(1, 3, 1, 1))
    return _CONSTANTS[key]


_CONSTANTS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def to_device(batch, aug: Augment, device: torch.device, channels_last: bool = False):
    """A loader batch (uint8 source regions, uint8 labels, plans) -> normalised float32 images
    (B, 3, H, W) and int64 labels (B, h, w) on ``device``: the photo resampled bilinearly (with
    antialiasing when shrinking), the label by nearest source pixel centre, padding reflected for
    the photo and ``IGNORE`` for the label, then the flip. Runs the same on CPU (tests) and GPU;
    no host synchronisation (copies are non-blocking from pinned memory, sizes come from the plans)."""
    photos, labels, plans = batch
    wh, ww = aug.crop[0] + 2 * aug.margin, aug.crop[1] + 2 * aug.margin
    m = aug.margin
    xs, ys = [], []
    for photo, label, (oh, ow, top, left, flip) in zip(photos, labels, plans.tolist()):
        x = photo.to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
        y = label.to(device, non_blocking=True)
        sh, sw = y.shape
        if (oh, ow) != (sh, sw):
            x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False,
                              antialias=oh < sh or ow < sw)
            rows = (2 * torch.arange(oh, device=device) + 1) * sh // (2 * oh)
            cols = (2 * torch.arange(ow, device=device) + 1) * sw // (2 * ow)
            y = y[rows[:, None], cols]
        if (oh, ow) != (wh, ww):
            pads = (left, ww - ow - left, top, wh - oh - top)
            mode = "reflect" if max(pads[:2]) < ow and max(pads[2:]) < oh else "replicate"
            x = F.pad(x, pads, mode=mode)
            y = F.pad(y, pads, value=IGNORE)
        if flip:
            x, y = x.flip(-1), y.flip(-1)
        xs.append(x)
        ys.append(y[m:wh - m, m:ww - m] if m else y)
    mean, std = _device_constants(device)
    images = (torch.cat(xs) - mean) / std
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.stack(ys).long()


def train_sample(aug: Augment, sample: dict, rng: np.random.Generator | None = None):
    """Decode only what a random window needs; ship uint8 (augmented on the device by :func:`to_device`).
    Training passes its own generator (data/stream.py); without one, numpy's global state seeds one."""
    height, width = sample_size(sample)
    rng = rng if rng is not None else np.random.default_rng(np.random.randint(2**31))
    plan = draw_plan(height, width, aug, rng)
    image, label, _ = decode_sample(sample, plan.box)
    return _tensor(image), _tensor(label), torch.tensor(_plan_row(plan))


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor of ``a`` (a copy only when ``a`` is a read-only or strided view of a decoded image)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def train_collate(batch):
    photos, labels, plans = zip(*batch)
    return list(photos), list(labels), torch.stack(plans)
