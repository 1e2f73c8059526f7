"""Train the U-Net: ``python -m unet_dist.train --config FILE [--set key=value ...]``.

Under torchrun (its RANK/WORLD_SIZE/LOCAL_RANK variables are set) every rank runs the loop with
torch.distributed; otherwise a Ray Train TorchTrainer runs it on ``$RAY_ADDRESS`` or a local Ray.
Relaunching with the same ``train.run_name`` and ``train.checkpoint_dir`` resumes the run.

Examples::

    python -m unet_dist.train --config jobs/configs/demo.yaml --set train.steps=200
    RAY_ADDRESS=10.0.0.1:6379 python -m unet_dist.train --config jobs/configs/pairs.yaml
    torchrun --standalone --nproc-per-node=2 -m unet_dist.train --config jobs/configs/smoke.yaml

The config, ``$RAY_ADDRESS`` (it must answer within a few seconds) and, under torchrun,
``train.use_gpu`` against this machine's CUDA are checked before anything starts: a mistake is one
``error:`` line and exit code 2, and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from unet_dist import cli, devices, ray_address
from unet_dist.config import Config, config_from_args
from unet_dist.distributed import under_torchrun
from unet_dist.errors import UnetDistError


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
    ]


def check_environment(cfg: Config) -> None:
    """What the config cannot say alone, checked before any heavy import but the one it needs:
    under torchrun, this machine's CUDA for ``train.use_gpu``; under Ray, that ``$RAY_ADDRESS``
    answers (the cluster's GPUs are checked once Ray is joined, by the launcher)."""
    if under_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        devices.check_torchrun_gpus(cfg.train.use_gpu, local)
    else:
        ray_address.check()


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """Arguments, config and environment, all checked: the part of :func:`main` that can refuse."""
    parser = cli.parser("python -m unet_dist.train", __doc__, config=True)
    parser.add_argument("--summary-json", metavar="FILE", type=cli.non_empty,
                        help="also write the final summary as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    check_environment(cfg)
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: train(*parse(argv)))


def train(args: argparse.Namespace, cfg: Config) -> None:
    """Launch the run (heavy imports start here, after every check) and print its summary."""
    from unet_dist.train import launch, preemption

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
        raise UnetDistError(f"training stopped: {summary.get('status')} (last good checkpoint: {summary.get('checkpoint')})")
