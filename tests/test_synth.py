"""The synthetic dataset generator: layouts on disk, determinism, resuming, and scene content."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_dist.synth import ID_COLORS, render_scene, write_dataset
from unet_dist.errors import UnetDistError
from unet_dist.labels import id_to_train_id_lut, palette_colors

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _synth(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet_dist.synth", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_same_seed_gives_identical_bytes_in_process_and_in_a_pool(tmp_path):
    a = write_dataset(tmp_path / "a", "pairs", 3, 2, seed=7, processes=1)
    write_dataset(tmp_path / "b", "pairs", 3, 2, seed=7, processes=2)
    assert a["written"] == 5
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb and len(fa) == 6  # 5 samples + synth.json
    write_dataset(tmp_path / "c", "pairs", 1, 0, seed=8, processes=1)
    assert (tmp_path / "c/train/1.jpg").read_bytes() != fa["train/1.jpg"]


def test_pairs_files_are_side_by_side_jpegs_whose_masks_are_noisy_palette_colours(tmp_path):
    write_dataset(tmp_path, "pairs", 4, 2, seed=0, processes=1)
    files = sorted(tmp_path.glob("*/*.jpg"))
    assert [p.relative_to(tmp_path).as_posix() for p in files] == \
        ["train/1.jpg", "train/2.jpg", "train/3.jpg", "train/4.jpg", "val/1.jpg", "val/2.jpg"]
    palette = palette_colors()[0].astype(np.int32)
    for p in files:
        img = Image.open(p)
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (512, 256))
        mask = np.asarray(img)[:, 256:].reshape(-1, 3).astype(np.int32)
        assert len(np.unique(mask, axis=0)) > 300  # resized + JPEG: far more than the 29 palette colours
        dist = np.sqrt(((mask[:, None, :] - palette[None]) ** 2).sum(-1).min(1))
        assert (dist < 40).mean() > 0.9  # ... yet nearly every pixel is close to one of them


def test_cityscapes_layout_has_three_matching_files_per_sample(tmp_path):
    summary = write_dataset(tmp_path, "cityscapes", 3, 2, seed=0, size=(64, 128), processes=1)
    assert summary == {"layout": "cityscapes", "out": str(tmp_path), "train": 3, "val": 2, "seed": 0,
                       "size": [64, 128], "written": 5, "kept": 0, "removed": 0}
    photos = sorted(tmp_path.glob("leftImg8bit/*/*/*_leftImg8bit.png"))
    assert [p.relative_to(tmp_path).as_posix() for p in photos] == [
        "leftImg8bit/train/synthcity/synthcity_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/synthcity/synthcity_000001_000019_leftImg8bit.png",
        "leftImg8bit/train/testville/testville_000000_000019_leftImg8bit.png",
        "leftImg8bit/val/valburg/valburg_000000_000019_leftImg8bit.png",
        "leftImg8bit/val/valburg/valburg_000001_000019_leftImg8bit.png"]
    for p in photos:
        stem = p.relative_to(tmp_path / "leftImg8bit").as_posix()[: -len("_leftImg8bit.png")]
        photo = Image.open(p)
        color = Image.open(tmp_path / "gtFine" / f"{stem}_gtFine_color.png")
        ids = Image.open(tmp_path / "gtFine" / f"{stem}_gtFine_labelIds.png")
        assert (photo.mode, color.mode, ids.mode) == ("RGB", "RGBA", "L")
        assert photo.size == color.size == ids.size == (128, 64)
        ids_arr, color_arr = np.asarray(ids), np.asarray(color)
        assert np.array_equal(ID_COLORS[ids_arr], color_arr[..., :3])
        assert (color_arr[..., 3] == 255).all()
        assert ids_arr.max() <= 33


def test_scenes_cover_most_train_classes_with_big_classes_dominating():
    lut = id_to_train_id_lut()
    counts = np.zeros(256, np.int64)
    for i in range(20):
        photo, ids = render_scene(np.random.default_rng([0, 0, i]), 128, 128)
        assert photo.shape == (128, 128, 3) and photo.dtype == np.uint8
        assert ids.shape == (128, 128) and ids.dtype == np.uint8
        counts += np.bincount(lut[ids].ravel(), minlength=256)
    present = int((counts[:19] > 0).sum())
    assert present >= 14, f"only {present} train classes in 20 scenes"
    share = counts[:19] / counts.sum()
    assert share[[0, 2, 10, 13]].sum() > 0.5  # road, building, sky, car hold most pixels


def test_photo_colours_are_learned_not_palette_colours():
    """A nearest-palette-colour lookup of the photo names only a small share of pixels right."""
    lut = id_to_train_id_lut()
    colors, train_ids = palette_colors()
    hits = []
    for i in range(8):
        photo, ids = render_scene(np.random.default_rng([3, 0, i]), 96, 96)
        d = ((photo[:, :, None, :].astype(np.int32) - colors[None, None].astype(np.int32)) ** 2).sum(-1)
        guess, truth = train_ids[d.argmin(-1)], lut[ids]
        keep = truth != 255
        hits.append((guess[keep] == truth[keep]).mean())
    assert np.mean(hits) < 0.25


def test_rerun_resumes_and_shrinks_but_refuses_other_settings(tmp_path):
    write_dataset(tmp_path, "pairs", 4, 1, seed=0, processes=1)
    before = _files(tmp_path)
    (tmp_path / "train/2.jpg").unlink()
    (tmp_path / "train/.3.jpg.tmp").write_bytes(b"half a file")  # what a killed run leaves
    s = write_dataset(tmp_path, "pairs", 4, 1, seed=0, processes=1)
    assert (s["written"], s["kept"]) == (1, 4)
    assert _files(tmp_path) == before
    s = write_dataset(tmp_path, "pairs", 2, 1, seed=0, processes=1)
    assert s["removed"] == 2 and sorted(p.name for p in (tmp_path / "train").iterdir()) == ["1.jpg", "2.jpg"]
    with pytest.raises(UnetDistError, match="seed=0"):
        write_dataset(tmp_path, "pairs", 2, 1, seed=1, processes=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("not ours")
    with pytest.raises(UnetDistError, match="no synth.json"):
        write_dataset(tmp_path / "other", "pairs", 1, 0)
    with pytest.raises(UnetDistError, match="pairs layout"):
        write_dataset(tmp_path / "new", "pairs", 1, 0, size=(64, 64))


@pytest.mark.slow  # kills a generator process mid-run
def test_killed_run_leaves_only_whole_files_and_resumes(tmp_path):
    args = ["--layout", "cityscapes", "--out", "cs", "--train", "400", "--val", "0", "--size", "32x64",
            "--processes", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "unet_dist.synth", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(tmp_path.glob("cs/leftImg8bit/train/*/*.png"))) < 20 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for p in (tmp_path / "cs").rglob("*.png"):
        Image.open(p).load()  # every file under a final name is complete
    done = _synth(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "400 train" in done.stdout and "kept" in done.stdout
    photos = list(tmp_path.glob("cs/leftImg8bit/train/*/*_leftImg8bit.png"))
    assert len(photos) == 400
    assert not list((tmp_path / "cs").rglob(".*.tmp"))


def test_cli_reports_a_bad_size_as_one_line(tmp_path):
    proc = _synth("--layout", "cityscapes", "--out", "x", "--size", "256by512", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --size: expected HEIGHTxWIDTH such as 256x512, each 16..4096 "
                                                "pixels, got '256by512' (see python -m unet_dist.synth --help)"]
    assert not (tmp_path / "x").exists()
