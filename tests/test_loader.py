"""The training input pipeline: photo and label stay aligned through scale, crop and flip (drawn in
the loader worker, applied on the device), whatever way the photo was stored."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from unet_dist.data import shards as sh
from unet_dist.data.augment import Augment, to_device, train_collate, train_sample
from unet_dist.data.decode import MEAN, STD, decode_label, decode_photo, decode_sample, normalize
from unet_dist.labels import IGNORE, train_id_palette

PALETTE = train_id_palette().astype(np.int32)


def blocky_scene(rng, h=96, w=128, block=16):
    """A label of big blocks and a photo whose colour is the block's palette colour."""
    ids = rng.integers(0, 19, (h // block, w // block)).astype(np.uint8)
    label = np.kron(ids, np.ones((block, block), np.uint8))
    return PALETTE[label].astype(np.uint8), label


def sample_of(photo, label, encoding="png", tile=None, quality=95):
    members = sh.encode_photo(photo, encoding, quality, tile)
    return {"__key__": "k", **dict(members), "label.png": sh.encode_label_png(label)}


def augmented(samples, aug, seed=0):
    np.random.seed(seed)
    batch = train_collate([train_sample(aug, s) for s in samples])
    assert all(p.dtype == torch.uint8 for p in batch[0]) and all(lab.dtype == torch.uint8 for lab in batch[1])
    return to_device(batch, aug, torch.device("cpu"))


def photo_classes(images):
    """The class whose palette colour is nearest to each pixel of the (normalised) images."""
    rgb = (images.permute(0, 2, 3, 1) * torch.tensor(STD) + torch.tensor(MEAN)).round().numpy()
    d = ((rgb[..., None, :] - PALETTE[None, None, None, :19]) ** 2).sum(-1)
    return d.argmin(-1)


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.6, 0.9), (1.2, 1.8), (0.5, 2.0), (0.3, 0.4)])
@pytest.mark.parametrize("stored", ["png", "jpeg", "jpeg tiles"])
def test_scale_crop_flip_keep_photo_and_label_aligned(scale, stored):
    rng = np.random.default_rng(0)
    aug = Augment(crop=(48, 64), scale=scale, flip=True)
    tile = (32, 48) if stored == "jpeg tiles" else None
    samples = [sample_of(*blocky_scene(rng, 80, 128), stored.split()[0], tile) for _ in range(12)]
    images, target = augmented(samples, aug)
    assert images.shape == (12, 3, 48, 64) and images.dtype == torch.float32
    assert target.shape == (12, 48, 64) and target.dtype == torch.int64
    known = (target != IGNORE).numpy()
    agree = (photo_classes(images) == target.numpy())[known].mean()
    # Only bilinear edge pixels may blend (and JPEG rings at edges); shrinking to 1/3 blurs more of them.
    assert agree > (0.9 if scale[0] >= 0.5 else 0.85), agree
    if scale[1] < 0.5:  # a scaled image smaller than the crop: padded, the label with ignore
        assert (~known).any()


def test_valid_padding_window_carries_context():
    rng = np.random.default_rng(1)
    photo, label = blocky_scene(rng)
    aug = Augment(crop=(40, 40), scale=(1.0, 1.0), flip=False, margin=12)
    images, target = augmented([sample_of(photo, label)], aug)
    assert images.shape == (1, 3, 64, 64) and target.shape == (1, 40, 40)
    assert (photo_classes(images)[:, 12:-12, 12:-12] == target.numpy()).mean() == 1.0


def test_tiled_jpeg_decodes_only_the_box_and_matches_the_whole_photo():
    photo = blocky_scene(np.random.default_rng(3), 100, 150, 10)[0]
    members = dict(sh.encode_photo(photo, "jpeg", 90, (32, 64)))
    (h, w), tiles = sh.unpack_tiles(members["image.tiles"])
    assert (h, w) == (100, 150) and len(tiles) == 4 * 3 and tiles[-1][:4] == (96, 128, 100, 150)
    whole = decode_photo(members)
    assert whole.shape == photo.shape
    np.testing.assert_array_equal(decode_photo(members, (10, 20, 70, 140)), whole[10:70, 20:140])
    assert np.abs(whole.astype(int) - photo).mean() < 12  # lossy (4:2:0 chroma on saturated blocks)


def test_label_png_is_standard_and_read_only_up_to_the_rows_needed():
    label = np.random.default_rng(4).integers(0, 256, (150, 53), dtype=np.uint8)
    data = sh.encode_label_png(label)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), label)  # any PNG reader
    for start, stop in ((0, 9), (63, 64), (64, 130), (70, 150), (129, 150)):  # blocks of 64 rows
        np.testing.assert_array_equal(sh.decode_label_rows(data, start, stop), label[start:stop])
    np.testing.assert_array_equal(decode_label(data, (3, 4, 20, 30)), label[3:20, 4:30])
    np.testing.assert_array_equal(decode_label(data, (100, 4, 140, 30)), label[100:140, 4:30])
    buf = io.BytesIO()  # an older shard's label: Pillow's filtered PNG still loads
    Image.fromarray(label).save(buf, format="PNG")
    assert sh.decode_label_rows(buf.getvalue()) is None
    np.testing.assert_array_equal(decode_label(buf.getvalue(), (3, 4, 20, 30)), label[3:20, 4:30])


def test_old_png_shards_still_decode():
    rng = np.random.default_rng(5)
    photo, label = blocky_scene(rng)
    png = io.BytesIO()
    Image.fromarray(label).save(png, format="PNG")
    image, lab, _ = decode_sample({"__key__": "k", "image.png": sh.encode_png(photo), "label.png": png.getvalue()})
    np.testing.assert_array_equal(image, photo)
    np.testing.assert_array_equal(lab, label)


def test_normalize_is_channel_first_imagenet_standardisation():
    img = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(img).numpy()
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    np.testing.assert_allclose(x, ((img - mean) / std).transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_device_normalisation_equals_the_cpu_one_at_scale_one():
    rng = np.random.default_rng(6)
    photo = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (48, 64), dtype=np.uint8)
    images, target = augmented([sample_of(photo, label)], Augment(crop=(48, 64), scale=(1.0, 1.0), flip=False))
    torch.testing.assert_close(images[0], normalize(photo))
    np.testing.assert_array_equal(target[0].numpy(), label)
