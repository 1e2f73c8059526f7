"""Decoding shard samples into training and evaluation batches.

Training batches come from :mod:`unet_dist.data.stream` (random access, a pure function of the step);
this module decodes a sample under its augmentation window and finishes the augmentation on the
training device (:func:`to_device`). Evaluation streams the val shards and reads every val sample
exactly once across the ranks (sample ``i`` goes to rank ``i % world``), so summed confusion
matrices are exact for any world size.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from unet_dist import storage
from unet_dist.data import shards
from unet_dist.errors import UnetDistError
from unet_dist.labels import IGNORE

storage.register_gopen()  # val shard URLs on object stores stream through unet_dist.storage

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


@dataclass(frozen=True)
class Augment:
    crop: tuple[int, int]  # label crop (height, width)
    scale: tuple[float, float]
    flip: bool
    margin: int = 0  # extra context per side for 'valid' padding (mirror-padded)


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


def decode_sample(sample: dict, aug: Augment | None = None,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, object]:
    """Photo (H, W, 3) uint8 and label (H, W) uint8 trainIds from one shard sample, and its key.
    With ``aug``: a random :class:`Plan` (drawn from ``rng`` when given) instead of the key, and
    only the pixels under its box."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', 'shard')}: sample {key}"
    photo = _photo_members(sample)
    if not photo or "label.png" not in sample:
        raise UnetDistError(f"{where}: expected members image.jpg|image.png|image.tiles and label.png")
    try:
        plan = box = None
        if aug is not None:
            # Training passes its own generator (data/stream.py); without one, numpy's global state.
            rng = rng if rng is not None else np.random.default_rng(np.random.randint(2**31))
            plan = draw_plan(*photo_size(photo), aug, rng)
            box = plan.box
        image = decode_photo(photo, box)
        label = decode_label(sample["label.png"], box)
    except (OSError, ValueError, KeyError) as e:
        raise UnetDistError(f"{where}: cannot decode image ({e})") from None
    if label.ndim != 2 or label.shape != image.shape[:2]:
        raise UnetDistError(f"{where}: label {label.shape} does not match image {image.shape[:2]}")
    return image, label, key if plan is None else plan


def normalize(image: np.ndarray, mean: np.ndarray = MEAN, std: np.ndarray = STD) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet mean/std (or those a logged model carries), for
    evaluation and prediction; training batches are normalised on the device by :func:`to_device`.

    Transposed while still uint8, then normalised in place per channel plane: the same float32
    values as ``(image - MEAN) / STD``, several times faster (benchmarks/bench_loader.py).
    """
    x = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)
    x -= mean[:, None, None]
    x /= std[:, None, None]
    return torch.from_numpy(x)


# --------------------------------------------------------------------------------- augmentation
# The loader worker only draws the random scale, window and flip, and decodes the source pixels
# under the window; resampling, padding, flipping and normalising run on the training device
# (to_device), where they cost next to nothing. The worker ships uint8: a quarter of float32's bytes.


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


def _train_sample(aug: Augment, sample: dict, rng: np.random.Generator | None = None):
    """Decode only what the window needs; ship uint8 (augmented on the device by to_device)."""
    image, label, plan = decode_sample(sample, aug, rng)
    return _tensor(image), _tensor(label), torch.tensor(_plan_row(plan))


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor of ``a`` (a copy only when ``a`` is a read-only or strided view of a decoded image)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _train_collate(batch):
    photos, labels, plans = zip(*batch)
    return list(photos), list(labels), torch.stack(plans)


def _eval_sample(sample: dict):
    image, label, _ = decode_sample(sample)
    return normalize(image), torch.from_numpy(label.astype(np.int64)), image


def _collate(batch):
    return tuple(torch.stack(x) if isinstance(x[0], torch.Tensor) else list(x) for x in zip(*batch))


def eval_batches(urls: list[str], batch_size: int, *, rank: int, world: int, limit: int = 0):
    """This rank's share of the val samples, in order: (images, labels, raw photos) batches."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.slice(rank, None, world),
        wds.map(_eval_sample),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    for i, batch in enumerate(pipeline):
        if limit and i >= limit:
            return
        yield batch

