"""Evaluate a model on the val shards: per-class IoU table, mIoU, pixel accuracy.

``python -m unet_dist.evaluate --model M --shards DIR`` with M a checkpoint directory (or a run
directory: its latest checkpoint), ``runs:/<id>/model`` or ``models:/<name>/<version>``. Under
torchrun each rank scores a share of the samples (see :mod:`unet_dist.scoring`).

MLflow models are read from ``$MLFLOW_TRACKING_URI``, else from the store training writes by
default (./runs/mlflow/mlflow.db); a store that does not exist is an error, never created.

Example::

    python -m unet_dist.evaluate --model runs/checkpoints/unet-demo --shards shards/demo --device cpu
"""
from __future__ import annotations

import argparse
import json
import sys

from unet_dist import cli, devices, model_source
from unet_dist.distributed import under_torchrun


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Every argument checked, the device and the MLflow store included: the part that can refuse."""
    parser = cli.parser("python -m unet_dist.evaluate", __doc__)
    model_source.add_argument(parser)
    parser.add_argument("--shards", required=True, type=cli.location,
                        help="shards directory with manifest.json: a path or an s3://, gs://, az:// URL")
    parser.add_argument("--split", default="val", choices=["train", "val"], help="which split to score")
    parser.add_argument("--batch-size", type=cli.count, default=8, metavar="N", help="photos per forward pass, >= 1")
    parser.add_argument("--device", type=devices.device_name, default="auto",
                        help=f"{devices.DEVICES}; auto: cuda when present, else cpu")
    parser.add_argument("--log-to-run", metavar="RUN_ID", type=model_source.run_id,
                        help="log the scores to this MLflow run (32 hex digits)")
    parser.add_argument("--step", type=cli.natural, default=0, metavar="N", help="step to log the scores at, >= 0")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.device = devices.resolve(args.device)
    model_source.check(args.model)
    return args


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: evaluate(parse(argv)))


def evaluate(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from unet_dist import labels
    from unet_dist.data import shards
    from unet_dist.distributed import init_torchrun_group
    from unet_dist.scoring import evaluate_model, format_table
    from unet_dist.serving.loading import load_model

    rank, world = 0, 1
    if under_torchrun():  # each rank scores a share; the confusion matrices are summed
        rank, world = init_torchrun_group("nccl" if args.device.startswith("cuda") else "gloo")
    model, cfg = load_model(args.model, args.device)
    manifest = shards.load_manifest(args.shards)
    shards.verify_shards(args.shards, manifest, args.split)
    urls = shards.shard_paths(args.shards, manifest, args.split)
    result = evaluate_model(model, urls, batch_size=args.batch_size, device=torch.device(args.device),
                            rank=rank, world=world)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    s = result["scores"]
    if args.json:
        print(json.dumps({"miou": s["miou"], "pixel_acc": s["pixel_acc"], "mean_acc": s["mean_acc"],
                          "iou": {n: (None if np.isnan(v) else v) for n, v in zip(labels.CLASS_NAMES, s["iou"])},
                          "confusion": result["confusion"].tolist()}))
    else:
        print(format_table(result))
    if args.log_to_run:
        from unet_dist.tracking import log_to_run, resolve_tracking_uri

        log_to_run(resolve_tracking_uri(cfg), args.log_to_run, result, args.split, args.step)


if __name__ == "__main__":
    main(sys.argv[1:])
