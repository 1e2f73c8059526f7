"""The training loss: class-weighted cross-entropy, plus a soft Dice term that scores classes the way
mIoU does. Pixels labelled IGNORE count in neither."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet_dist import labels
from unet_dist.errors import UnetDistError
from unet_dist.labels import IGNORE
from unet_dist.losses import SegmentationLoss, class_weights, soft_dice

N = 5


def test_class_weights_favour_rare_classes_and_average_one_over_present_classes():
    counts = [0] * labels.NUM_CLASSES
    counts[0], counts[1], counts[2] = 1_000_000, 10_000, 100
    w = class_weights({"class_pixels": {"train": counts + [555]}})  # the ignore count is left out
    assert w.shape == (labels.NUM_CLASSES,) and w.dtype == torch.float32
    assert w[2] > w[1] > w[0]
    assert float(w[:3].mean()) == pytest.approx(1.0)
    p = np.array(counts[:3]) / sum(counts)
    raw = 1 / np.log(1.02 + p)
    assert w[:3].numpy() == pytest.approx(raw / raw.mean(), rel=1e-6)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, N, 6, 7, generator=g)
    target = torch.randint(0, N, (2, 6, 7), generator=g)
    target[0, :2] = IGNORE
    return logits, target


def _dice_one_hot(probs, target):
    """The textbook form: one-hot maps, sums over batch and pixels, mean over present classes."""
    valid = (target != IGNORE).unsqueeze(1).float()
    onehot = F.one_hot(target.clamp(0, N - 1), N).permute(0, 3, 1, 2).float() * valid
    probs = probs * valid
    inter, p, y = (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)), onehot.sum((0, 2, 3))
    dice = (2 * inter + 1) / (p + y + 1)
    return dice[y > 0].mean()


def test_without_dice_the_loss_is_the_weighted_cross_entropy_over_labelled_pixels():
    logits, target = _batch()
    weight = torch.linspace(0.5, 2.0, N)
    want = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    assert torch.allclose(SegmentationLoss(weight, dice=0.0)(logits, target), want)


def test_soft_dice_equals_the_one_hot_formula_over_the_classes_present():
    logits, target = _batch(1)
    target[target == 3] = 4  # class 3 absent: it must not count
    probs = logits.softmax(1)
    assert torch.allclose(soft_dice(probs, target), _dice_one_hot(probs, target))


def test_a_perfect_prediction_has_dice_one_and_the_term_adds_nothing():
    _, target = _batch(2)
    logits = 50 * F.one_hot(target.clamp(0, N - 1), N).permute(0, 3, 1, 2).float()
    assert soft_dice(logits.softmax(1), target).item() == pytest.approx(1.0, abs=1e-4)
    with_dice, ce_only = SegmentationLoss(dice=1.0)(logits, target), SegmentationLoss(dice=0.0)(logits, target)
    assert with_dice.item() == pytest.approx(ce_only.item(), abs=1e-4)


def test_ignored_pixels_change_neither_term():
    logits, target = _batch(3)
    loss = SegmentationLoss(dice=1.0)
    other = logits.clone()
    other[0, :, :2] = torch.randn(N, 2, 7)  # new scores for exactly the ignored pixels (row 0, rows :2)
    assert torch.allclose(loss(logits, target), loss(other, target))


def test_dice_term_gradients_flow_to_every_logit_of_labelled_pixels():
    logits, target = _batch(4)
    logits.requires_grad_(True)
    SegmentationLoss(dice=1.0)(logits, target).backward()
    grad = logits.grad.abs().sum(1)
    assert (grad[target != IGNORE] > 0).all() and (grad[target == IGNORE] == 0).all()


def test_a_negative_dice_weight_is_refused_naming_the_key():
    with pytest.raises(UnetDistError, match=r"train\.dice must be >= 0"):
        SegmentationLoss(dice=-0.5)


def test_a_negative_dice_weight_stops_the_job_in_preflight_before_anything_starts(tmp_path):
    import dataclasses

    from unet_dist.config import load_config
    from unet_dist.train.launch import preflight

    with pytest.raises(UnetDistError, match=r"^--set train\.dice: key 'train\.dice' must be >= 0, got -1$"):
        load_config(None, ["train.dice=-1"])
    cfg = load_config(None, [f"shards.dir={tmp_path / 'none'}"])  # no shards: the config is checked first
    cfg.train = dataclasses.replace(cfg.train, dice=-1.0)  # a config built in code
    with pytest.raises(UnetDistError, match=r"^config: key 'train\.dice' must be >= 0, got -1$"):
        preflight(cfg)
