"""Data loading: samples/s through the training input pipeline (``unet_dist.data.stream.train_stream``
+ ``to_device``: sample read by seek, decode under the window, uint8 collate, augment + normalise) against the
floor of tar read + decode alone, and against a folder-of-files ``torch.utils.data.Dataset`` running
today's pipeline before issue 16 (``baseline_pipeline.py``); then, at the Cityscapes size, the CPU per
sample of each photo encoding (bytes and pixel error against the PNG) and of a loader worker process,
and the loader workers one GPU needs (``loader_sizing.py``).

    .venv/bin/python benchmarks/bench_loader.py [--quick] [--repeats 3]

Shards are made from the synthetic pairs set at the source size (256x256 photos); the augment is
the training default (crop 64x128, scale 0.75..1.25, flip), batch 4. Worker counts 0/1/2 show the
scaling on this 2-core machine; "per core" compares the in-process (0 worker) loader to the floor.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import loader_sizing as S  # noqa: E402


def take(it, batches: int, finish=None) -> int:
    n = 0
    for _ in range(batches):
        b = next(it)
        if finish:
            finish(b)
        n += len(b[0])
    return n


def rate(make_iter, warmup: int, batches: int, finish=None) -> tuple[float, float]:
    """Samples per wall second and per CPU second of this process, over ``batches`` batches, after
    ``warmup`` batches (workers started, buffers filled). CPU seconds only mean "per core" when the
    work runs in this process (0 workers); other users of the machine barely move them."""
    it = iter(make_iter())
    take(it, warmup, finish)
    t0, c0 = time.perf_counter(), time.process_time()
    n = take(it, batches, finish)
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
        from baseline_pipeline import train_sample

        photo = self.files[i]
        return train_sample(self.aug, {"__key__": photo.stem, "image.jpg": photo.read_bytes(),
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


ENCODINGS = [  # (label, encoding, jpeg quality, tile): the photo storage options measured at Cityscapes size
    ("PNG (today's shards)", "png", 0, None),
    ("JPEG q90, whole", "jpeg", 90, None),
    ("JPEG q90, 256x512 tiles", "jpeg", 90, (256, 512)),
    ("JPEG q85, 256x256 tiles", "jpeg", 85, (256, 256)),
    ("JPEG q90, 256x256 tiles", "jpeg", 90, (256, 256)),
    ("JPEG q95, 256x256 tiles", "jpeg", 95, (256, 256)),
]
CHOSEN = "JPEG q90, 256x256 tiles"  # jobs/configs/cityscapes.yaml


def main() -> None:
    args = C.parser(__doc__.split("\n\n")[0]).parse_args()
    t_start = C.header("Data loading: WebDataset shards -> training batches", args)
    cache = C.cache_dir(args.cache)
    n_train, n_val, spp, batches, n_city = (16, 8, 8, 8, 2) if args.quick else (184, 16, 25, 100, 6)
    shards_dir = C.shards(cache, C.dataset(cache, n_train, n_val), spp)

    import numpy as np
    import torch
    import webdataset as wds

    import baseline_pipeline as BP
    from unet_dist.config import TrainConfig
    from unet_dist.data import augment as A
    from unet_dist.data import decode as D
    from unet_dist.data import shards as sh
    from unet_dist.data.stream import augment_rng, train_stream

    torch.set_num_threads(1)
    tc = TrainConfig()
    aug = A.Augment(crop=tuple(tc.crop), scale=tuple(tc.scale), flip=tc.flip)
    bs = tc.batch_size
    cpu = torch.device("cpu")
    urls = sh.shard_paths(shards_dir, sh.load_manifest(shards_dir), "train")
    folder = folder_from_shards(urls, cache / f"folder-{shards_dir.name}")

    def floor() -> tuple[float, float]:  # tar read + decode, every train sample once, in this process
        n = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            D.decode_sample(s)
            n += 1
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)

    def ours(workers: int):
        return lambda: train_stream(urls, aug, bs, rank=0, world=1, seed=0, start=0, workers=workers,
                                    pin_memory=False)

    def on_device(batch):  # a CPU-only rank pays the augment + normalise itself
        A.to_device(batch, aug, cpu)

    def collate(batch):  # stack tensors, list the rest
        return tuple(torch.stack(x) if isinstance(x[0], torch.Tensor) else list(x) for x in zip(*batch))

    def baseline(workers: int):
        ds = FolderDataset(folder, aug)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
        return lambda: torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=workers,
                                                   collate_fn=collate, worker_init_fn=S.seed_numpy,
                                                   persistent_workers=workers > 0, drop_last=True)

    workers = (0, 1, 2)
    res: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):  # rounds: each case once per round
        res.setdefault("floor", []).append(floor())
        for w in workers:
            warm = 3 + 2 * w
            res.setdefault(f"ours {w}", []).append(rate(ours(w), warm, batches, on_device))
            res.setdefault(f"folder {w}", []).append(rate(baseline(w), warm, batches))
    wall = {k: [v[0] for v in vs] for k, vs in res.items()}
    cpus = {k: [v[1] for v in vs] for k, vs in res.items()}

    t = C.Table(f"Training input pipeline, wall clock: {len(urls)} train shards, batch {bs}, crop {aug.crop}",
                "samples/s", baseline="floor: tar read + decode, 1 core")
    t.add("floor: tar read + decode, 1 core", wall["floor"], "webdataset tar iterator + decode_sample")
    for w in workers:
        t.add(f"ours: train_stream + to_device, {w} workers", wall[f"ours {w}"],
              "in the main process" if w == 0 else f"{w} loader process{'es' if w > 1 else ''}")
    for w in workers:
        t.add(f"baseline: folder Dataset, today's pipeline, {w} workers", wall[f"folder {w}"],
              "file per sample, decode + CPU augment + float32")
    t.print()
    pc = C.Table("Per core: samples per CPU-second of the one process doing the work (0 workers)",
                 "samples/CPU-s", baseline="floor: tar read + decode")
    pc.add("floor: tar read + decode", cpus["floor"])
    pc.add("ours: train_stream + to_device", cpus["ours 0"], "sample read by seek, decode, uint8 collate, augment + "
                                                              "normalise (on the CPU here)")
    pc.add("baseline: folder Dataset, today's pipeline", cpus["folder 0"])
    pc.print()

    # Where one sample's time goes (in-process, per sample).
    raw = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    per = lambda secs: [s / len(raw) * 1e6 for s in secs]  # noqa: E731
    np.random.seed(0)
    shipped = [A.train_sample(aug, s, augment_rng(0, 0, s["__key__"])) for s in raw]
    p = C.Table("Per sample, in the main process (CPU time)", "µs", higher_is_better=False,
                baseline="today's pipeline (decode, CPU augment, float32)")
    p.add("today's pipeline (decode, CPU augment, float32)",
          per(C.cpu_timed(lambda: [BP.train_sample(aug, s) for s in raw], args.repeats)))
    p.add("loader worker: draw window, decode under it, uint8",
          per(C.cpu_timed(lambda: [A.train_sample(aug, s, augment_rng(0, 0, s["__key__"])) for s in raw],
                          args.repeats)))
    p.add("to_device on the CPU: resample, pad, flip, normalise",
          per(C.cpu_timed(lambda: [A.to_device(A.train_collate([b]), aug, cpu) for b in shipped], args.repeats)))
    p.print()

    # ---- the Cityscapes size: photo encodings, the loader worker process, workers per GPU
    size = (1024, 2048)
    big_aug = A.Augment(crop=(512, 1024), scale=(0.5, 2.0), flip=True)  # jobs/configs/cityscapes.yaml
    if args.quick:
        size, big_aug = (256, 512), A.Augment(crop=(128, 256), scale=(0.5, 2.0), flip=True)
    tars = {name: S.scene_tar(cache, n_city, size, enc, q, tile) for name, enc, q, tile in ENCODINGS}
    samples = {name: list(wds.DataPipeline(wds.SimpleShardList([str(p)]), wds.tarfile_to_samples()))
               for name, p in tars.items()}
    png = [D.decode_sample(s)[0] for s in samples[ENCODINGS[0][0]]]
    cost: dict[str, list[float]] = {"today": []}
    for _ in range(args.repeats):  # rounds; CPU seconds of this process (the per-core cost)
        np.random.seed(0)
        c0 = time.process_time()
        for s in samples[ENCODINGS[0][0]]:
            BP.train_sample(big_aug, s)
        cost["today"].append((time.process_time() - c0) / n_city * 1e3)
        for name, ss in samples.items():
            np.random.seed(0)
            c0 = time.process_time()
            for s in ss:
                A.train_sample(big_aug, s, augment_rng(0, 0, s["__key__"]))
            cost.setdefault(name, []).append((time.process_time() - c0) / n_city * 1e3)
    g = C.Table(f"One {size[0]}x{size[1]} sample -> {big_aug.crop[0]}x{big_aug.crop[1]} crop, scale 0.5..2.0: "
                "loader CPU time on this machine's core, by photo encoding", "ms per sample",
                higher_is_better=False, baseline="today's pipeline")
    g.add("today's pipeline", cost["today"], "PNG photo, Pillow decode, CPU scale/crop/flip, float32")
    for name, *_ in ENCODINGS:
        ss = samples[name]
        photo_bytes = np.mean([sum(len(v) for k, v in s.items() if k.startswith("image.")) for s in ss])
        dec = [D.decode_sample(s)[0] for s in ss]
        d = np.concatenate([(a.astype(np.int16) - b).ravel() for a, b in zip(dec, png)])
        mse = float((d.astype(np.float64) ** 2).mean())
        quality = "lossless" if mse == 0 else f"PSNR {10 * np.log10(255**2 / mse):.1f} dB, mean abs error " \
                                               f"{np.abs(d).mean():.2f} grey levels"
        g.add(f"new: {name}", cost[name], f"{photo_bytes / 1e6:.2f} MB photo; {quality}")
    g.print()

    # The same through a real loader worker process: its CPU time per sample delivered.
    chosen_url = [str(tars[CHOSEN])]
    png_url = [str(tars[ENCODINGS[0][0]])]
    wk: dict[str, list[float]] = {}
    nb = 4 if args.quick else 25
    for _ in range(args.repeats):
        wk.setdefault("today", []).append(S.worker_cpu_ms(lambda: S.baseline_loader(png_url, big_aug, 4, 1), nb // 2, 4))
        wk.setdefault("png", []).append(S.worker_cpu_ms(lambda: S.new_loader(png_url, big_aug, 4, 1), nb // 2, 4))
        wk.setdefault("chosen", []).append(S.worker_cpu_ms(lambda: S.new_loader(chosen_url, big_aug, 4, 1), nb, 4))
    w = C.Table("The same in one loader worker process (train_stream, 1 worker, batch 4): its CPU time per sample",
                "ms per sample", higher_is_better=False, baseline="today's pipeline")
    w.add("today's pipeline", wk["today"], "PNG photos")
    w.add("new pipeline, PNG photos (existing shards)", wk["png"])
    w.add(f"new pipeline, {CHOSEN} (cityscapes.yaml)", wk["chosen"])
    w.print()

    from unet_dist.config import load_config

    city = load_config(C.REPO / "jobs/configs/cityscapes.yaml")
    rates = S.step_rates(city, (512, 1024))
    S.sizing_table(city, C.median(wk["chosen"]), rates).print()
    S.sizing_table(city, C.median(wk["today"]), rates).print()

    print("Ratios (medians of this run):")
    r0 = pc.ratio("ours: train_stream + to_device")
    print(C.goal_line("ours / floor per core (CPU time, 0 workers, augment included)", r0, ">= 0.8", r0 >= 0.8))
    for wn in workers:
        vs = t.ratio(f"ours: train_stream + to_device, {wn} workers",
                     f"baseline: folder Dataset, today's pipeline, {wn} workers")
        print(f"- ours / folder baseline at {wn} workers: {vs:.2f}")
    chosen = C.median(wk["chosen"])
    print(f"- loader worker CPU per sample at the Cityscapes size, {CHOSEN}: **{chosen:.1f} ms** (goal <= 12 ms) — "
          f"{'met' if chosen <= 12 else 'NOT met'}; {w.ratio(f'new pipeline, {CHOSEN} (cityscapes.yaml)'):.2f}x today's "
          f"{C.median(wk['today']):.1f} ms")
    print(f"- in-process, {CHOSEN}: {g.ratio('new: ' + CHOSEN):.2f}x today's pipeline; PNG photos with the new "
          f"pipeline: {g.ratio('new: ' + ENCODINGS[0][0]):.2f}x")
    print(f"- bytes per sample shipped to the rank: uint8 source region (about a quarter of float32 per pixel), "
          f"labels uint8 (an eighth of int64)")
    C.footer(t_start)


if __name__ == "__main__":
    main()
