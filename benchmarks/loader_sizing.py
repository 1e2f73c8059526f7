"""Loader sizing: the loader's CPU per sample for a training config, measured in a loader worker
process, and the loader workers (cores) one GPU needs at a given step rate.

    .venv/bin/python benchmarks/loader_sizing.py --config jobs/configs/cityscapes.yaml \
        [--steps-per-s 40 --steps-per-s 20] [--shards DIR] [--quick] [--repeats 3]

Without ``--shards``, train shards are made from synthetic street scenes at the config's source
size (Cityscapes: 1024x2048), the photo stored as the config's ``shards.photo_encoding`` says.
CPU per sample is the user + system CPU time of the one loader worker process (``/proc``, via
psutil) while the rank pulls batches from ``train_stream``, divided by the samples delivered; the
same is measured for today's pipeline before issue 16 (PNG photo, CPU augment, float32;
``baseline_pipeline.py``) in the same run. Without ``--steps-per-s`` the step rate is the one an
H100 reaches at 40% and at 20% MFU on this model (FLOPs counted, not measured; see gpu.py).
"""
from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

H100_BF16_DENSE = 989.4e12  # FLOP/s, H100 SXM5 bf16 tensor cores without sparsity (NVIDIA datasheet)


def scene_tar(cache: Path, n: int, size: tuple[int, int], encoding: str, quality: int,
              tile: tuple[int, int] | None) -> Path:
    """``n`` synthetic street scenes at ``size`` in one train tar, the photo stored as given (labels
    as preprocess writes them). Made once per cache directory."""
    import numpy as np

    from unet_dist.data import shards as sh
    from unet_dist.synth import render_scene, sample_rng
    from unet_dist.labels import id_to_train_id_lut

    tag = f"{encoding}-q{quality}-{'x'.join(map(str, tile)) if tile else 'whole'}"
    path = cache / f"scenes-{size[0]}x{size[1]}-{n}-{tag}.tar"
    if path.is_file():
        return path
    lut = id_to_train_id_lut()

    def members():
        for i in range(n):
            photo, ids = render_scene(sample_rng(0, "train", i), *size)
            yield from sh.sample_members(sh.sample_key("train", i), sh.encode_photo(photo, encoding, quality, tile),
                                         "", lut[ids].astype(np.uint8), f"synthetic/{i}.png", "train")

    sh.write_tar(path, members())
    return path


def seed_numpy(worker_id: int) -> None:
    """The baseline's loader workers draw their augmentation from numpy's global generator."""
    import numpy as np
    import torch

    np.random.seed(torch.initial_seed() % (2**32))


def worker_seed(base: int, rank: int) -> int:
    import torch

    info = torch.utils.data.get_worker_info()
    return base * 1_000_003 + rank * 1000 + (info.id if info else 0)


def baseline_loader(urls: list[str], aug, batch: int, workers: int):
    """Today's pipeline before issue 16, streamed from resampled shards through a shuffle buffer
    (how training sampled before the resumable stream)."""
    import numpy as np
    import torch
    import webdataset as wds

    import baseline_pipeline as BP

    def collate(items):
        return tuple(torch.stack(x) for x in zip(*items))

    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=0, worker_seed=partial(worker_seed, 0, 0), deterministic=True),
        wds.tarfile_to_samples(), wds.shuffle(64, initial=16, seed=0),
        wds.map(partial(BP.train_sample, aug)), wds.batched(batch, collation_fn=collate, partial=False))
    np.random.seed(0)
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                         worker_init_fn=seed_numpy)


def new_loader(urls: list[str], aug, batch: int, workers: int):
    from unet_dist.data.stream import train_stream

    return train_stream(urls, aug, batch, rank=0, world=1, seed=0, start=0, workers=workers, pin_memory=False)


def worker_cpu_ms(make_loader, batches: int, batch: int, warmup: int = 3) -> float:
    """CPU ms per sample of the single loader worker process while ``batches`` batches are taken."""
    import psutil

    before = {c.pid for c in psutil.Process().children()}  # earlier loaders' workers may still be exiting
    it = iter(make_loader())
    for _ in range(warmup):
        next(it)
    [worker] = [c for c in psutil.Process().children() if c.pid not in before]

    def cpu() -> float:
        t = worker.cpu_times()
        return t.user + t.system

    c0 = cpu()
    for _ in range(batches):
        next(it)
    used = cpu() - c0
    del it
    return used / (batches * batch) * 1e3


def step_rates(cfg, crop: tuple[int, int]) -> list[tuple[str, float]]:
    """(label, optimiser steps per second per GPU) at 40% and 20% MFU of an H100 on this model."""
    _, train = C.unet_flops(cfg.model.width, crop)
    ips = H100_BF16_DENSE / train
    return [(f"H100 at {m:.0%} MFU (FLOP estimate)", m * ips / cfg.train.batch_size) for m in (0.4, 0.2)]


def sizing_table(cfg, cpu_ms: float, rates: list[tuple[str, float]]) -> C.Table:
    """Workers per GPU = images/s x CPU seconds per image; CPUs per GPU add one for the rank."""
    b = cfg.train.batch_size
    t = C.Table(f"Loader workers per GPU at {cpu_ms:.1f} ms CPU per sample (batch {b} per GPU)",
                "images/s per GPU")
    for name, steps in rates:
        need = steps * b * cpu_ms / 1e3
        t.add(name, [steps * b], f"{steps:.1f} steps/s; {need:.1f} cores of loading -> **{math.ceil(need)} loader "
                                 f"workers, {math.ceil(need) + 1} CPUs per GPU** (+1 for the rank)")
    return t


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(C.REPO / "jobs/configs/cityscapes.yaml"), help="training config YAML")
    p.add_argument("--steps-per-s", type=float, action="append", default=[],
                   help="optimiser steps per second per GPU to size for (repeatable); default: FLOP estimates")
    p.add_argument("--shards", default="", help="real shards to measure on instead of synthetic scenes")
    args = p.parse_args()
    t_start = C.header(f"Loader sizing for {args.config}", args)
    cache = C.cache_dir(args.cache)

    from unet_dist.config import load_config
    from unet_dist.data import shards as sh
    from unet_dist.data.augment import Augment
    from unet_dist.model import margin
    from unet_dist.train.parts import label_crop

    cfg = load_config(args.config)
    t = cfg.train
    crop = label_crop(cfg)
    aug = Augment(crop=crop, scale=tuple(t.scale), flip=t.flip,
                  margin=margin(cfg.model.depth) if cfg.model.padding == "valid" else 0)
    size = tuple(cfg.data.resize) if cfg.data.resize else (1024, 2048)  # Cityscapes' source size
    if args.quick:
        size, aug = (256, 512), Augment(crop=(128, 256), scale=aug.scale, flip=aug.flip, margin=aug.margin)
    enc = cfg.shards
    encoding = "png" if enc.photo_encoding == "source" else enc.photo_encoding
    tile = tuple(enc.photo_tile) if enc.photo_tile and encoding == "jpeg" else None
    n, batches = (4, 4) if args.quick else (8, 25)
    if args.shards:
        urls = sh.shard_paths(args.shards, sh.load_manifest(args.shards), "train")
        base_urls = urls if enc.photo_encoding != "jpeg" else [str(scene_tar(cache, n, size, "png", 0, None))]
    else:
        urls = [str(scene_tar(cache, n, size, encoding, enc.jpeg_quality, tile))]
        base_urls = [str(scene_tar(cache, n, size, "png", 0, None))]
    stored = f"{encoding}" + (f" q{enc.jpeg_quality}" if encoding == "jpeg" else "") + (f", tiles {tile}" if tile else "")

    import torch

    torch.set_num_threads(1)
    res: dict[str, list[float]] = {"base": [], "new": []}
    for _ in range(args.repeats):  # rounds: each case once per round
        res["base"].append(worker_cpu_ms(lambda: baseline_loader(base_urls, aug, t.batch_size, 1), batches // 2,
                                         t.batch_size))
        res["new"].append(worker_cpu_ms(lambda: new_loader(urls, aug, t.batch_size, 1), batches, t.batch_size))
    src = f"{size[0]}x{size[1]} source, crop {aug.crop[0]}x{aug.crop[1]}, scale {aug.scale[0]}..{aug.scale[1]}"
    tab = C.Table(f"Loader CPU per sample, one loader worker process ({src})", "ms per sample",
                  higher_is_better=False, baseline="today's pipeline")
    tab.add("today's pipeline", res["base"], "PNG photo, Pillow decode, CPU scale/crop/flip, float32 shipped")
    tab.add(f"this config: photo as {stored}", res["new"],
            "decode under the window, uint8 shipped, augment + normalise on the device")
    tab.print()
    cpu_ms = C.median(res["new"])
    rates = [(f"given: {s:g} steps/s", s) for s in args.steps_per_s] or step_rates(cfg, crop)
    sizing_table(cfg, cpu_ms, rates).print()
    print("Ratios (medians of this run):")
    r = tab.ratio(f"this config: photo as {stored}")
    print(f"- CPU per sample, this config: **{cpu_ms:.1f} ms** (goal <= 12 ms) — {'met' if cpu_ms <= 12 else 'NOT met'}; "
          f"{r:.2f}x today's pipeline ({C.median(res['base']):.1f} ms), {1 / r:.1f}x fewer loader cores")
    print(f"- config now: train.loader_workers {t.loader_workers}, train.cpus_per_worker {t.cpus_per_worker}")
    C.footer(t_start)


if __name__ == "__main__":
    main()
