"""The training input pipeline: photo and label stay aligned through scale, crop and flip."""
import numpy as np
import pytest

from unet_dist.data.loader import Augment, augment, normalize
from unet_dist.labels import IGNORE, train_id_palette

PALETTE = train_id_palette().astype(np.int32)


def blocky_scene(rng, h=96, w=128, block=16):
    """A label of big blocks and a photo whose colour is the block's palette colour."""
    ids = rng.integers(0, 19, (h // block, w // block)).astype(np.uint8)
    label = np.kron(ids, np.ones((block, block), np.uint8))
    return PALETTE[label].astype(np.uint8), label


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.6, 0.9), (1.2, 1.8), (0.5, 2.0)])
def test_scale_crop_flip_keep_photo_and_label_aligned(scale):
    rng = np.random.default_rng(0)
    aug = Augment(crop=(48, 64), scale=scale, flip=True)
    for _ in range(20):
        photo, label = blocky_scene(rng)
        p, lab = augment(photo, label, aug, rng)
        assert p.shape == (48, 64, 3) and lab.shape == (48, 64)
        known = lab != IGNORE
        # The class whose palette colour is nearest to each photo pixel.
        d = ((p[:, :, None, :].astype(np.int32) - PALETTE[None, None, :19]) ** 2).sum(-1)
        agree = (d.argmin(-1) == lab)[known].mean()
        assert agree > 0.9, agree  # only bilinear edge pixels may blend


def test_valid_padding_window_carries_mirrored_context():
    rng = np.random.default_rng(1)
    photo, label = blocky_scene(rng)
    p, lab = augment(photo, label, Augment(crop=(40, 40), scale=(1.0, 1.0), flip=False, margin=12), rng)
    assert p.shape == (64, 64, 3) and lab.shape == (40, 40)
    inner = p[12:-12, 12:-12].astype(np.int32)
    d = ((inner[:, :, None, :] - PALETTE[None, None, :19]) ** 2).sum(-1)
    assert (d.argmin(-1) == lab).mean() == 1.0


def test_normalize_is_channel_first_imagenet_standardisation():
    img = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(img).numpy()
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    np.testing.assert_allclose(x, ((img - mean) / std).transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
