"""Train the U-Net on preprocessed shards, with Ray Train or under torchrun, tracked in MLflow.

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
from typing import TYPE_CHECKING

from unet_dist import cli, devices, ray_address
from unet_dist.config import Config, config_from_args
from unet_dist.distributed import under_torchrun
from unet_dist.errors import UnetDistError

if TYPE_CHECKING:
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
        *goodput_line(summary.goodput),
    ]


def goodput_line(report: dict | None) -> list[str]:
    """One summary line: the goodput and the largest losses (the whole report is in the log and MLflow)."""
    if not report:
        return []
    wall = max(report["wall_s"], 1e-9)
    lost = sorted(((s, k) for k, s in report["seconds"].items() if k != "productive"), reverse=True)[:3]
    return [f"goodput     {report['fraction']:.1%} of {report['wall_s']:.1f} s "
            f"(lost: {', '.join(f'{k} {s / wall:.1%}' for s, k in lost)})"]


def check_environment(cfg: Config, torchrun_ranks: int | None = None) -> None:
    """What the config cannot say alone, checked before any heavy import but the one it needs:
    under torchrun (or for the ``torchrun_ranks`` a jobs/ script is about to start), this machine's
    CUDA for ``train.use_gpu``; under Ray, that ``$RAY_ADDRESS`` answers (the cluster's GPUs are
    checked once Ray is joined, by the launcher)."""
    if under_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        devices.check_torchrun_gpus(cfg.train.use_gpu, local)
    elif torchrun_ranks is not None:
        devices.check_torchrun_gpus(cfg.train.use_gpu, max(1, torchrun_ranks))
    else:
        ray_address.check()


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """Arguments, config and environment, all checked: the part of :func:`main` that can refuse."""
    parser = cli.parser("python -m unet_dist.train", __doc__, config=True)
    parser.add_argument("--summary-json", metavar="FILE", type=cli.non_empty,
                        help="also write the final summary as JSON")
    parser.add_argument("--check", action="store_true",
                        help="run every check (config, this machine, $RAY_ADDRESS), then exit without training")
    parser.add_argument("--torchrun-ranks", type=cli.natural, metavar="N",
                        help="with --check: check this machine for a torchrun launch of N ranks (0: as many as "
                             "torchrun picks) instead of a Ray one; the jobs/torchrun_*.sh scripts do this first")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.torchrun_ranks is not None and not args.check:
        cli.fail("--torchrun-ranks", "only with --check (torchrun itself tells the ranks how many they are)")
    cfg = config_from_args(args)
    check_environment(cfg, args.torchrun_ranks)
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: checked() if (parsed := parse(argv))[0].check else train(*parsed))


def checked() -> None:
    print("checked: the config, this machine and its environment; nothing started")


def train(args: argparse.Namespace, cfg: Config) -> None:
    """Launch the run (heavy imports start here, after every check) and print its summary."""
    from unet_dist.train import launch, preemption

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
        raise UnetDistError(f"training stopped: {summary.status} (last good checkpoint: {summary.checkpoint})")
