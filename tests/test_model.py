"""The U-Net against the paper's numbers, both padding modes, and overlap-tile inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from unet_dist.config import ModelConfig
from unet_dist.segment import predict_logits
from unet_dist.model import UNet, margin, mirror_pad, output_size, valid_input_size


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_paper_unet_has_31030658_parameters_and_23_conv_layers():
    model = UNet(1, 2, width=64, depth=5, padding="valid")
    assert sum(p.numel() for p in model.parameters()) == 31_030_658
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    up_convs = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.kernel_size for m in convs].count((3, 3)) == 18
    assert len(up_convs) == 4 and [m.kernel_size for m in convs].count((1, 1)) == 1
    assert len(convs) + len(up_convs) == 23


def test_paper_unet_maps_572_to_388():
    with torch.device("meta"):  # shapes only: no 30-GFLOP forward on the CI's CPU
        model = UNet(1, 2, width=64, depth=5, padding="valid")
        out = model(torch.empty(1, 1, 572, 572))
    assert tuple(out.shape) == (1, 2, 388, 388)
    with torch.no_grad():  # the same shape through real kernels, on a narrow model
        narrow = UNet(1, 2, width=2, depth=5, padding="valid")
        assert tuple(narrow(torch.randn(1, 1, 572, 572)).shape) == (1, 2, 388, 388)
    assert output_size(572, 5) == 388 and valid_input_size(388, 5) == 572 and margin(5) == 92


def test_valid_sizes_at_depth_5_are_16k_plus_12():
    def ok(s: int) -> bool:
        try:
            output_size(s, 5)
            return True
        except ValueError:
            return False

    assert [s for s in range(180, 300) if ok(s)] == [188, 204, 220, 236, 252, 268, 284]
    assert all(valid_input_size(o, 5) % 16 == 12 for o in range(1, 100))


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_valid_forward_matches_the_size_formula(depth):
    size = valid_input_size(10, depth)
    out = UNet(3, 4, width=2, depth=depth, padding="valid")(torch.randn(1, 3, size, size + 2 ** (depth - 1)))
    assert tuple(out.shape[-2:]) == (output_size(size, depth), output_size(size + 2 ** (depth - 1), depth))
    assert out.shape[-1] == size + 2 ** (depth - 1) - 2 * margin(depth)


def test_valid_mode_refuses_a_size_that_would_misalign_the_crops():
    with pytest.raises(ValueError, match="near 200: 188, 204"):
        UNet(3, 4, width=2, depth=5, padding="valid")(torch.randn(1, 3, 200, 204))


@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("size", [(37, 53), (100, 75), (1, 1), (16, 32)])
def test_same_mode_keeps_any_input_size(depth, size):
    model = UNet(3, 5, width=4, depth=depth, padding="same", batch_norm=True)
    assert tuple(model(torch.randn(2, 3, *size)).shape) == (2, 5, *size)


@pytest.mark.parametrize("padding,size", [("same", 37), ("valid", 188)])
def test_gradient_reaches_every_parameter(padding, size):
    model = UNet(3, 4, width=4, depth=5, padding=padding, batch_norm=True)
    out = model(torch.randn(2, 3, size, size))
    nn.functional.cross_entropy(out, torch.randint(0, 4, (2, *out.shape[-2:]))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_from_config_builds_the_configured_model():
    cfg = ModelConfig(in_channels=1, num_classes=7, width=8, depth=3, padding="valid", batch_norm=False)
    model = UNet.from_config(cfg)
    assert (model.in_channels, model.num_classes, model.width, model.depth) == (1, 7, 8, 3)
    assert model.padding == "valid" and model.depth == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_channels_last_and_bf16_autocast_run_in_both_modes():
    for padding, size in (("same", (37, 53)), ("valid", (188, 204))):
        model = UNet(3, 5, width=4, depth=5, padding=padding, batch_norm=True).to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, *size).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        assert tuple(out.shape[-2:]) == tuple(output_size(s, 5, padding) for s in size)
        out.float().sum().backward()


def test_mirror_pad_matches_numpy_reflect_even_when_the_pad_exceeds_the_image():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(1, 2, 5, 3)
    for pads in ((1, 2, 1, 0), (12, 7, 9, 4)):
        top, bottom, left, right = pads
        want = np.pad(x.numpy(), ((0, 0), (0, 0), (top, bottom), (left, right)), mode="reflect")
        np.testing.assert_array_equal(mirror_pad(x, *pads).numpy(), want)


@pytest.mark.parametrize("size", [(37, 53), (100, 75), (5, 3)])
def test_overlap_tile_covers_odd_sizes_in_valid_mode(size):
    model = UNet(3, 5, width=4, depth=3, padding="valid").eval()
    for tile in (None, 60, 77):
        assert tuple(predict_logits(model, torch.randn(2, 3, *size), tile=tile).shape) == (2, 5, *size)


def test_overlap_tiles_equal_one_valid_forward_on_the_mirror_padded_image():
    # float64: in float32 the two differ by conv rounding only (~1e-6 of logits up to ~13)
    torch.manual_seed(0)
    model = UNet(3, 5, width=4, depth=4, padding="valid", batch_norm=True).eval().double()
    image = torch.randn(1, 3, 61, 90, dtype=torch.float64)
    m = margin(4)
    oh, ow = (output_size(valid_input_size(s, 4), 4) for s in (61, 90))
    with torch.no_grad():
        direct = model(mirror_pad(image, m, m + oh - 61, m, m + ow - 90))[..., :61, :90]
    calls = _count_forwards(model)
    tiled = predict_logits(model, image, tile=valid_input_size(16, 4))
    assert len(calls) > 4  # really tiled
    assert tuple(tiled.shape) == (1, 5, 61, 90)
    torch.testing.assert_close(tiled, direct, atol=1e-5, rtol=0)


def test_same_mode_prediction_covers_the_image_with_or_without_tiles():
    model = UNet(3, 5, width=4, depth=3, padding="same").eval()
    image = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(model, image), model(image))
    calls = _count_forwards(model)
    assert tuple(predict_logits(model, image, tile=32).shape) == (2, 5, 45, 70)
    assert len(calls) > 1
