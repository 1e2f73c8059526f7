"""KMeans colour quantiser: exact colour table, naming, JSON round trip, agreement with truth."""
from __future__ import annotations

import numpy as np

from unet_dist.data.quantize import Quantizer, color_codes, fit_quantizer, lookup, sample_mask_pixels
from unet_dist.data.sources import list_samples, load_sample
from unet_dist.synth import write_dataset
from unet_dist.labels import IGNORE, id_to_train_id_lut, palette_colors


def _noisy_palette_pixels(n: int, seed: int = 0) -> np.ndarray:
    """Palette colours with JPEG-like noise, as the pairs masks have."""
    rng = np.random.default_rng(seed)
    colors, _ = palette_colors()
    px = colors[rng.integers(0, len(colors), n)].astype(int) + rng.normal(0, 4, (n, 3)).round().astype(int)
    return np.clip(px, 0, 255).astype(np.uint8)


def test_lut_equals_brute_force_nearest_centroid_on_random_colours():
    q = fit_quantizer(_noisy_palette_pixels(8_000), k=32, seed=0, max_distance=40.0)
    colors = np.random.default_rng(1).integers(0, 256, (10_000, 3), dtype=np.uint8)
    d2 = ((colors[:, None, :].astype(np.float64) - q.centroids[None]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    expected = np.where(d2.min(1) > 40.0 ** 2, IGNORE, q.train_ids[nearest])
    lut = q.build_lut()
    got = lut[color_codes(colors)]
    assert (expected == IGNORE).any() and (expected != IGNORE).any()  # both branches exercised
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(lookup(lut, colors.reshape(100, 100, 3)), expected.reshape(100, 100))


def test_clusters_are_named_by_nearest_palette_colour_or_ignore():
    q = fit_quantizer(_noisy_palette_pixels(8_000), k=32, seed=0, max_distance=60.0)
    colors, train_ids = palette_colors()
    for cent, tid, dist in zip(q.centroids, q.train_ids, q.distances):
        d = np.sqrt(((colors.astype(float) - cent) ** 2).sum(1))
        assert abs(d.min() - dist) < 1e-3
        assert tid == (train_ids[d.argmin()] if dist <= 60.0 else IGNORE)
    # a pure palette colour maps to its class; a colour far from every cluster to ignore
    road = np.array([[[128, 64, 128]]], dtype=np.uint8)
    assert lookup(q.build_lut(), road)[0, 0] == 0
    tight = fit_quantizer(np.array([[128, 64, 128]] * 10, dtype=np.uint8), k=4, seed=0, max_distance=10.0)
    assert len(tight.centroids) == 1  # fewer distinct colours than k
    assert lookup(tight.build_lut(), np.array([[[128, 64, 128], [0, 255, 0]]], dtype=np.uint8)).tolist() == [[0, IGNORE]]


def test_fit_is_seeded_and_json_round_trips_exactly():
    px = _noisy_palette_pixels(8_000)
    a = fit_quantizer(px, k=24, seed=3, max_distance=60.0)
    b = fit_quantizer(px, k=24, seed=3, max_distance=60.0)
    assert a.to_json() == b.to_json()
    c = Quantizer.from_json(a.to_json())
    assert c.to_json() == a.to_json()
    lut = a.build_lut()
    np.testing.assert_array_equal(c.build_lut(), lut)
    assert lut.shape == (1 << 24,) and lut.dtype == np.uint8


def test_kmeans_labels_agree_with_true_train_ids_on_synthetic_cityscapes(tmp_path):
    write_dataset(tmp_path, "cityscapes", 6, 2, seed=0, size=(128, 256), processes=1)
    samples = list_samples(tmp_path, "cityscapes", "color")
    decoded = [load_sample(tmp_path, s, "color", want_truth=True) for s in samples["train"] + samples["val"]]
    rng = np.random.default_rng(0)
    px = np.concatenate([sample_mask_pixels(d.mask, 5000, rng) for d in decoded[:6]])
    q = fit_quantizer(px, k=32, seed=0, max_distance=60.0)
    id_lut = id_to_train_id_lut()
    lut = q.build_lut()
    same = sum(int((lookup(lut, d.mask) == id_lut[d.truth]).sum()) for d in decoded)
    total = sum(d.truth.size for d in decoded)
    assert same / total >= 0.98
