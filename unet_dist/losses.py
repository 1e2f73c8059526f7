"""Training losses. Cross-entropy scores pixels; mIoU, the metric we report, scores classes, so a
rare class's few pixels count as much as the road's many. ``train.dice`` > 0 adds a soft Dice term
(one per class, averaged over the classes in the batch) that optimises that class-level overlap
directly; on the demo it adds ~0.02-0.03 val mIoU at the same step (docs/input_pipeline.md).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unet_dist import labels
from unet_dist.errors import UnetDistError


def class_weights(manifest: dict) -> torch.Tensor:
    """Weights 1 / ln(1.02 + p_c) from the train pixel histogram (rare classes weigh more, bounded)."""
    counts = np.asarray(manifest["class_pixels"]["train"][: labels.NUM_CLASSES], dtype=np.float64)
    p = counts / max(1.0, counts.sum())
    w = 1.0 / np.log(1.02 + p)
    return torch.tensor(w / w[counts > 0].mean() if (counts > 0).any() else w, dtype=torch.float32)


def check_dice(dice: float) -> None:
    """``train.dice`` is a weight: the launchers call this before any worker starts."""
    if dice < 0:
        raise UnetDistError(f"train.dice must be >= 0 (the weight of the Dice term), got {dice}")


class SegmentationLoss(torch.nn.Module):
    """Cross-entropy (optionally class-weighted), plus ``dice`` x (1 - mean soft Dice) when ``dice`` > 0.
    Pixels labelled ``labels.IGNORE`` count in neither term. One log-softmax serves both terms."""

    def __init__(self, weight: torch.Tensor | None = None, dice: float = 0.0, eps: float = 1.0):
        super().__init__()
        check_dice(dice)
        self.register_buffer("weight", weight)
        self.dice, self.eps = dice, eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = logits.float().log_softmax(1)
        loss = F.nll_loss(log_probs, target, weight=self.weight, ignore_index=labels.IGNORE)
        if self.dice > 0:
            loss = loss + self.dice * (1 - soft_dice(log_probs.exp(), target, self.eps))
        return loss


def soft_dice(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over the classes present in ``target`` of 2|P∩Y| / (|P| + |Y|), with the softmax
    probabilities ``probs`` (B, C, H, W) as P. Per-class sums are scatter-adds over the labels (no
    one-hot map) and nothing is read on the host (no sync on a GPU)."""
    n = probs.shape[1]
    valid = (target != labels.IGNORE).unsqueeze(1).to(probs.dtype)
    cls = target.clamp(0, n - 1).unsqueeze(1)  # IGNORE pixels land in some class with weight 0
    probs = probs * valid
    size_p = probs.sum((0, 2, 3))
    inter = probs.new_zeros(n).scatter_add(0, cls.flatten(), probs.gather(1, cls).flatten())
    size_y = probs.new_zeros(n).scatter_add(0, cls.flatten(), valid.flatten())
    dice = (2 * inter + eps) / (size_p + size_y + eps)
    present = (size_y > 0).to(dice.dtype)
    return (dice * present).sum() / present.sum().clamp(min=1)
