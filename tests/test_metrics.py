"""Confusion matrix and scores: exact counts, ignore handling, and rank-split independence."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unet_dist.metrics import confusion_matrix, scores


def _brute_force(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> np.ndarray:
    conf = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != ignore:
            conf[t, p] += 1
    return conf


def test_confusion_matrix_equals_a_numpy_brute_force():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (3, 17, 23))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, 5, target.shape)
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8), 5)
    assert conf.dtype == torch.int64
    np.testing.assert_array_equal(conf.numpy(), _brute_force(pred, target, 5, 255))


def test_ignore_pixels_are_skipped():
    target = torch.tensor([[0, 255, 1], [255, 255, 2]])
    pred = torch.tensor([[0, 2, 1], [1, 0, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.sum() == 3
    assert conf.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_a_class_id_out_of_range_is_refused_not_miscounted():
    with pytest.raises(ValueError, match="0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 1]), 3)


def test_miou_on_a_hand_computed_example():
    # truth:  0 0 0 1 1 2      pred: 0 0 1 1 2 2
    conf = confusion_matrix(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 2]), 3)
    s = scores(conf)
    # IoU0 = 2 / (3 + 2 - 2) = 2/3; IoU1 = 1 / (2 + 2 - 1) = 1/3; IoU2 = 1 / (1 + 2 - 1) = 1/2
    assert s["iou"] == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    assert s["mean_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_classes_absent_from_truth_and_prediction_are_nan_and_left_out():
    conf = confusion_matrix(torch.tensor([0, 0, 3]), torch.tensor([0, 1, 3]), 5)
    s = scores(conf)
    assert math.isnan(s["iou"][2]) and math.isnan(s["iou"][4])
    assert s["iou"][1] == 0.0  # present in truth, never predicted: counts as 0, not NaN
    assert s["miou"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert math.isnan(scores(torch.zeros(3, 3, dtype=torch.int64))["miou"])
