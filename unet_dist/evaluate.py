"""Evaluate a model on the val shards: per-class IoU table, mIoU, pixel accuracy.

``python -m unet_dist.evaluate --model M --shards DIR`` with M a checkpoint directory (or a run
directory: its latest checkpoint), ``runs:/<id>/model`` or ``models:/<name>/<version>``.
:func:`evaluate_model` is also what the training loop calls: every rank scores a disjoint share of
the samples and the confusion matrices are summed, so the result is the same for any world size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from unet_dist import labels
from unet_dist.cli import run_main
from unet_dist.data import shards
from unet_dist.data.loader import eval_batches
from unet_dist.inference import predict_logits
from unet_dist.metrics import confusion_matrix, scores


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, urls: list[str], *, batch_size: int, device: torch.device,
                   dtype: torch.dtype | None = None, rank: int = 0, world: int = 1, limit: int = 0,
                   keep_examples: int = 0) -> dict:
    """Scores over this rank's share of ``urls``, summed across ranks when ``world`` > 1."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(labels.NUM_CLASSES, labels.NUM_CLASSES, dtype=torch.int64, device=device)
    examples: dict[str, list] = {"images": [], "labels": [], "preds": []}
    for images, target, raw in eval_batches(urls, batch_size, rank=rank, world=world, limit=limit):
        images, target = images.to(device), target.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = predict_logits(model, images)
        pred = logits.argmax(1)
        conf += confusion_matrix(pred, target, labels.NUM_CLASSES, labels.IGNORE)
        room = keep_examples - len(examples["images"])
        if room > 0:
            examples["images"] += list(raw[:room])
            examples["labels"] += list(target[:room].cpu().numpy().astype(np.uint8))
            examples["preds"] += list(pred[:room].cpu().numpy().astype(np.uint8))
    if world > 1:
        dist.all_reduce(conf, op=dist.ReduceOp.SUM)
    model.train(was_training)
    conf_np = conf.cpu().numpy()
    ex = {k: np.stack(v) for k, v in examples.items()} if examples["images"] else None
    return {"scores": scores(conf_np), "confusion": conf_np, "examples": ex}


def format_table(result: dict) -> str:
    s = result["scores"]
    rows = [f"{'class':<15} {'IoU':>7}", "-" * 23]
    for name, iou in zip(labels.CLASS_NAMES, s["iou"]):
        rows.append(f"{name:<15} {'   n/a' if np.isnan(iou) else f'{iou:7.4f}'}")
    rows += ["-" * 23, f"{'mIoU':<15} {s['miou']:7.4f}", f"{'pixel acc':<15} {s['pixel_acc']:7.4f}",
             f"{'mean acc':<15} {s['mean_acc']:7.4f}"]
    return "\n".join(rows)


def log_to_run(tracking_uri: str, run_id: str, result: dict, split: str, step: int) -> None:
    """Log an evaluation to an existing run (scores, table, confusion heatmap), leaving its status."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from unet_dist import viz

    s = result["scores"]
    values = {f"eval/{split}_miou": s["miou"], f"eval/{split}_pixel_acc": s["pixel_acc"],
              **{f"eval_iou/{n}": v for n, v in zip(labels.CLASS_NAMES, s["iou"]) if not np.isnan(v)}}
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
    client.log_text(run_id, format_table(result), f"eval/{split}_table.txt")
    client.log_image(run_id, viz.confusion_heatmap(result["confusion"], labels.CLASS_NAMES),
                     f"eval/{split}_confusion.png")


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
        from unet_dist.model_io import load_model

        from unet_dist.train.launch import under_torchrun

        rank, world = 0, 1
        if under_torchrun():  # each rank scores a share; the confusion matrices are summed

            from unet_dist.train.interfaces import pin_for_torchrun

            pin_for_torchrun()
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
            rank, world = dist.get_rank(), dist.get_world_size()
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
            from unet_dist.tracking import resolve_tracking_uri

            log_to_run(resolve_tracking_uri(cfg), args.log_to_run, result, args.split, args.step)

    run_main(run)


if __name__ == "__main__":
    main(sys.argv[1:])
