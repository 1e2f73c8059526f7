"""The whole pipeline on one machine, on embedded defaults: synthetic street scenes -> preprocess
(KMeans fitted once, WebDataset shards) -> Ray Train with 2 CPU workers -> evaluation -> MLflow.

``python -m unet_dist.demo [--workdir DIR]`` writes everything under DIR (default ./demo-work) and
ends by printing the val mIoU and the ``mlflow ui`` command that shows the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

from unet_dist import cli, ray_address
from unet_dist.config import Config, config_from_args, validate


def place_in(cfg: Config, workdir: Path, overrides: list[str]) -> Config:
    """Put data, shards, checkpoints and (unless told otherwise) the MLflow store under ``workdir``."""
    given = {o.split("=", 1)[0].strip() for o in overrides}
    cfg = dataclasses.replace(cfg)
    if "data.root" not in given:
        cfg.data = dataclasses.replace(cfg.data, root=str(workdir / "data" / "synth"), layout="pairs")
    if "shards.dir" not in given:
        cfg.shards = dataclasses.replace(cfg.shards, dir=str(workdir / "shards"))
    train = {"checkpoint_dir": str(workdir / "checkpoints")} if "train.checkpoint_dir" not in given else {}
    if "train.run_name" not in given:  # a fresh run each time; set train.run_name to resume one
        train["run_name"] = time.strftime("demo-%Y%m%d-%H%M%S")
    cfg.train = dataclasses.replace(cfg.train, **train)
    if not cfg.mlflow.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        store = workdir / "mlflow"  # made when the run starts (tracking.start_run)
        cfg.mlflow = dataclasses.replace(cfg.mlflow, tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return cfg


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = cli.parser("python -m unet_dist.demo", __doc__, config=True)
    parser.add_argument("--workdir", default="demo-work", type=cli.non_empty, metavar="DIR",
                        help="where data, shards, checkpoints and MLflow go")
    parser.add_argument("--train-samples", type=cli.count, default=200, metavar="N", help="synthetic train images, >= 1")
    parser.add_argument("--val-samples", type=cli.count, default=40, metavar="N", help="synthetic val images, >= 1")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    workdir = Path(args.workdir).resolve()
    if workdir.exists() and not workdir.is_dir():
        cli.fail("--workdir", f"{workdir} is a file; expected a folder")
    cfg = place_in(config_from_args(args), workdir, args.overrides)
    validate(cfg, default_origin="--workdir")  # the places the demo chose, checked as a config is
    ray_address.check()
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: demo(*parse(argv)))


def demo(args: argparse.Namespace, cfg: Config) -> None:
    from unet_dist import preprocess
    from unet_dist.data import shards
    from unet_dist.synth import write_dataset
    from unet_dist.scoring import evaluate_model, format_table
    from unet_dist.serving.loading import load_model
    from unet_dist.tracking import is_local_store, log_to_run
    from unet_dist.train import launch
    from unet_dist.train.cli import summary_lines

    import torch

    times: dict[str, float] = {}

    t0 = time.perf_counter()
    if "data.root" not in {o.split("=", 1)[0] for o in args.overrides}:
        print(f"[1/4] synthetic data -> {cfg.data.root}", flush=True)
        write_dataset(cfg.data.root, "pairs", args.train_samples, args.val_samples, seed=cfg.train.seed)
    times["synthetic data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[2/4] preprocess -> {cfg.shards.dir}", flush=True)
    preprocess.run(cfg)
    times["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[3/4] train with Ray Train, {cfg.train.workers} workers", flush=True)
    summary = launch.run_ray(cfg, launched_at=time.time())  # goodput counts from the train stage
    times["train (Ray)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[4/4] evaluate {summary.checkpoint}", flush=True)
    model, _ = load_model(summary.checkpoint)
    manifest = shards.load_manifest(cfg.shards.dir)
    result = evaluate_model(model, shards.shard_paths(cfg.shards.dir, manifest, "val"),
                            batch_size=cfg.train.batch_size, device=torch.device("cpu"))
    uri = cfg.mlflow.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    log_to_run(uri, summary.mlflow_run_id, result, "val", int(summary.steps or 0))
    times["evaluate"] = time.perf_counter() - t0
    print(format_table(result))

    miou = result["scores"]["miou"]
    print("\n".join(["", "demo summary"] + ["  " + line for line in summary_lines(summary, times["train (Ray)"])]))
    for stage, seconds in times.items():
        print(f"  {stage:<15} {seconds:6.1f} s")
    print(f"  total           {sum(times.values()):6.1f} s")
    print(f"\nfinal val mIoU: {miou:.4f}" if not math.isnan(miou) else "\nfinal val mIoU: n/a")
    if is_local_store(uri):
        print(f"look at the run:  mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    else:
        print(f"look at the run:  {uri}")


if __name__ == "__main__":
    main(sys.argv[1:])
