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
from unet_dist.train.summary import RunSummary


def summary_lines(summary: RunSummary, wall_s: float) -> list[str]:
    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4f}" if isinstance(v, float) else str(v))

    return [
        f"status      {summary.status}",
        f"steps       {summary.steps}",
        f"wall time   {wall_s:.1f} s",
        f"val mIoU    {fmt(summary.val_miou)} (best {fmt(summary.best_miou)})",
        f"checkpoint  {summary.checkpoint}",
        f"MLflow run  {summary.mlflow_run_id}",
    ]


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
        if summary.rank != 0:  # torchrun: rank 0 reports for the job; a preempted rank exits as it does
            if summary.status == preemption.STATUS:
                sys.exit(preemption.EXIT_CODE)
            return
        wall = time.perf_counter() - start
        print("\n".join(["training summary"] + ["  " + line for line in summary_lines(summary, wall)]))
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                # loop_s: the training loop alone (steps, evaluations, checkpoints); wall_s: the command
                json.dump({**summary.as_dict(), "wall_s": round(wall, 1)}, f, indent=2, default=str)
        if summary.status == preemption.STATUS:
            print(f"preempted: resume with the same command (exit code {preemption.EXIT_CODE})", file=sys.stderr)
            sys.exit(preemption.EXIT_CODE)
        if summary.status != "finished":
            from unet_dist.errors import UnetDistError

            raise UnetDistError(f"training stopped: {summary.status} (last good checkpoint: {summary.checkpoint})")

    run_main(run)
