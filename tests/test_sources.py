"""Raw layout readers on generated files: ordering, decoding, and bad input named clearly."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_dist.data.sources import BadInput, list_samples, load_sample
from unet_dist.synth import write_dataset
from unet_dist.errors import UnetDistError


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Both layouts, generated once; each test works on its own copy."""
    root = tmp_path_factory.mktemp("raw")
    write_dataset(root / "pairs", "pairs", 11, 2, seed=0, processes=1)
    write_dataset(root / "cs", "cityscapes", 3, 2, seed=0, size=(64, 128), processes=1)
    return root


@pytest.fixture
def pairs(raw, tmp_path) -> Path:
    return Path(shutil.copytree(raw / "pairs", tmp_path / "pairs"))


@pytest.fixture
def cityscapes(raw, tmp_path) -> Path:
    return Path(shutil.copytree(raw / "cs", tmp_path / "cs"))


def test_pairs_reader_orders_numerically_and_splits_photo_from_mask(pairs):
    samples = list_samples(pairs, "pairs")
    names = [s.photo for s in samples["train"]]
    assert names == [f"train/{i}.jpg" for i in range(1, 12)]  # 2.jpg before 10.jpg
    assert [s.index for s in samples["train"]] == list(range(11))
    assert [s.split for s in samples["val"]] == ["val", "val"]
    whole = np.asarray(Image.open(pairs / "train" / "1.jpg").convert("RGB"))
    dec = load_sample(pairs, samples["train"][0])
    assert dec.photo.shape == (256, 256, 3) and dec.mask.shape == (256, 256, 3)
    assert dec.photo.dtype == np.uint8 and dec.mask.dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate([dec.photo, dec.mask], 1), whole)
    assert dec.photo_bytes is None and dec.notes == []


def test_cityscapes_reader_pairs_photos_with_colour_and_labelids_masks(cityscapes):
    samples = list_samples(cityscapes, "cityscapes", "labelIds")
    s = samples["train"][0]
    assert s.photo.startswith("leftImg8bit/train/") and s.photo.endswith("_leftImg8bit.png")
    assert s.color == s.photo.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_color")
    assert [x.photo for x in samples["train"]] == sorted(x.photo for x in samples["train"])
    ids = load_sample(cityscapes, s, "labelIds")
    assert ids.mask.ndim == 2 and ids.photo.shape == ids.mask.shape + (3,)
    assert ids.photo_bytes == (cityscapes / s.photo).read_bytes() and ids.photo_ext == "png"
    col = load_sample(cityscapes, s, "color", want_truth=True)
    assert col.mask.shape == col.photo.shape  # RGBA colour masks come back as RGB
    np.testing.assert_array_equal(col.truth, ids.mask)


def test_labelids_with_pairs_layout_is_an_error(pairs):
    with pytest.raises(UnetDistError, match="labelIds.*cityscapes"):
        list_samples(pairs, "pairs", "labelIds")


def test_missing_or_empty_input_directory_is_an_error(tmp_path):
    with pytest.raises(UnetDistError, match="not found"):
        list_samples(tmp_path / "nope", "pairs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnetDistError, match="empty"):
        list_samples(tmp_path / "empty", "pairs")
    (tmp_path / "empty" / "train").mkdir()
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(UnetDistError, match="no .jpg files in split 'train'"):
        list_samples(tmp_path / "empty", "pairs")


def test_truncated_and_non_image_files_are_bad_input_naming_the_file(pairs):
    one = pairs / "train" / "1.jpg"
    one.write_bytes(one.read_bytes()[:3000])
    (pairs / "train" / "2.jpg").write_text("not a picture")
    samples = list_samples(pairs, "pairs")["train"]
    with pytest.raises(BadInput, match=r"1\.jpg: cannot decode .*truncated") as e:
        load_sample(pairs, samples[0])
    assert e.value.path == str(one) and "\n" not in str(e.value)
    with pytest.raises(BadInput, match=r"2\.jpg: cannot decode .*not an image"):
        load_sample(pairs, samples[1])


def test_pairs_image_that_is_not_two_to_one_is_bad_input(pairs):
    Image.new("RGB", (256, 256)).save(pairs / "train" / "3.jpg")
    with pytest.raises(BadInput, match=r"3\.jpg: image is 256x256; expected .*twice as wide"):
        load_sample(pairs, list_samples(pairs, "pairs")["train"][2])


def test_mask_of_another_size_than_its_photo_is_bad_input(cityscapes):
    s = list_samples(cityscapes, "cityscapes")["train"][1]
    Image.open(cityscapes / s.color).resize((64, 32)).save(cityscapes / s.color)
    with pytest.raises(BadInput, match=r"_gtFine_color\.png: colour mask is 64x32 but its photo is 128x64"):
        load_sample(cityscapes, s, "color")
    (cityscapes / s.label_ids).unlink()
    with pytest.raises(BadInput, match=r"_gtFine_labelIds\.png: labelIds mask not found"):
        load_sample(cityscapes, s, "labelIds")


def test_grayscale_and_rgba_photos_are_converted_to_rgb_and_noted(cityscapes):
    a, b = list_samples(cityscapes, "cityscapes")["train"][:2]
    Image.open(cityscapes / a.photo).convert("L").save(cityscapes / a.photo)
    Image.open(cityscapes / b.photo).convert("RGBA").save(cityscapes / b.photo)
    for s, mode in ((a, "L"), (b, "RGBA")):
        dec = load_sample(cityscapes, s, "color")
        assert dec.photo.shape[2] == 3 and dec.photo_bytes is None
        assert dec.notes == [f"{cityscapes / s.photo}: converted {mode} photo to RGB"]
