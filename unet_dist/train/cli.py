"""Train the U-Net: ``python -m unet_dist.train --config FILE [--set key=value ...]``.

Under torchrun (its RANK/WORLD_SIZE/LOCAL_RANK variables are set) every rank runs the loop with
torch.distributed; otherwise a Ray Train TorchTrainer runs it on ``$RAY_ADDRESS`` or a local Ray.
Relaunching with the same ``train.run_name`` and ``train.checkpoint_dir`` resumes the run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from unet_dist.cli import run_main
from unet_dist.config import add_config_args, config_from_args


def summary_lines(summary: dict, wall_s: float) -> list[str]:
    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4f}" if isinstance(v, float) else str(v))

    return [
        f"status      {summary.get('status')}",
        f"steps       {summary.get('steps')}",
        f"wall time   {wall_s:.1f} s",
        f"val mIoU    {fmt(summary.get('val_miou'))} (best {fmt(summary.get('best_miou'))})",
        f"checkpoint  {summary.get('checkpoint')}",
        f"MLflow run  {summary.get('mlflow_run_id')}",
        *goodput_line(summary.get("goodput")),
    ]


def goodput_line(report: dict | None) -> list[str]:
    """One summary line: the goodput and the largest losses (the whole report is in the log and MLflow)."""
    if not report:
        return []
    wall = max(report["wall_s"], 1e-9)
    lost = sorted(((s, k) for k, s in report["seconds"].items() if k != "productive"), reverse=True)[:3]
    return [f"goodput     {report['fraction']:.1%} of {report['wall_s']:.1f} s "
            f"(lost: {', '.join(f'{k} {s / wall:.1%}' for s, k in lost)})"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet_dist.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--summary-json", metavar="FILE", help="also write the final summary as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        from unet_dist.distributed import under_torchrun
        from unet_dist.train import launch, preemption

        cfg = config_from_args(args)
        start = time.perf_counter()
        summary = launch.run_torchrun(cfg) if under_torchrun() else launch.run_ray(cfg)
        if summary is None:  # torchrun ranks other than 0
            return
        if summary.get("rank"):  # a torchrun rank other than 0 that was preempted
            sys.exit(preemption.EXIT_CODE)
        wall = time.perf_counter() - start
        print("\n".join(["training summary"] + ["  " + line for line in summary_lines(summary, wall)]))
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                # loop_s: the training loop alone (steps, evaluations, checkpoints); wall_s: the command
                json.dump({**summary, "loop_s": summary.get("loop_s", summary.get("wall_s")), "wall_s": round(wall, 1)},
                          f, indent=2, default=str)
        if summary.get("status") == preemption.STATUS:
            print(f"preempted: resume with the same command (exit code {preemption.EXIT_CODE})", file=sys.stderr)
            sys.exit(preemption.EXIT_CODE)
        if summary.get("status") != "finished":
            from unet_dist.errors import UnetDistError

            raise UnetDistError(f"training stopped: {summary.get('status')} (last good checkpoint: {summary.get('checkpoint')})")

    run_main(run)
