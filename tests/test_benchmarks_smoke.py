"""Every benchmark script runs with --quick and prints its tables (medians with a ratio column)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench_synth.py", "bench_preprocess.py", "bench_loader.py", "loader_sizing.py", "bench_storage.py", "bench_train.py",
           "bench_launchers.py", "bench_onnx.py", "gpu.py"]


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """One data cache for all scripts: the tiny synthetic set is generated once."""
    return tmp_path_factory.mktemp("bench-cache")


def run_quick(script: str, cache: Path) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--cache", str(cache)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow  # runs each benchmark: preprocess pools, training, Ray and torchrun
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "gpu.py"])
def test_quick_run_prints_median_table_with_ratio_column(script, bench_cache):
    out = run_quick(script, bench_cache)
    assert "## " in out and "machine: " in out and "load average" in out
    assert "| case | median " in out and "| min – max | n | ×" in out  # medians + ratio to a baseline
    rows = [line for line in out.splitlines() if line.startswith("| ") and "case" not in line]
    assert rows, out
    assert "Ratios (medians of this run):" in out


@pytest.mark.slow  # trains a paper-size U-Net step in a subprocess
def test_gpu_script_without_cuda_prints_flops_and_skip_line(bench_cache):
    import torch

    out = run_quick("gpu.py", bench_cache)
    assert "| forward + backward (one training image) |" in out
    if not torch.cuda.is_available():
        assert "no CUDA device: skipped" in out
    else:
        assert "| bf16 + channels_last |" in out


@pytest.mark.slow  # starts `mlflow models serve`
def test_serving_benchmark_quick_run_compares_http_with_in_process(bench_cache):
    out = run_quick("bench_serving.py", bench_cache)
    assert "| HTTP |" in out and "| in-process |" in out and "p95 " in out
    assert "serving overhead, one photo: HTTP / in-process latency" in out


def test_run_all_rejects_an_unknown_benchmark_name():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--only", "nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown nope" in proc.stderr


# The speed fixes the benchmarks led to keep their results: checked against the plain formulas.


def _reference_augment(image, label, crop, scale_range, rng):
    """Full-size resize, then crop (the straightforward way); labels by pixel-centre nearest."""
    import math
    from fractions import Fraction

    import numpy as np
    from PIL import Image

    h, w = label.shape
    s = rng.uniform(*scale_range)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    y, x = int(rng.integers(0, nh - crop[0] + 1)), int(rng.integers(0, nw - crop[1] + 1))
    photo = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))[y:y + crop[0], x:x + crop[1]]
    rows = np.array([math.floor(Fraction(2 * i + 1, 2 * nh) * h) for i in range(y, y + crop[0])])  # exact
    cols = np.array([math.floor(Fraction(2 * i + 1, 2 * nw) * w) for i in range(x, x + crop[1])])
    return photo, label[rows[:, None], cols]


def test_crop_first_augment_matches_full_resize_then_crop():
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from baseline_pipeline import Augment, augment  # the CPU augment the loader benchmark compares against

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (120, 160), dtype=np.uint8)
    aug = Augment(crop=(40, 64), scale=(0.6, 1.6), flip=False)
    for seed in range(40):
        got = augment(image, label, aug, np.random.default_rng(seed))
        want = _reference_augment(image, label, aug.crop, aug.scale, np.random.default_rng(seed))
        assert got[0].shape == want[0].shape == (40, 64, 3) and got[1].shape == (40, 64)
        assert np.abs(got[0].astype(int) - want[0]).max() <= 2  # float rounding of sample positions
        np.testing.assert_array_equal(got[1], want[1])


def test_fast_normalize_and_colour_codes_equal_the_plain_formulas():
    import numpy as np
    import torch

    from unet_dist.data.decode import MEAN, STD, normalize
    from unet_dist.data.quantize import color_codes, lookup

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)[:, ::-1]  # a flipped view, as augment returns
    want = torch.from_numpy(((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1).copy())
    assert torch.equal(normalize(image), want)
    c = image.astype(np.uint32)
    np.testing.assert_array_equal(color_codes(image), (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2])
    lut = rng.integers(0, 256, 2**24, dtype=np.uint8)
    np.testing.assert_array_equal(lookup(lut, image), lut[color_codes(image)])
