"""The demo's time to accuracy: val mIoU per second of training on 2 CPU workers (Ray Train), with
today's embedded defaults against the defaults before issue 16, on the demo's own data.

    .venv/bin/python benchmarks/bench_demo.py [--quick] [--repeats 3] [--baseline-repeats 1]

The data is what ``python -m unet_dist.demo`` makes (200 train / 40 val synthetic pairs images,
preprocessed with the embedded defaults), generated once. Each run is the real command line,
``python -m unet_dist.train`` with a private local Ray, MLflow in a sqlite file and the model not
logged (that happens after the loop). Runs alternate (now, before, now, ...). "Training seconds" is
the loop's own wall time (steps, evaluations, checkpoints; not Ray's start); the seconds to reach
0.75 are read from the val mIoU history (the configs' own evaluations, or every ``--eval-every``
steps, which adds evaluations to the loop's time), taking the loop's time as even per step. Val
images are never trained on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.75
GOAL_S = 150.0
# The embedded defaults before issue 16 changed them (unet_dist/config.py at that time).
BEFORE = ["model.width=16", "model.depth=5", "train.steps=1000", "train.batch_size=4", "train.crop=[64,128]",
          "train.scale=[0.75,1.25]", "train.lr=0.003", "train.warmup_steps=30", "train.dice=0",
          "train.channels_last=false", "train.class_weights=false", "train.eval_every=250",
          "train.checkpoint_every=250"]


def demo_shards(cache: Path) -> Path:
    """The demo's data and shards, made once with the demo's own generator and preprocess."""
    from unet_dist import preprocess
    from unet_dist.config import load_config
    from unet_dist.data.shards import MANIFEST
    from unet_dist.synth import write_dataset

    root, out = cache / "demo-data", cache / "demo-shards"
    if not (out / MANIFEST).is_file():
        write_dataset(root, "pairs", 200, 40, seed=0)
        preprocess.run(load_config(None, [f"data.root={root}", f"shards.dir={out}"]))
    return out


def run_once(work: Path, shards: Path, name: str, overrides: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    db = work / "mlflow.db"
    sets = [f"shards.dir={shards}", f"train.checkpoint_dir={work / 'ckpt'}", f"train.run_name={name}",
            "mlflow.log_model=false", "mlflow.registered_model=", "mlflow.system_metrics=false", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="disabled", MLFLOW_TRACKING_URI=f"sqlite:///{db}", PYTHONPATH=str(C.REPO))
    out = work / f"{name}.json"
    cmd = [sys.executable, "-m", "unet_dist.train", "--summary-json", str(out), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(out.read_text())
    history = sorted((m.step, m.value) for m in MlflowClient(f"sqlite:///{db}").get_metric_history(
        summary["mlflow_run_id"], "val/miou"))
    steps, loop_s = int(summary["steps"]), float(summary["loop_s"])
    reached = next((step for step, v in history if v >= TARGET), None)
    return {"loop_s": loop_s, "wall_s": float(summary["wall_s"]), "final": float(summary["val_miou"]),
            "steps": steps, "reached_step": reached,
            "reached_s": loop_s * reached / steps if reached else float("nan")}


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0], repeats=3)
    p.add_argument("--baseline-repeats", type=int, default=1,
                   help="runs of the pre-issue-16 defaults (each ~8 min on 2 cores; default 1)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps for a finer history (adds to the loop's time); 0: the configs' own")
    args = p.parse_args()
    t0 = C.header("Demo time to accuracy: today's defaults vs before issue 16", args)
    quick = ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.warmup_steps=2",
             "train.log_every=3"] if args.quick else []
    if args.quick:
        args.baseline_repeats = 1
    shards = demo_shards(C.cache_dir(args.cache))
    results: dict[str, list[dict]] = {"now": [], "before": []}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        for i in range(max(args.repeats, args.baseline_repeats)):
            for case, overrides in (("now", []), ("before", BEFORE)):
                if i < (args.repeats if case == "now" else args.baseline_repeats):
                    every = [f"train.eval_every={args.eval_every}"] if args.eval_every and not args.quick else []
                    r = run_once(Path(tmp), shards, f"{case}-{i}", overrides + every + quick)
                    print(f"  {case} run {i + 1}: loop {r['loop_s']:.0f} s, {r['steps']} steps, final val mIoU "
                          f"{r['final']:.4f}, {TARGET} first at step {r['reached_step']}", flush=True)
                    results[case].append(r)
    loop = C.Table("Training loop wall time (steps + evaluations + checkpoints)", "s",
                   higher_is_better=False, baseline="before")
    final = C.Table("Final val mIoU", "mIoU", baseline="before")
    rate = C.Table("Final val mIoU per training second", "mIoU/s", baseline="before")
    reach = C.Table(f"Seconds of training to val mIoU {TARGET}", "s", higher_is_better=False, baseline="before")
    for case in ("now", "before"):
        runs = results[case]
        note = f"{runs[0]['steps']} steps" + (" (" + " ".join(BEFORE) + ")" if case == "before" else " (embedded defaults)")
        loop.add(case, [r["loop_s"] for r in runs], note)
        final.add(case, [r["final"] for r in runs])
        rate.add(case, [r["final"] / r["loop_s"] for r in runs])
        reach.add(case, [r["reached_s"] for r in runs], "n/a: not reached" if any(
            r["reached_step"] is None for r in runs) else "from the val mIoU history")
    for t in (loop, final, rate, reach):
        t.print()
    print("Ratios (medians of this run):")
    print(f"- mIoU per training second, now / before: **{rate.ratio('now'):.2f}**")
    print(C.goal_line("final val mIoU, now", final.value("now"), f">= {TARGET}", final.value("now") >= TARGET))
    print(C.goal_line("training seconds to the final evaluation, now", loop.value("now"), f"<= {GOAL_S:.0f}",
                      loop.value("now") <= GOAL_S))
    C.footer(t0)


if __name__ == "__main__":
    main()
