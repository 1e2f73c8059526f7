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


def rate(make_iter, warmup: int, batches: int) -> tuple[float, float]:
    """Samples per wall second and per CPU second of this process, over ``batches`` batches, after
    ``warmup`` batches (workers started, buffers filled). CPU seconds only mean "per core" when the
    work runs in this process (0 workers); other users of the machine barely move them."""
    it = iter(make_iter())
    take(it, warmup)
    t0, c0 = time.perf_counter(), time.process_time()
    n = take(it, batches)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    return n / wall, n / cpu


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

    from unet_dist import files
    from unet_dist.data import shards as sh
    from unet_dist.synth import render_scene, sample_rng
    from unet_dist.labels import id_to_train_id_lut

    path = cache / f"cityscapes-like-{n}.tar"
    if path.is_file():
        return path
    t0 = time.perf_counter()
    lut = id_to_train_id_lut()

    def members():
        for i in range(n):
            photo, ids = render_scene(sample_rng(0, "train", i), 1024, 2048)
            yield from sh.sample_members(sh.sample_key("train", i), files.encode_png(photo), "png",
                                         lut[ids].astype(np.uint8), f"synthetic/{i}.png", "train")

    sh.write_tar(path, members())
    print(f"(rendered {n} Cityscapes-size scenes in {time.perf_counter() - t0:.0f} s: {path})", flush=True)
    return path


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
    from unet_dist import files
    from unet_dist.data import shards as sh

    torch.set_num_threads(1)
    tc = TrainConfig()
    aug = L.Augment(crop=tuple(tc.crop), scale=tuple(tc.scale), flip=tc.flip)
    bs = tc.batch_size
    urls = sh.shard_paths(shards_dir, sh.load_manifest(shards_dir), "train")
    folder = folder_from_shards(urls, cache / f"folder-{shards_dir.name}")

    def floor() -> tuple[float, float]:  # tar read + decode, every train sample once, in this process
        n = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            L.decode_sample(s)
            n += 1
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)

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
    res: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):  # rounds: each case once per round
        res.setdefault("floor", []).append(floor())
        for w in workers:
            warm = 3 + 2 * w
            res.setdefault(f"ours {w}", []).append(rate(ours(w), warm, batches))
            res.setdefault(f"folder {w}", []).append(rate(baseline(w), warm, batches))
    wall = {k: [v[0] for v in vs] for k, vs in res.items()}
    cpu = {k: [v[1] for v in vs] for k, vs in res.items()}

    t = C.Table(f"Training input pipeline, wall clock: {len(urls)} train shards, batch {bs}, crop {aug.crop}",
                "samples/s", baseline="floor: tar read + decode, 1 core")
    t.add("floor: tar read + decode, 1 core", wall["floor"], "webdataset tar iterator + decode_sample")
    for w in workers:
        t.add(f"ours: train_loader, {w} workers", wall[f"ours {w}"],
              "in the main process" if w == 0 else f"{w} loader process{'es' if w > 1 else ''}")
    for w in workers:
        t.add(f"baseline: folder Dataset + DataLoader, {w} workers", wall[f"folder {w}"],
              "file per sample, same decode + augment")
    t.print()
    pc = C.Table("Per core: samples per CPU-second of the one process doing the work (0 workers)",
                 "samples/CPU-s", baseline="floor: tar read + decode")
    pc.add("floor: tar read + decode", cpu["floor"])
    pc.add("ours: train_loader", cpu["ours 0"], "tar read, shuffle, decode, augment, normalize, collate")
    pc.add("baseline: folder Dataset + DataLoader", cpu["folder 0"])
    pc.print()

    # Where one sample's time goes (in-process, per sample).
    raw = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    dec = [L.decode_sample(s) for s in raw]
    rng = np.random.default_rng(0)
    crops = [L.augment(i, lab, aug, rng) for i, lab, _ in dec]
    per = lambda secs: [s / len(raw) * 1e6 for s in secs]  # noqa: E731
    p = C.Table("Per sample, in the main process (CPU time)", "µs", higher_is_better=False,
                baseline="decode (JPEG photo + PNG label)")
    p.add("decode (JPEG photo + PNG label)", per(C.cpu_timed(lambda: [L.decode_sample(s) for s in raw], args.repeats)))
    p.add("augment (scale, crop, flip)",
          per(C.cpu_timed(lambda: [L.augment(i, lab, aug, rng) for i, lab, _ in dec], args.repeats)))
    p.add("normalize to float32 CHW", per(C.cpu_timed(lambda: [L.normalize(i) for i, _ in crops], args.repeats)))
    p.add("whole sample (_train_sample)",
          per(C.cpu_timed(lambda: [L._train_sample(aug, s) for s in raw], args.repeats)))
    p.print()

    # ---- how many workers keep one H100 fed at the Cityscapes setting
    city = cityscapes_like_tar(cache, n_city)
    big = list(wds.DataPipeline(wds.SimpleShardList([str(city)]), wds.tarfile_to_samples()))
    big_aug = L.Augment(crop=(512, 1024), scale=(0.5, 2.0), flip=True)  # jobs/configs/cityscapes.yaml
    as_jpeg = [{**s, "image.jpg": files.encode_jpeg(L.decode_sample(s)[0])} for s in big]
    for s in as_jpeg:
        del s["image.png"]
    dec_s, full_s, jpeg_s = [], [], []
    for _ in range(args.repeats):  # rounds; CPU seconds (one process, the per-core cost)
        for out, fn in ((dec_s, L.decode_sample), (full_s, lambda s: L._train_sample(big_aug, s))):
            c0 = time.process_time()
            for s in big:
                fn(s)
            out.append(time.process_time() - c0)
        c0 = time.process_time()
        for s in as_jpeg:
            L._train_sample(big_aug, s)
        jpeg_s.append(time.process_time() - c0)
    per_dec, per_sample = C.median(dec_s) / len(big), C.median(full_s) / len(big)
    fwd, train = C.unet_flops(64, (512, 1024))
    gpu_ips = MFU * H100_BF16_DENSE / train
    need = gpu_ips * per_sample
    g = C.Table("One Cityscapes-size sample (1024x2048 photo + label PNG) -> 512x1024 crop, CPU time on this "
                "machine's core", "ms per sample", higher_is_better=False, baseline="decode (the floor)")
    g.add("decode (the floor)", [s / len(big) * 1e3 for s in dec_s],
          f"{len(big[0]['image.png']) / 1e6:.1f} MB photo PNG")
    g.add("decode + augment + normalize", [s / len(big) * 1e3 for s in full_s], "scale 0.5..2.0, crop 512x1024, flip")
    g.add("the same, photo stored as JPEG q95", [s / len(big) * 1e3 for s in jpeg_s],
          f"{len(as_jpeg[0]['image.jpg']) / 1e6:.1f} MB photo JPEG")
    g.print()
    print("GPU feed estimate (no GPU here, so reasoned, not measured):")
    print(f"- U-Net width 64, depth 5, 512x1024 input: {fwd / 1e9:.0f} GFLOP forward, {train / 1e9:.0f} GFLOP "
          f"forward + backward per image (counted by torch.utils.flop_counter on the meta device).")
    print(f"- Assumption: an H100 SXM reaches {MFU:.0%} of its {H100_BF16_DENSE / 1e12:.0f} TFLOP/s dense bf16 peak "
          f"on this step (bf16 + channels_last): {gpu_ips:.0f} images/s, a batch-4 step every "
          f"{4 / gpu_ips * 1e3:.0f} ms.")
    print(f"- One loader worker on one core of this machine: {1 / per_sample:.1f} samples/s "
          f"({per_sample * 1e3:.0f} ms each, {per_dec / per_sample:.0%} of it decoding the PNGs).")
    per_jpeg = C.median(jpeg_s) / len(big)
    print(f"- Workers to keep one GPU fed: {gpu_ips:.0f} x {per_sample:.3f} s = **{need:.1f} -> {math.ceil(need)} "
          f"loader workers (cores) per GPU** (jobs/configs/cityscapes.yaml gives 6); at 20% MFU half that.")
    print(f"- With photos stored as JPEG q95: {gpu_ips * per_jpeg:.1f} -> {math.ceil(gpu_ips * per_jpeg)} "
          "workers per GPU.")
    print(f"- Each float32 sample is {512 * 1024 * 3 * 4 / 2**20:.0f} MiB through shared memory: "
          f"{gpu_ips * 512 * 1024 * 3 * 4 / 2**30:.1f} GiB/s per GPU (uint8 would be a quarter).")

    print("\nRatios (medians of this run):")
    r0 = pc.ratio("ours: train_loader")
    print(C.goal_line("ours / floor per core (CPU time, 0 workers)", r0, ">= 0.8", r0 >= 0.8))
    print(f"- the same by wall clock: {t.ratio('ours: train_loader, 0 workers'):.2f}")
    rc = C.median(dec_s) / C.median(full_s)
    print(C.goal_line("ours / floor per core at the Cityscapes size (1024x2048 PNG -> 512x1024 crop)", rc,
                      ">= 0.8", rc >= 0.8))
    for w in workers:
        vs = t.ratio(f"ours: train_loader, {w} workers", f"baseline: folder Dataset + DataLoader, {w} workers")
        print(f"- ours / folder baseline at {w} workers: {vs:.2f}")
    print(f"- scaling 0 -> 2 workers: {t.ratio('ours: train_loader, 2 workers', 'ours: train_loader, 0 workers'):.2f}x "
          "(the main process only collects batches; 2 cores shared with other users)")
    C.footer(t_start)


if __name__ == "__main__":
    main()
