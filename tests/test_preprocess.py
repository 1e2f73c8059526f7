"""The preprocess job end to end on generated raw files: shards, determinism, resume, bad input."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from unet_dist.config import load_config
from unet_dist import storage
from unet_dist.data import shards as sh
from unet_dist.synth import write_dataset
from unet_dist.errors import UnetDistError
from unet_dist.labels import IGNORE, id_to_train_id_lut
from unet_dist.preprocess import run

REPO = Path(__file__).resolve().parents[1]


def _cfg(root: Path, out: Path, *extra: str):
    """Source-size samples unless a test asks for a resize (the demo default resizes to 128x128)."""
    return load_config(None, [f"data.root={root}", f"shards.dir={out}", "quantize.sample_pixels=20000",
                              "data.resize=null",
                              "shards.samples_per_shard=8", "shards.processes=2", *extra])


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet_dist.preprocess", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _digests(out: Path) -> dict[str, str]:
    return {p.name: storage.location(p).sha256() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "pairs"
    write_dataset(root, "pairs", 20, 6, seed=0, processes=1)
    return root


@pytest.fixture
def cityscapes(tmp_path) -> Path:
    write_dataset(tmp_path / "cs", "cityscapes", 6, 3, seed=0, size=(64, 128), processes=1)
    return tmp_path / "cs"


def test_shards_read_back_with_webdataset_and_tarfile(pairs, tmp_path):
    out = tmp_path / "shards"
    summary = run(_cfg(pairs, out))
    m = sh.load_manifest(out)
    assert summary["samples"] == {"train": 20, "val": 6} and summary["shards"] == {"train": 3, "val": 1}
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar",
                                                                   "train-000002.tar"]
    assert m["quantizer"]["sha256"] == storage.location(out / "quantizer.json").sha256()
    assert m["image_size"] == [256, 256] and m["label_source"] == "color" and m["skipped"] == []
    assert sum(m["class_pixels"]["train"]) == 20 * 256 * 256 and len(m["class_pixels"]["val"]) == 20
    sh.verify_shards(out, m, "train")
    urls = sh.shard_paths(out, m, "train")

    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"train-{i:06d}" for i in range(20)]
    first = samples[0]
    photo = np.asarray(Image.open(io.BytesIO(first["image.jpg"])))
    label = np.asarray(Image.open(io.BytesIO(first["label.png"])))
    assert photo.shape == (256, 256, 3) and label.shape == (256, 256) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(19)) | {IGNORE}
    assert json.loads(first["json"]) == {"source": "train/1.jpg", "height": 256, "width": 256, "split": "train"}

    with tarfile.open(urls[0]) as tar:
        members = tar.getmembers()
    assert [t.name for t in members[:3]] == ["train-000000.image.jpg", "train-000000.label.png", "train-000000.json"]
    assert all(t.mtime == 0 and t.uid == t.gid == 0 and t.uname == t.gname == "" for t in members)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_two_runs_give_identical_shards_and_manifest_for_any_process_count(pairs, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(_cfg(pairs, a))
    run(_cfg(pairs, b))
    run(_cfg(pairs, c, "shards.processes=1"))
    assert _digests(a) == _digests(b) == _digests(c) and len(_digests(a)) == 4
    assert (a / "quantizer.json").read_bytes() == (b / "quantizer.json").read_bytes()
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    mb["config"]["shards"]["dir"] = str(a)
    assert ma == mb


def test_rerun_keeps_verified_shards_and_rebuilds_missing_or_corrupt_ones(pairs, tmp_path):
    out = tmp_path / "shards"
    run(_cfg(pairs, out))
    before, manifest = _digests(out), (out / "manifest.json").read_bytes()
    (out / "train-000001.tar").unlink()
    with open(out / "val-000000.tar", "r+b") as f:
        f.seek(600)
        f.write(b"XX")
    summary = run(_cfg(pairs, out))
    assert summary["reused_shards"] == 2
    assert _digests(out) == before and (out / "manifest.json").read_bytes() == manifest


@pytest.mark.slow  # kills a preprocess run and its worker processes mid-run
def test_resume_after_killed_run_gives_the_bytes_of_an_uninterrupted_run(pairs, tmp_path):
    out = tmp_path / "shards"
    sets = [f"data.root={pairs}", f"shards.dir={out}", "quantize.sample_pixels=20000",
            "shards.samples_per_shard=1", "shards.processes=2"]
    run(load_config(None, sets))
    reference, manifest = _digests(out), (out / "manifest.json").read_bytes()
    final_size = {p.name: p.stat().st_size for p in out.glob("*.tar")}
    shutil.rmtree(out)

    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "unet_dist.preprocess", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    seen: list[Path] = []
    try:
        while time.time() < deadline and proc.poll() is None:
            seen = list(out.glob("*.tar")) if out.is_dir() else []
            for p in seen:  # a shard under its final name is always complete
                assert p.stat().st_size == final_size[p.name]
            if len(seen) >= 4:  # a few shards in: some have their sidecar record too
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and its pool workers, as a node loss would
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "manifest.json").exists()
    done = _digests(out)
    assert 0 < len(done) < len(reference) and all(reference[k] == v for k, v in done.items())

    res = _cli(*args)
    assert res.returncode == 0, res.stderr
    assert "resuming:" in res.stderr
    assert _digests(out) == reference and (out / "manifest.json").read_bytes() == manifest


def test_truncated_jpeg_fails_with_a_one_line_error_naming_the_file(pairs, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(pairs, raw)
    bad = raw / "train" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:2000])
    res = _cli("--set", f"data.root={raw}", "--set", f"shards.dir={tmp_path / 'out'}",
               "--set", "quantize.sample_pixels=5000", "--set", "shards.processes=1")
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}: cannot decode") and "truncated" in last
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_truncated_jpeg_is_skipped_and_recorded_in_the_manifest(pairs, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(pairs, raw)
    (raw / "train" / "3.jpg").write_bytes((raw / "train" / "3.jpg").read_bytes()[:2000])
    out = tmp_path / "out"
    summary = run(_cfg(raw, out, "data.on_bad_input=skip"))
    m = sh.load_manifest(out)
    assert summary["skipped"] == 1 and m["splits"]["train"]["samples"] == 19
    [rec] = m["skipped"]
    assert rec["path"] == "train/3.jpg" and rec["split"] == "train" and "truncated" in rec["reason"]
    keys = [s["__key__"] for s in wds.WebDataset(sh.shard_paths(out, m, "train"), shardshuffle=False)]
    assert "train-000002" not in keys and len(keys) == 19  # keys keep the source index


def test_every_sample_of_a_split_skipped_is_an_error(pairs, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(pairs, raw)
    for p in (raw / "val").glob("*.jpg"):
        p.write_text("no image")
    with pytest.raises(UnetDistError, match="every sample of split 'val' was skipped"):
        run(_cfg(raw, tmp_path / "out", "data.on_bad_input=skip"))


def test_mask_of_wrong_size_is_skipped_and_recorded(cityscapes, tmp_path):
    color = sorted((cityscapes / "gtFine" / "val").glob("*/*_gtFine_color.png"))[0]
    Image.open(color).resize((32, 16)).save(color)
    out = tmp_path / "out"
    run(_cfg(cityscapes, out, "data.layout=cityscapes", "data.on_bad_input=skip"))
    [rec] = sh.load_manifest(out)["skipped"]
    assert rec["path"] == color.relative_to(cityscapes).as_posix() and "expected the same size" in rec["reason"]


def test_cityscapes_colour_run_records_kmeans_agreement_and_keeps_source_pngs(cityscapes, tmp_path):
    out = tmp_path / "out"
    summary = run(_cfg(cityscapes, out, "data.layout=cityscapes"))
    m = sh.load_manifest(out)
    assert m["kmeans_agreement"] is not None and m["kmeans_agreement"] >= 0.98
    assert summary["kmeans_agreement"] == m["kmeans_agreement"]
    first = next(iter(wds.WebDataset(sh.shard_paths(out, m, "train"), shardshuffle=False)))
    src = json.loads(first["json"])["source"]
    assert first["image.png"] == (cityscapes / src).read_bytes()  # no resize: source bytes as is


def test_labelids_source_maps_ids_exactly_without_kmeans(cityscapes, tmp_path):
    out = tmp_path / "out"
    run(_cfg(cityscapes, out, "data.layout=cityscapes", "data.label_source=labelIds"))
    m = sh.load_manifest(out)
    assert m["quantizer"] is None and m["kmeans_agreement"] is None and not (out / "quantizer.json").exists()
    lut = id_to_train_id_lut()
    for s in wds.WebDataset(sh.shard_paths(out, m, "val"), shardshuffle=False):
        src = json.loads(s["json"])["source"]
        ids_path = cityscapes / src.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelIds")
        expected = lut[np.asarray(Image.open(ids_path))]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["label.png"]))), expected)


def test_resize_reencodes_photos_and_resizes_labels_by_nearest_neighbour(pairs, tmp_path):
    full, small = tmp_path / "full", tmp_path / "small"
    run(_cfg(pairs, full, "data.max_samples=8"))
    run(_cfg(pairs, small, "data.max_samples=8", "data.resize=[64,96]"))
    m = sh.load_manifest(small)
    assert m["image_size"] == [64, 96]
    pairs_of = zip(*(wds.WebDataset(sh.shard_paths(d, sh.load_manifest(d), "val"), shardshuffle=False)
                     for d in (full, small)))
    for big, little in pairs_of:
        assert Image.open(io.BytesIO(little["image.jpg"])).size == (96, 64)
        label = Image.open(io.BytesIO(big["label.png"]))
        expected = np.asarray(label.resize((96, 64), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(little["label.png"]))), expected)


def test_cli_reports_bad_config_and_layout_errors_with_exit_code_2(pairs, tmp_path):
    res = _cli("--help")
    assert res.returncode == 0 and "--config" in res.stdout and "--set" in res.stdout
    res = _cli("--set", "data.bogus=1")
    assert res.returncode == 2 and "data.bogus" in res.stderr
    res = _cli("--set", f"data.root={pairs}", "--set", "data.label_source=labelIds")
    assert res.returncode == 2 and "labelIds" in res.stderr and "cityscapes" in res.stderr
    (tmp_path / "empty").mkdir()
    res = _cli("--set", f"data.root={tmp_path / 'empty'}", "--set", f"shards.dir={tmp_path / 'out'}")
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'empty'}: data.root is empty " \
                                                         "(expected a pairs dataset directory)"


def test_manifest_helpers_name_a_missing_manifest_or_corrupt_shard(pairs, tmp_path):
    with pytest.raises(UnetDistError, match="shards directory not found"):
        sh.load_manifest(tmp_path / "none")
    (tmp_path / "half").mkdir()
    with pytest.raises(UnetDistError, match="manifest not found"):
        sh.load_manifest(tmp_path / "half")
    out = tmp_path / "out"
    run(_cfg(pairs, out, "data.max_samples=8"))
    m = sh.load_manifest(out)
    with pytest.raises(UnetDistError, match="no split 'test'"):
        sh.shard_paths(out, m, "test")
    shard = out / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"!")
    with pytest.raises(UnetDistError, match="val-000000.tar: sha256 .* does not match"):
        sh.verify_shards(out, m, "val")
    shard.unlink()
    with pytest.raises(UnetDistError, match="val-000000.tar: shard listed in the manifest is missing"):
        sh.verify_shards(out, m, "val")
    (out / "manifest.json").write_text("{")
    with pytest.raises(UnetDistError, match="not valid JSON"):
        sh.load_manifest(out)


def test_jpeg_tile_encoding_is_recorded_with_its_pixel_error_and_labels_stay_exact(cityscapes, tmp_path):
    from unet_dist.data.decode import decode_sample

    png, jpeg = tmp_path / "png", tmp_path / "jpeg"
    run(_cfg(cityscapes, png, "data.layout=cityscapes", "data.label_source=labelIds", "shards.photo_encoding=png"))
    run(_cfg(cityscapes, jpeg, "data.layout=cityscapes", "data.label_source=labelIds",
             "shards.photo_encoding=jpeg", "shards.jpeg_quality=90", "shards.photo_tile=[32,64]"))
    m = sh.load_manifest(jpeg)
    assert m["photos"]["encoding"] == "jpeg" and m["photos"]["jpeg_quality"] == 90 and m["photos"]["tile"] == [32, 64]
    assert m["labels"]["encoding"] == "png"
    err = m["photos"]["error_vs_source"]["train"]
    assert 0 < err["mean_abs_error"] < 8 and err["psnr_db"] > 25 and err["values"] == 6 * 64 * 128 * 3
    assert sh.load_manifest(png)["photos"]["error_vs_source"]["train"] is None  # lossless: nothing to report
    both = zip(*(wds.WebDataset(sh.shard_paths(d, sh.load_manifest(d), "train"), shardshuffle=False)
                 for d in (png, jpeg)))
    for exact, tiled in both:
        assert "image.tiles" in tiled and "image.jpg" not in tiled
        a, la, _ = decode_sample(exact)
        b, lb, _ = decode_sample(tiled)
        np.testing.assert_array_equal(la, lb)  # labels lossless whatever the photo encoding
        assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 8


def test_unknown_photo_encoding_is_one_error_naming_the_key(tmp_path):
    with pytest.raises(UnetDistError, match="shards.photo_encoding"):
        load_config(None, ["shards.photo_encoding=webp"])
