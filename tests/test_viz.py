"""Logged pictures: expected sizes, and the Cityscapes palette colours where the classes are."""
from __future__ import annotations

import numpy as np
import torch

from unet_dist import viz
from unet_dist.labels import CLASS_NAMES, IGNORE, LABELS, NUM_CLASSES, palette_colors, train_id_palette


def _colors(image) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3).tolist()}


def test_prediction_grid_has_three_panels_per_row_in_the_palette():
    n, h, w = 6, 40, 60
    images = np.full((n, h, w, 3), 127, dtype=np.uint8)
    labels = np.zeros((n, h, w), dtype=np.uint8)  # road everywhere
    labels[:, :10] = IGNORE
    preds = torch.full((n, h, w), 13)  # car everywhere, as a tensor straight from the model
    grid = viz.prediction_grid(images, labels, preds, max_rows=4, title="step 7")
    assert grid.size == (3 * w + 2 * viz.GAP, viz.HEADER + 4 * h + 3 * viz.GAP)
    px = np.asarray(grid)
    palette = train_id_palette()
    y = viz.HEADER + h - 1  # last line of the first row
    assert tuple(px[y, 5]) == (127, 127, 127)
    assert tuple(px[y, w + viz.GAP + 5]) == tuple(palette[0])  # road
    assert tuple(px[viz.HEADER + 2, w + viz.GAP + 5]) == (0, 0, 0)  # ignore is black
    assert tuple(px[y, 2 * (w + viz.GAP) + 5]) == tuple(palette[13])  # car


def test_overlay_blends_classes_and_leaves_ignore_as_photo():
    photo = np.full((4, 4, 3), 100, dtype=np.uint8)
    ids = np.zeros((4, 4), dtype=np.uint8)
    ids[0, 0] = IGNORE
    out = viz.overlay(photo, ids, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[1, 1]) == tuple(np.round((np.array([100] * 3) + train_id_palette()[0]) / 2).astype(int))


def test_confusion_heatmap_shows_rows_normalised_on_a_colour_scale():
    conf = np.eye(NUM_CLASSES, dtype=np.int64) * 50
    conf[0, 1] = 50  # road: half right, half sidewalk
    conf[5] = 0  # no true pole pixels: grey row
    image = viz.confusion_heatmap(conf, CLASS_NAMES, cell=22)
    assert image.width > NUM_CLASSES * 22 and image.height > NUM_CLASSES * 22
    colors = _colors(image)
    for value in (1.0, 0.5, 0.0):  # full diagonal, the half row, empty cells
        assert tuple(viz.colormap(np.array(value)).tolist()) in colors
    assert (200, 200, 200) in colors


def test_quantizer_picture_has_one_swatch_per_centroid_and_its_palette_colour():
    colors, train_ids = palette_colors()
    names = {}
    for lab in LABELS:
        names.setdefault(lab.color, lab.name)
    quantizer = {
        "k": len(colors), "seed": 0, "sample_pixels": 10,
        "centroids": (colors.astype(float) + 0.4).tolist(),
        "train_ids": train_ids.tolist(),
        "names": [names[tuple(c)] for c in colors.tolist()],
        "distances": [0.7] * len(colors),
    }
    image = viz.quantizer_picture(quantizer)
    assert image.size == (420, viz.HEADER + len(colors) * 18)
    seen = _colors(image)
    assert all(tuple(c) in seen for c in colors.tolist())
    assert viz.WARN in seen  # ignore centroids are marked
