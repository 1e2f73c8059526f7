"""GPU: images/s, peak allocated memory and model FLOP utilisation (MFU) of one training step of the
U-Net at width 64 on 512x1024 crops: fp32, bf16 autocast, + channels_last, + torch.compile; then the
input pipeline feeding it, and the host synchronisations of the training loop.

    .venv/bin/python benchmarks/gpu.py [--quick] [--repeats 3] [--batch 4] [--peak-tflops N]
                                       [--loader-workers N] [--no-compile]

1. Compute: batches are random tensors already on the device (the ceiling the input pipeline has to
   feed). The step is the loop's: autocast forward, cross-entropy on float logits, backward, gradient
   clipping, AdamW. MFU = FLOPs of forward + backward (torch.utils.flop_counter) x images/s / the
   device's dense bf16 peak.
2. Data-bound or compute-bound: the same bf16 + channels_last step fed by the real input pipeline
   (``train_stream`` over Cityscapes-size synthetic shards stored as ``jobs/configs/cityscapes.yaml``
   says, ``--loader-workers`` processes, pinned memory, ``to_device``), as the ratio of step time with
   real data to step time with synthetic tensors: 1.0 = compute-bound, above = the GPU waits for data.
3. Host syncs: ``train(cfg, ctx)`` of the loop itself runs twice under
   ``torch.cuda.set_sync_debug_mode("warn")``, for N and 2N steps (log_every N/2); the difference in
   synchronisations is what N steady-state steps cost: reads at the log steps only, none per step.

Without CUDA it prints the FLOP count and "no CUDA device: skipped".
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12,
             "A10": 125e12, "L4": 121e12}  # dense tensor-core FLOP/s (datasheets)


def peak_for(name: str, override: float) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="images per step (jobs/configs/cityscapes.yaml: 4 per GPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak of the device, if not known")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="loader processes feeding the real-data step (default: jobs/configs/cityscapes.yaml's)")
    args = p.parse_args()
    t_start = C.header("GPU: U-Net width 64, one training step", args)

    import torch

    from unet_dist import labels
    from unet_dist.model import UNet

    size = (256, 512) if args.quick else (512, 1024)
    fwd, train = C.unet_flops(64, size)
    print(f"**FLOPs per image, U-Net width 64, depth 5, {size[0]}x{size[1]}** "
          "(torch.utils.flop_counter, meta device)\n")
    print("| pass | GFLOP |\n|---|---|")
    print(f"| forward | {fwd / 1e9:.0f} |\n| forward + backward (one training image) | {train / 1e9:.0f} |\n")
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (run this script on a GPU machine for images/s, memory and MFU)")
        C.footer(t_start)
        return

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = peak_for(name, args.peak_tflops)
    steps = 3 if args.quick else 20
    torch.backends.cudnn.benchmark = True
    variants = [("fp32", None, False, False), ("bf16 autocast", torch.bfloat16, False, False),
                ("bf16 + channels_last", torch.bfloat16, True, False)]
    if not args.no_compile:
        variants.append(("bf16 + channels_last + compile", torch.bfloat16, True, True))
    rates: dict[str, list[float]] = {}
    mem: dict[str, float] = {}
    for label, dtype, cl, comp in variants:
        torch.manual_seed(0)
        model = UNet(3, 19, 64, 5, "same", True).to(dev)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fn = torch.compile(model) if comp else model
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=labels.IGNORE)
        x = torch.randn(args.batch, 3, *size, device=dev)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 19, (args.batch, *size), device=dev)

        step = partial(_step(model, fn, opt, loss_fn, dtype), x, y)

        for _ in range(5 if comp else 3):  # warm-up: cudnn autotune, compilation
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            rates.setdefault(label, []).append(steps * args.batch / (time.perf_counter() - t0))
        mem[label] = torch.cuda.max_memory_allocated() / 2**30
        del model, opt, fn, x, y
        torch.cuda.empty_cache()

    t = C.Table(f"{name}: training step, batch {args.batch}, {size[0]}x{size[1]}, {steps} steps per repeat",
                "images/s", baseline="fp32")
    for label, *_ in variants:
        note = f"peak allocated {mem[label]:.1f} GiB"
        if peak:
            note += f"; MFU {C.median(rates[label]) * train / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16"
        t.add(label, rates[label], note)
    t.print()
    if peak is None:
        print("MFU: unknown peak for this device; pass --peak-tflops")
    best = variants[-1][0]
    fed = fed_by_loader(args, size, steps, variants[-1][3], C.cache_dir(args.cache), dev)
    f = C.Table(f"Data-bound or compute-bound: {best}, batch {args.batch}, {size[0]}x{size[1]}", "images/s",
                baseline="synthetic tensors on the device")
    f.add("synthetic tensors on the device", rates[best], "compute only")
    f.add(f"real data: train_stream, {fed['workers']} workers + to_device", fed["rates"],
          f"{fed['stored']}; loader CPU {fed['cpu_ms']:.1f} ms per sample in the workers")
    f.print()
    syncs = loop_syncs(args, C.cache_dir(args.cache), dev)
    print(f"**Host synchronisations of the training loop** (train(cfg, ctx), width 64, bf16, channels_last, "
          f"batch {args.batch}, log_every {syncs['log_every']}; torch.cuda.set_sync_debug_mode)\n")
    print("| run | steps | syncs |\n|---|---|---|")
    for n, k in syncs["counts"].items():
        print(f"| whole run (start-up, final eval, checkpoint included) | {n} | {k} |")
    extra = syncs["extra_steps"]
    print(f"| difference: {extra} more steady-state steps, {extra // syncs['log_every']} of them log steps "
          f"| {extra} | {syncs['diff']} |\n")
    print("Where the extra syncs come from (first line of our code on each stack):")
    for where, k in syncs["where"].items():
        print(f"- {k} x {where}")
    print("\nRatios (medians of this run):")
    r = C.median(rates[best]) / C.median(fed["rates"])
    print(f"- step time with real data / with synthetic tensors ({best}): **{r:.2f}** "
          f"({'compute-bound' if r < 1.05 else 'data-bound: the GPU waits for the loader'})")
    if not args.no_compile:
        print(f"- compile / no compile (bf16 + channels_last): "
              f"{C.median(rates[variants[-1][0]]) / C.median(rates[variants[-2][0]]):.2f}")
    print(f"- host syncs per steady-state step outside log steps: "
          f"**{(syncs['diff'] - 2 * extra // syncs['log_every']) / extra:.2f}** (goal 0)")
    C.footer(t_start)


def _step(model, fn, opt, loss_fn, dtype):
    """The loop's step on one batch (autocast forward, float cross-entropy, backward, clip, AdamW)."""
    import torch

    def step(x, y):
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(fn(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def fed_by_loader(args, size, steps, comp, cache, dev) -> dict:
    """images/s of the bf16 + channels_last step fed by train_stream + to_device (real decoding)."""
    import psutil
    import torch

    import loader_sizing as S
    from unet_dist import labels
    from unet_dist.config import load_config
    from unet_dist.data import augment as A
    from unet_dist.data.stream import train_stream
    from unet_dist.model import UNet

    city = load_config(C.REPO / "jobs/configs/cityscapes.yaml")
    workers = args.loader_workers or city.train.loader_workers
    enc = city.shards
    tile = tuple(enc.photo_tile) if enc.photo_tile else None
    src = (512, 1024) if args.quick else (1024, 2048)
    url = S.scene_tar(cache, 8 if args.quick else 32, src, enc.photo_encoding, enc.jpeg_quality, tile)
    aug = A.Augment(crop=size, scale=tuple(city.train.scale), flip=city.train.flip)
    torch.manual_seed(0)
    model = UNet(3, 19, 64, 5, "same", True).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = _step(model, torch.compile(model) if comp else model, opt,
                 torch.nn.CrossEntropyLoss(ignore_index=labels.IGNORE), torch.bfloat16)
    loader = train_stream([str(url)], aug, args.batch, rank=0, world=1, seed=0, start=0, workers=workers,
                          pin_memory=dev.type == "cuda", prefetch=enc.prefetch)
    it = iter(loader)
    for _ in range(5):
        step(*A.to_device(next(it), aug, dev, channels_last=True))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    kids = psutil.Process().children()
    cpu0 = sum(k.cpu_times().user + k.cpu_times().system for k in kids)
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step(*A.to_device(next(it), aug, dev, channels_last=True))
        sync()
        rates.append(steps * args.batch / (time.perf_counter() - t0))
    cpu = sum(k.cpu_times().user + k.cpu_times().system for k in kids) - cpu0
    del it, loader
    stored = f"photos {enc.photo_encoding} q{enc.jpeg_quality}, tiles {tile}, source {src[0]}x{src[1]}"
    return {"rates": rates, "workers": workers, "stored": stored,
            "cpu_ms": cpu / (args.repeats * steps * args.batch) * 1e3}


def loop_syncs(args, cache, dev) -> dict:
    """Synchronisations counted by torch.cuda.set_sync_debug_mode in two runs of the real loop."""
    import contextlib
    import warnings

    import torch

    from unet_dist import preprocess
    from unet_dist.config import load_config
    from unet_dist.synth import write_dataset
    from unet_dist.train.loop import Context, train

    root, out = cache / "gpu-raw-cityscapes", cache / "gpu-shards-cityscapes"
    size = (128, 256) if args.quick else (1024, 2048)
    write_dataset(root, "cityscapes", 16, 4, seed=0, size=size)
    base = [f"data.root={root}", f"shards.dir={out}", "shards.samples_per_shard=4", "shards.processes=4",
            "data.max_samples=0"]
    cfg0 = load_config(C.REPO / "jobs/configs/cityscapes.yaml", base)
    if not (out / "manifest.json").is_file():
        preprocess.run(cfg0)
    log_every = 10
    n = 20 if args.quick else 40
    counts, where = {}, {}
    for steps in (n, 2 * n):
        crop = "[64,128]" if args.quick else "[512,1024]"
        cfg = load_config(C.REPO / "jobs/configs/cityscapes.yaml", [
            *base, f"train.steps={steps}", f"train.log_every={log_every}", "train.eval_every=0", "train.warmup_steps=5",
            f"train.checkpoint_every={10 * steps}", f"train.checkpoint_dir={cache / 'gpu-ckpt'}",
            f"train.run_name=syncs-{steps}", f"train.crop={crop}", f"train.batch_size={args.batch}",
            "train.eval_batches=1", "train.compile=false", "mlflow.log_model=false",
            f"train.use_gpu={'true' if dev.type == 'cuda' else 'false'}", "train.loader_workers=2"])
        ctx = Context(rank=0, world_size=1, local_rank=0, launcher="single", run_id=None,
                      report=lambda m, d: None, latest_checkpoint=lambda: contextlib.nullcontext(None))
        seen = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, ctx)
            finally:
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        # The warning names the Python line that made the synchronising call.
        seen = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        counts[steps] = len(seen)
        if steps == 2 * n:
            for k in seen:
                where[k] = where.get(k, 0) + 1
    return {"counts": counts, "diff": counts[2 * n] - counts[n], "extra_steps": n, "log_every": log_every,
            "where": where}


if __name__ == "__main__":
    main()
