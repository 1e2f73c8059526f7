"""Scoring a model on shards: the confusion matrix summed over ranks, its scores and table, and
logging them to an existing MLflow run. The training loop, the ``evaluate`` CLI and the demo all
call :func:`evaluate_model`, so every number is computed one way.

Every rank scores a disjoint share of the samples and the confusion matrices are summed, so the
result is the same for any world size.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from unet_dist import labels
from unet_dist.data.stream import eval_batches
from unet_dist.segment import predict_logits
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
