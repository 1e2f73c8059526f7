"""Training: steady-state images/s and peak memory of our loop (``unet_dist.train.loop.train``, one
rank, MLflow off) against a bare PyTorch loop over the same model, optimiser, schedule, gradient
clipping and batches (the same ``train_stream``), at U-Net width 16 and width 64.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--repeats 3]

Each measurement is a fresh child process (so its peak RSS is its own); a round runs every variant
once, alternating the order. The rate of a run is the median over its logging windows after the
first (the first holds start-up: loader workers, first batches). Both loops use 1 compute thread
and 1 loader worker, like one Ray worker with ``cpus_per_worker: 1``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


# ------------------------------------------------------------------------------------ the child


class RssPeak:
    """Peak RSS of this process plus its children (loader workers), sampled every 20 ms."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                total = self.proc.memory_info().rss
                for c in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += c.memory_info().rss
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def current_peak(self) -> int:
        """The peak so far, including right now."""
        import psutil

        now = self.proc.memory_info().rss
        for c in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                now += c.memory_info().rss
        return max(self.peak, now)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak


def child_config(a):
    from unet_dist.config import load_config

    return load_config(None, [
        # depth, batch and scale pinned to what the tables say (the demo's defaults changed in issue 16)
        f"shards.dir={a.shards}", f"model.width={a.width}", "model.depth=5", "train.batch_size=4",
        "train.scale=[0.75,1.25]", f"train.steps={a.steps}",
        f"train.log_every={a.log_every}", f"train.crop=[{a.crop[0]},{a.crop[1]}]", "train.eval_every=0",
        "train.eval_batches=1", f"train.checkpoint_every={a.steps}", f"train.checkpoint_dir={a.tmp}",
        "train.loader_workers=1", "train.cpus_per_worker=1", "mlflow.log_model=false", "train.run_name=bench",
        "train.warmup_steps=1"])  # warm-up shorter than the few steps timed (the config requires it)


def run_ours(cfg, a, peak: RssPeak) -> tuple[list[float], int]:
    """Our loop; window seconds from the timestamps of its 'img/s' log lines, and the peak RSS of
    the process tree up to the last step (before the final eval and checkpoint)."""
    from unet_dist import checkpoint
    from unet_dist.train.loop import Context, train

    stamps: list[tuple[float, float]] = []
    steps_peak = [0]

    class Stamp(logging.Handler):
        def emit(self, record):
            if "img/s" in record.getMessage():
                stamps.append((record.created, time.process_time()))
                steps_peak[0] = peak.current_peak()

    logger = logging.getLogger("unet_dist.train")
    logger.setLevel(logging.INFO)
    logger.addHandler(Stamp())
    run_dir = Path(a.tmp) / "run"

    def report(metrics: dict, tmp: Path | None) -> None:
        if tmp is not None:
            checkpoint.publish(tmp, run_dir, int(metrics["step"]))

    ctx = Context(rank=0, world_size=1, local_rank=0, launcher="single", run_id=None, report=report,
                  latest_checkpoint=lambda: contextlib.nullcontext(None))
    summary = train(cfg, ctx)
    assert summary["status"] == "finished", summary
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])], steps_peak[0]


def run_bare(cfg, a, peak: RssPeak) -> tuple[list[float], int]:
    """The bare loop: the same model, AdamW, warmup-cosine schedule, clipping and batches."""
    import numpy as np
    import torch

    from unet_dist import labels
    from unet_dist.data import augment as A
    from unet_dist.data import shards as sh
    from unet_dist.data.stream import train_stream
    from unet_dist.model import UNet
    from unet_dist.train.parts import lr_lambda, make_optimizer

    t = cfg.train
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    torch.set_num_threads(t.cpus_per_worker)
    model = UNet.from_config(cfg.model)
    opt = make_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=labels.IGNORE)
    urls = sh.shard_paths(cfg.shards.dir, sh.load_manifest(cfg.shards.dir), "train")
    aug = A.Augment(tuple(t.crop), tuple(t.scale), t.flip)
    batches = iter(train_stream(urls, aug, t.batch_size, rank=0, world=1, seed=t.seed, start=0,
                                workers=t.loader_workers, pin_memory=False, prefetch=cfg.shards.prefetch))
    model.train()
    windows, t0, c0 = [], time.perf_counter(), time.process_time()
    for step in range(1, t.steps + 1):
        images, target = A.to_device(next(batches), aug, torch.device("cpu"))
        loss = loss_fn(model(images), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % t.log_every == 0:
            now, cpu = time.perf_counter(), time.process_time()
            windows.append((now - t0, cpu - c0))
            t0, c0 = now, cpu
    return windows[1:], peak.current_peak()


def child(a) -> None:
    import resource

    peak = RssPeak()
    cfg = child_config(a)
    windows, steps_peak = (run_ours if a.child == "ours" else run_bare)(cfg, a, peak)
    tree = peak.stop()
    images = a.log_every * cfg.train.batch_size
    print("RESULT " + json.dumps({
        "img_s": [images / w for w, _ in windows],
        "img_cpu_s": [images / c for _, c in windows],
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "tree_peak_mib": tree / 2**20,
        "steps_peak_mib": steps_peak / 2**20,
    }), flush=True)


# ----------------------------------------------------------------------------------- the parent


def spawn(variant: str, width: int, steps: int, log_every: int, crop: tuple[int, int], shards: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        cmd = [sys.executable, __file__, "--child", variant, "--width", str(width), "--steps", str(steps),
               "--log-every", str(log_every), "--crop", str(crop[0]), str(crop[1]), "--shards", str(shards),
               "--tmp", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{variant} width {width} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=("ours", "bare"), help=argparse_hidden())
    p.add_argument("--width", type=int, help=argparse_hidden())
    p.add_argument("--steps", type=int, help=argparse_hidden())
    p.add_argument("--log-every", type=int, help=argparse_hidden())
    p.add_argument("--crop", type=int, nargs=2, help=argparse_hidden())
    p.add_argument("--shards", help=argparse_hidden())
    p.add_argument("--tmp", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args)
        return
    t_start = C.header("Training: our loop vs a bare PyTorch loop (1 rank, CPU)", args)
    cache = C.cache_dir(args.cache)
    if args.quick:  # one round; the median runs over each run's windows
        n_train, n_val, spp, rounds = 16, 8, 8, 1
        cases = [(16, 8, 2, (32, 64))]
    else:
        n_train, n_val, spp, rounds = 184, 16, 25, args.repeats
        cases = [(16, 25, 5, (64, 128)), (64, 10, 2, (32, 64))]  # width 64 at a small crop so it finishes
    shards = C.shards(cache, C.dataset(cache, n_train, n_val), spp)

    results: dict[tuple[int, str], list[dict]] = {}
    for r in range(rounds):
        for width, steps, every, crop in cases:
            order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
            for v in order:
                results.setdefault((width, v), []).append(spawn(v, width, steps, every, crop, shards))

    def rate(res: list[dict], key: str = "img_s") -> list[float]:  # a value per run, or one run's windows
        return [C.median(x[key]) for x in res] if len(res) > 1 else res[0][key]

    headline = {}
    for width, steps, every, crop in cases:
        base = f"bare PyTorch loop, width {width}"
        t = C.Table(f"U-Net width {width}, crop {crop[0]}x{crop[1]}, batch 4, {steps} steps, window {every} steps",
                    "images/s", baseline=base)
        t.add(f"ours: train(cfg, ctx), width {width}", rate(results[(width, "ours")]),
              "loss and finite check read at log steps, scheduler, logging, NullLogger")
        t.add(base, rate(results[(width, "bare")]), "forward, loss, backward, clip, AdamW, LambdaLR")
        t.print()
        c = C.Table("The same per CPU-second of the rank process (robust to other users' load; "
                    "excludes waiting for the loader)", "images/CPU-s", baseline=base)
        c.add(f"ours: train(cfg, ctx), width {width}", rate(results[(width, "ours")], "img_cpu_s"))
        c.add(base, rate(results[(width, "bare")], "img_cpu_s"))
        c.print()
        headline[width] = (t.ratio(f"ours: train(cfg, ctx), width {width}"),
                           c.ratio(f"ours: train(cfg, ctx), width {width}"))
        m = C.Table(f"Peak memory, width {width}", "MiB", higher_is_better=False, baseline=base)
        m.add(f"ours: train(cfg, ctx), width {width}", [x["steps_peak_mib"] for x in results[(width, "ours")]],
              "RSS of process + loader worker up to the last step (shared pages counted twice)")
        m.add(base, [x["steps_peak_mib"] for x in results[(width, "bare")]], "the same")
        m.add(f"ours, whole run, width {width}", [x["tree_peak_mib"] for x in results[(width, "ours")]],
              "+ final eval on full-size val images + checkpoint")
        m.add(f"ours, ru_maxrss of the rank process, width {width}",
              [x["maxrss_mib"] for x in results[(width, "ours")]], "whole run, without the loader worker")
        m.add(f"bare, ru_maxrss of the process, width {width}", [x["maxrss_mib"] for x in results[(width, "bare")]])
        m.print()
    print("torch allocator stats: n/a on CPU (no caching allocator statistics); benchmarks/gpu.py reports "
          "torch.cuda.max_memory_allocated on a GPU.\n")
    print("Ratios (medians of this run):")
    for width, (wall, cpu) in headline.items():
        over_wall, over_cpu = (1 / wall - 1) * 100, (1 / cpu - 1) * 100
        print(C.goal_line(f"width {width}: time overhead of our loop over the bare loop, %, wall clock",
                          over_wall, "<= 5", over_wall <= 5))
        print(C.goal_line(f"width {width}: the same in CPU time of the rank process, %", over_cpu, "<= 5",
                          over_cpu <= 5))
    C.footer(t_start)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
