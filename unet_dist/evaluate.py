"""Evaluate a model on the val shards: per-class IoU table, mIoU, pixel accuracy.

``python -m unet_dist.evaluate --model M --shards DIR`` with M a checkpoint directory (or a run
directory: its latest checkpoint), ``runs:/<id>/model`` or ``models:/<name>/<version>``. Under
torchrun each rank scores a share of the samples (see :mod:`unet_dist.scoring`).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from unet_dist import labels
from unet_dist.cli import run_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet_dist.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint dir, run dir, runs:/... or models:/...")
    parser.add_argument("--shards", required=True, help="shards directory (with manifest.json)")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-to-run", metavar="RUN_ID", help="log the scores to this MLflow run")
    parser.add_argument("--step", type=int, default=0, help="step to log the scores at")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = parser.parse_args(argv)

    def run() -> None:
        import torch.distributed as dist

        from unet_dist.data import shards
        from unet_dist.distributed import init_torchrun_group, under_torchrun
        from unet_dist.scoring import evaluate_model, format_table
        from unet_dist.serving.loading import load_model

        from unet_dist import storage

        shards_dir = storage.location(args.shards)  # a mistyped URL (s3:/bucket) ends here, in one line
        rank, world = 0, 1
        if under_torchrun():  # each rank scores a share; the confusion matrices are summed
            rank, world = init_torchrun_group("nccl" if args.device.startswith("cuda") else "gloo")
        model, cfg = load_model(args.model, args.device)
        manifest = shards.load_manifest(shards_dir)
        shards.verify_shards(shards_dir, manifest, args.split)
        urls = shards.shard_paths(shards_dir, manifest, args.split)
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

    run_main(run)


if __name__ == "__main__":
    main(sys.argv[1:])
