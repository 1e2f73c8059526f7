"""Streaming the shards into training and evaluation batches.

Training streams *resampled* shards: every rank and loader worker draws shards at random with its own
seed, forever, and the loop takes exactly ``steps x accumulation`` batches per rank. No rank can run
short of data, so uneven shard counts never hang a collective. Evaluation reads every val sample
exactly once across the ranks (sample ``i`` goes to rank ``i % world``), so summed confusion matrices
are exact for any world size.
"""
from __future__ import annotations

import io
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from unet_dist import storage
from unet_dist.errors import UnetDistError
from unet_dist.labels import IGNORE

storage.register_gopen()  # s3:// shard URLs stream through unet_dist.storage (also in loader workers)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


@dataclass(frozen=True)
class Augment:
    crop: tuple[int, int]  # label crop (height, width)
    scale: tuple[float, float]
    flip: bool
    margin: int = 0  # extra context per side for 'valid' padding (mirror-padded)


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


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet mean/std.

    Transposed while still uint8, then normalised in place per channel plane: the same float32
    values as ``(image - MEAN) / STD``, several times faster (benchmarks/bench_loader.py).
    """
    x = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)
    x -= MEAN[:, None, None]
    x /= STD[:, None, None]
    return torch.from_numpy(x)


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


def _worker_seed(base: int, rank: int) -> int:
    info = torch.utils.data.get_worker_info()
    return base * 1_000_003 + rank * 1000 + (info.id if info else 0)


def _train_sample(aug: Augment, sample: dict):
    image, label, _ = decode_sample(sample)
    # np.random is seeded per loader worker from torch's seed (see _seed_numpy), so runs repeat.
    image, label = augment(image, label, aug, np.random.default_rng(np.random.randint(2**31)))
    return normalize(image), torch.from_numpy(label.astype(np.int64))


def _eval_sample(sample: dict):
    image, label, _ = decode_sample(sample)
    return normalize(image), torch.from_numpy(label.astype(np.int64)), image


def _collate(batch):
    return tuple(torch.stack(x) if isinstance(x[0], torch.Tensor) else list(x) for x in zip(*batch))


def _prefetched_shards(src, depth: int):
    """Shards read whole, ``depth`` ahead, in threads: the wait for the next shards (network or
    disk) overlaps the decoding of this one. Same samples in the same order as streaming."""
    with ThreadPoolExecutor(depth) as pool:
        pending: deque = deque()
        for item in src:
            pending.append((item, pool.submit(storage.read_bytes, item["url"])))
            if len(pending) > depth:
                item, data = pending.popleft()
                yield {**item, "stream": io.BytesIO(data.result())}
        while pending:
            item, data = pending.popleft()
            yield {**item, "stream": io.BytesIO(data.result())}


def shard_samples(prefetch: int = 0):
    """Pipeline stage: shard URLs -> samples, streamed (``prefetch`` 0) or read ahead whole."""
    return wds.pipelinefilter(_prefetched_samples)(prefetch) if prefetch > 0 else wds.tarfile_to_samples()


def _prefetched_samples(src, depth: int):
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander(_prefetched_shards(src, depth)))


def train_loader(urls: list[str], aug: Augment, batch_size: int, *, rank: int, seed: int,
                 shuffle_buffer: int, workers: int, pin_memory: bool, prefetch: int = 0) -> wds.WebLoader:
    """An endless stream of (images, labels) batches for one rank."""
    if not urls:
        raise UnetDistError("no train shards to stream")
    worker_seed = partial(_worker_seed, seed, rank)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=worker_seed, deterministic=True),
        shard_samples(prefetch),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 16), seed=seed * 7919 + rank),
        wds.map(partial(_train_sample, aug)),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         persistent_workers=workers > 0, worker_init_fn=_seed_numpy)


def _seed_numpy(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % (2**32))


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

