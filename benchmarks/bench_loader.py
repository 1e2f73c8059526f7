"""Data loading: samples/s through the training input pipeline (``unet_dist.data.loader.train_loader``:
tar read, decode, augment, collate) against the floor of tar read + decode alone, and against a
folder-of-files ``torch.utils.data.Dataset`` doing the same decode + augment; then how many loader
workers one GPU needs at the Cityscapes setting (U-Net width 64, 512x1024 crops), reasoned from FLOPs.

    .venv/bin/python benchmarks/bench_loader.py [--quick] [--repeats 3]

Shards are made from the synthetic pairs set at the source size (256x256 photos); the augment is
the training default (crop 64x128, scale 0.75..1.25, flip), batch 4. Worker counts 0/1/2 show the
scaling on this 2-core machine; "per core" compares the in-process (0 worker) loader to the floor.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

H100_BF16_DENSE = 989.4e12  # FLOP/s, H100 SXM5 bf16 tensor cores without sparsity (NVIDIA datasheet)
MFU = 0.40  # assumed model FLOP utilisation of a bf16, channels_last conv U-Net step on one H100


def take(it, batches: int) -> int:
    n = 0
    for _ in range(batches):
        n += len(next(it)[0])
    return n


def rate(make_iter, warmup: int, batches: int) -> float:
    """Samples/s over ``batches`` batches, after ``warmup`` batches (worker start, buffers filled)."""
    it = iter(make_iter())
    take(it, warmup)
    t0 = time.perf_counter()
    n = take(it, batches)
    dt = time.perf_counter() - t0
    del it
    return n / dt


class FolderDataset:
    """The baseline: one photo file and one label file per sample, same decode + augment."""

    def __init__(self, folder: Path, aug):
        self.files = sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem))
        self.aug = aug

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from unet_dist.data.loader import _train_sample

        photo = self.files[i]
        return _train_sample(self.aug, {"__key__": photo.stem, "image.jpg": photo.read_bytes(),
                                        "label.png": photo.with_suffix(".png").read_bytes()})


def folder_from_shards(urls: list[str], out: Path) -> Path:
    """Unpack the train shards into ``<i>.jpg`` + ``<i>.png`` files (once)."""
    import webdataset as wds

    if (out / "done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())):
        (out / f"{i}.jpg").write_bytes(s["image.jpg"])
        (out / f"{i}.png").write_bytes(s["label.png"])
    (out / "done").write_text("")
    return out


def cityscapes_like_tar(cache: Path, n: int) -> Path:
    """``n`` synthetic street scenes at Cityscapes size (1024x2048 PNG photo + label PNG) in one tar."""
    import numpy as np

    from unet_dist.data import shards as sh
    from unet_dist.data.synthetic import render_scene, sample_rng
    from unet_dist.labels import id_to_train_id_lut

    path = cache / f"cityscapes-like-{n}.tar"
    if path.is_file():
        return path
    t0 = time.perf_counter()
    lut = id_to_train_id_lut()

    def members():
        for i in range(n):
            photo, ids = render_scene(sample_rng(0, "train", i), 1024, 2048)
            yield from sh.sample_members(sh.sample_key("train", i), sh.encode_png(photo), "png",
                                         lut[ids].astype(np.uint8), f"synthetic/{i}.png", "train")

    sh.write_tar(path, members())
    print(f"(rendered {n} Cityscapes-size scenes in {time.perf_counter() - t0:.0f} s: {path})", flush=True)
    return path


def unet_flops(width: int, size: tuple[int, int]) -> tuple[float, float]:
    """FLOPs (forward, forward + backward) of one image through the U-Net, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unet_dist.model import UNet

    with torch.device("meta"):
        model = UNet(3, 19, width, 5, "same", True)
        x = torch.empty(1, 3, *size)
        fwd = FlopCounterMode(display=False)
        with fwd:
            model(x)
        train = FlopCounterMode(display=False)
        with train:
            model(x).sum().backward()
    return float(fwd.get_total_flops()), float(train.get_total_flops())


def main() -> None:
    args = C.parser(__doc__.split("\n\n")[0]).parse_args()
    t_start = C.header("Data loading: WebDataset shards -> training batches", args)
    cache = C.cache_dir(args.cache)
    n_train, n_val, spp, batches, n_city = (16, 8, 8, 8, 1) if args.quick else (184, 16, 25, 100, 4)
    shards_dir = C.shards(cache, C.dataset(cache, n_train, n_val), spp)

    import numpy as np
    import torch
    import webdataset as wds

    from unet_dist.config import TrainConfig
    from unet_dist.data import loader as L
    from unet_dist.data import shards as sh

    torch.set_num_threads(1)
    tc = TrainConfig()
    aug = L.Augment(crop=tuple(tc.crop), scale=tuple(tc.scale), flip=tc.flip)
    bs = tc.batch_size
    urls = sh.shard_paths(shards_dir, sh.load_manifest(shards_dir), "train")
    folder = folder_from_shards(urls, cache / f"folder-{shards_dir.name}")

    def floor() -> float:  # tar read + decode, every train sample once, in this process
        n = 0
        t0 = time.perf_counter()
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            L.decode_sample(s)
            n += 1
        return n / (time.perf_counter() - t0)

    def ours(workers: int):
        return lambda: L.train_loader(urls, aug, bs, rank=0, seed=0, shuffle_buffer=tc.shuffle_buffer,
                                      workers=workers, pin_memory=False)

    def baseline(workers: int):
        ds = FolderDataset(folder, aug)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
        return lambda: torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=workers,
                                                   collate_fn=L._collate, worker_init_fn=L._seed_numpy,
                                                   persistent_workers=workers > 0, drop_last=True)

    workers = (0, 1, 2)
    res: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # rounds: each case once per round
        res.setdefault("floor", []).append(floor())
        for w in workers:
            warm = 3 + 2 * w
            res.setdefault(f"ours {w}", []).append(rate(ours(w), warm, batches))
            res.setdefault(f"folder {w}", []).append(rate(baseline(w), warm, batches))

    t = C.Table(f"Training input pipeline, {len(urls)} train shards, batch {bs}, crop {aug.crop}", "samples/s",
                baseline="floor: tar read + decode, 1 core")
    t.add("floor: tar read + decode, 1 core", res["floor"], "webdataset tar iterator + decode_sample")
    for w in workers:
        t.add(f"ours: train_loader, {w} workers", res[f"ours {w}"],
              "in the main process" if w == 0 else f"{w} loader process{'es' if w > 1 else ''}")
    for w in workers:
        t.add(f"baseline: folder Dataset + DataLoader, {w} workers", res[f"folder {w}"], "file per sample, same decode + augment")
    t.print()

    # Where one sample's time goes (in-process, per sample).
    raw = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    dec = [L.decode_sample(s) for s in raw]
    rng = np.random.default_rng(0)
    crops = [L.augment(i, lab, aug, rng) for i, lab, _ in dec]
    per = lambda secs: [s / len(raw) * 1e6 for s in secs]  # noqa: E731
    p = C.Table("Per sample, in the main process", "µs", higher_is_better=False, baseline="decode (JPEG photo + PNG label)")
    p.add("decode (JPEG photo + PNG label)", per(C.timed(lambda: [L.decode_sample(s) for s in raw], args.repeats)))
    p.add("augment (scale, crop, flip)", per(C.timed(lambda: [L.augment(i, lab, aug, rng) for i, lab, _ in dec], args.repeats)))
    p.add("normalize to float32 CHW", per(C.timed(lambda: [L.normalize(i) for i, _ in crops], args.repeats)))
    p.add("whole sample (_train_sample)", per(C.timed(lambda: [L._train_sample(aug, s) for s in raw], args.repeats)))
    p.print()

    # ---- how many workers keep one H100 fed at the Cityscapes setting
    city = cityscapes_like_tar(cache, n_city)
    big = list(wds.DataPipeline(wds.SimpleShardList([str(city)]), wds.tarfile_to_samples()))
    big_aug = L.Augment(crop=(512, 1024), scale=(0.5, 2.0), flip=True)  # jobs/configs/cityscapes.yaml
    dec_s = C.timed(lambda: [L.decode_sample(s) for s in big], args.repeats, warmup=1)
    full_s = C.timed(lambda: [L._train_sample(big_aug, s) for s in big], args.repeats)
    per_dec, per_sample = C.median(dec_s) / len(big), C.median(full_s) / len(big)
    fwd, train = unet_flops(64, (512, 1024))
    gpu_ips = MFU * H100_BF16_DENSE / train
    need = gpu_ips * per_sample
    g = C.Table("One Cityscapes-size sample (1024x2048 PNG photo + label) -> 512x1024 crop, this machine's core",
                "ms per sample", higher_is_better=False)
    g.add("decode", [s / len(big) * 1e3 for s in dec_s], f"{len(big[0]['image.png']) / 1e6:.1f} MB photo PNG")
    g.add("decode + augment + normalize", [s / len(big) * 1e3 for s in full_s], "scale 0.5..2.0, crop 512x1024, flip")
    g.print()
    print("GPU feed estimate (no GPU here, so reasoned, not measured):")
    print(f"- U-Net width 64, depth 5, 512x1024 input: {fwd / 1e9:.0f} GFLOP forward, {train / 1e9:.0f} GFLOP "
          f"forward + backward per image (counted by torch.utils.flop_counter on the meta device).")
    print(f"- Assumption: an H100 SXM reaches {MFU:.0%} of its {H100_BF16_DENSE / 1e12:.0f} TFLOP/s dense bf16 peak "
          f"on this step (bf16 + channels_last): {gpu_ips:.0f} images/s, a batch-4 step every "
          f"{4 / gpu_ips * 1e3:.0f} ms.")
    print(f"- One loader worker on one core of this machine: {1 / per_sample:.1f} samples/s "
          f"({per_sample * 1e3:.0f} ms each, {per_dec / per_sample:.0%} of it decoding the PNGs).")
    print(f"- Workers to keep one GPU fed: {gpu_ips:.0f} x {per_sample:.3f} s = **{need:.1f} -> {math.ceil(need)} "
          f"loader workers (cores) per GPU** (jobs/configs/cityscapes.yaml gives 6); at 20% MFU half that.")
    print(f"- Each float32 sample is {512 * 1024 * 3 * 4 / 2**20:.0f} MiB through shared memory: "
          f"{gpu_ips * 512 * 1024 * 3 * 4 / 2**30:.1f} GiB/s per GPU (uint8 would be a quarter).")

    print("\nRatios (medians of this run):")
    r0 = t.ratio("ours: train_loader, 0 workers")
    print(C.goal_line("ours (0 workers) / floor, per core", r0, ">= 0.8", r0 >= 0.8))
    for w in workers:
        print(f"- ours / folder baseline at {w} workers: "
              f"{t.value(f'ours: train_loader, {w} workers') / t.value(f'baseline: folder Dataset + DataLoader, {w} workers'):.2f}")
    print(f"- scaling 0 -> 2 workers: {t.ratio('ours: train_loader, 2 workers', 'ours: train_loader, 0 workers'):.2f}x "
          "(the main process only collects batches; 2 cores shared with other users)")
    C.footer(t_start)


if __name__ == "__main__":
    main()
