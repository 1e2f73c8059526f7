"""Sweeps: the same search with ASHA early stopping and without (FIFO: every trial runs all its
steps), on synthetic data: total wall time, steps trained, trials stopped, best and worst mIoU.

    .venv/bin/python benchmarks/bench_sweep.py [--quick] [--repeats 1]

Each sweep is the real command line, ``python -m unet_dist.tune`` in a subprocess with a private local
Ray (``RAY_AUTH_MODE=disabled``) and MLflow in a local sqlite file. Both sweeps sample the same
trial configs (same seed); runs alternate (ASHA, FIFO, ASHA, ...). A whole sweep takes minutes on
2 cores, so the default is one repeat of each (n is printed); ask for more with --repeats.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def sweep_file(path: Path, name: str, asha: bool, quick: bool) -> Path:
    path.write_text(yaml.safe_dump({
        "name": name, "metric": "val/miou", "mode": "max", "seed": 0,
        "num_samples": 2 if quick else 4, "max_concurrent_trials": 2,
        "space": {"train.lr": {"loguniform": [1.0e-5, 3.0e-2]}, "model.width": {"choice": [4, 8]}},
        "asha": {"enabled": asha, "grace_period": 4 if quick else 15, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }, sort_keys=False))
    return path


def run_sweep(work: Path, shards: Path, name: str, asha: bool, quick: bool) -> dict:
    steps, every = (8, 4) if quick else (60, 15)
    search = sweep_file(work / f"{name}.yaml", name, asha, quick)
    sets = [f"shards.dir={shards}", f"train.checkpoint_dir={work / 'ckpt'}", f"train.steps={steps}",
            f"train.eval_every={every}", "train.log_every=10", "train.warmup_steps=5", "train.batch_size=4",
            "train.crop=[64,128]", "train.loader_workers=0", "model.depth=4", "train.eval_batches=2",
            "mlflow.experiment=bench-sweep", "mlflow.registered_model=", "mlflow.system_metrics=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="disabled", MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
               PYTHONPATH=str(C.REPO))
    cmd = [sys.executable, "-m", "unet_dist.tune", "--search", str(search), "--summary-json",
           str(work / f"{name}.json"), *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((work / f"{name}.json").read_text())
    scores = [r["val/miou"] for r in summary["trials"] if r.get("val/miou") is not None]
    return {"wall": wall, "tune_wall": summary["wall_s"], "steps": sum(r["step"] or 0 for r in summary["trials"]),
            "stopped": sum(r["status"] == "stopped_early" for r in summary["trials"]),
            "trials": len(summary["trials"]), "best": max(scores), "worst": min(scores)}


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], repeats=1)
    args = p.parse_args()
    if args.quick:
        args.repeats = 1
    t0 = time.perf_counter()
    print("\n## Sweeps: ASHA early stopping vs every trial to the end\n")
    print(f"machine: {os.cpu_count()} cores ({C.cpu_model()}); load average at start {C.load()}; "
          f"{'--quick' if args.quick else 'default run'}, {args.repeats} repeat(s) of each sweep\n", flush=True)
    cache = C.cache_dir(args.cache)
    root = C.dataset(cache, 16 if args.quick else 48, 8)
    shards = C.shards(cache, root, 8)
    results: dict[str, list[dict]] = {"asha": [], "fifo": []}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for i in range(args.repeats):
            for mode in ("asha", "fifo"):
                results[mode].append(run_sweep(Path(tmp), shards, f"{mode}-{i}", mode == "asha", args.quick))
    wall = C.Table("Total wall time of the sweep command (Ray start to summary)", "s",
                   higher_is_better=False, baseline="fifo")
    steps = C.Table("Optimiser steps trained, all trials", "steps", higher_is_better=False, baseline="fifo")
    for mode in ("asha", "fifo"):
        runs = results[mode]
        note = (f"{runs[0]['trials']} trials, {runs[0]['stopped']} stopped early; mIoU best "
                f"{runs[0]['best']:.4f}, worst {runs[0]['worst']:.4f}")
        wall.add(mode, [r["wall"] for r in runs], note)
        steps.add(mode, [r["steps"] for r in runs])
    wall.print()
    steps.print()
    print("Ratios (medians of this run):")
    print(f"- ASHA / FIFO wall time: **{wall.ratio('asha'):.2f}**; steps: **{steps.ratio('asha'):.2f}**")
    for mode in ("asha", "fifo"):
        best = C.median([r["best"] for r in results[mode]])
        worst = C.median([r["worst"] for r in results[mode]])
        print(f"- {mode}: best trial mIoU {best:.4f}, worst {worst:.4f} (best / worst {best / max(worst, 1e-9):.1f}x)")
    C.footer(t0)


if __name__ == "__main__":
    main()
