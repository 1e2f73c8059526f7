"""Segmentation metrics from an int64 confusion matrix, accumulated on device and summed across ranks.

Counts are exact integers, so the scores do not depend on how the data was split across ranks or
batches: summing confusion matrices is the same as computing one over all pixels.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from unet_dist.labels import IGNORE


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = IGNORE
) -> torch.Tensor:
    """``[K, K]`` int64 counts on the tensors' device: row = true class, column = predicted class.

    Pixels whose target is ``ignore`` are skipped. Any other value outside ``0..K-1`` (in pred or
    target) is a bug upstream and raises instead of being miscounted.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    k = num_classes
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore
    target, pred = target[keep], pred[keep]
    if target.numel():
        bounds = torch.stack([target.min(), pred.min(), target.max(), pred.max()])
        t_min, p_min, t_max, p_max = bounds.tolist()  # one device sync for all four
        if min(t_min, p_min) < 0 or max(t_max, p_max) >= k:
            raise ValueError(f"class ids must lie in 0..{k - 1} (or {ignore} in target): "
                             f"target {t_min}..{t_max}, pred {p_min}..{p_max}")
    return torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)


def scores(conf: torch.Tensor | np.ndarray) -> dict:
    """mIoU, per-class IoU and accuracies from a confusion matrix (rows = truth, columns = prediction).

    A class with union 0 (absent from both truth and prediction) has IoU NaN and is left out of the
    mean, as is a class absent from the truth for ``mean_acc``. Values are plain floats / lists.
    """
    c = (conf.detach().cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(conf)).astype(np.float64)
    tp = np.diag(c)
    truth, predicted = c.sum(axis=1), c.sum(axis=0)
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        class_acc = np.where(truth > 0, tp / truth, np.nan)
    total = c.sum()

    def nanmean(a: np.ndarray) -> float:
        return float(a[~np.isnan(a)].mean()) if (~np.isnan(a)).any() else math.nan

    return {
        "miou": nanmean(iou),
        "iou": [float(v) for v in iou],
        "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_acc": nanmean(class_acc),
        "class_acc": [float(v) for v in class_acc],
        "pixels": int(total),
    }
