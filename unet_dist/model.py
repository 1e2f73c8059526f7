"""The U-Net of Ronneberger et al. (2015), as small blocks that map one-to-one onto the paper's figure.

Two padding modes:

- ``valid`` (the paper): unpadded 3x3 convs, every conv loses one pixel per side, skips are centre-cropped
  before the concat. 572x572 -> 388x388 at depth 5; each side loses ``margin(depth)`` pixels (92). Only
  some input sizes keep every pooled map integral (``16k + 12`` at depth 5): other sizes are refused,
  since floor-pooling would shift the crop by half a pixel. ``unet_dist.segment`` mirror-pads and tiles
  so any image gets a full-size prediction.
- ``same``: padding=1 convs, output size == input size for ANY input size. Sizes that do not divide by
  ``2 ** (depth - 1)`` are mirror-padded (reflect) up to the next multiple inside ``forward`` and the
  logits are cropped back. We pad the input rather than the skips because a mirrored border looks like
  image content (as in the paper's overlap-tile), whereas zero-padding decoder maps would put a seam of
  fake features along one edge; it also keeps tiny inputs (smaller than the pool stack) working.
"""
from __future__ import annotations

import itertools
import math
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_dist.config import ModelConfig, Padding
from unet_dist.unet_geometry import check_depth, is_valid, margin, output_size, valid_input_size  # noqa: F401 - re-exported

PADDINGS = typing.get_args(Padding)


def _reflect_index(length: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices that mirror (reflect, edge not repeated) an axis of ``length``, for any pad size."""
    idx = torch.arange(-before, length + after, device=device)
    if length == 1:
        return torch.zeros_like(idx)
    period = 2 * (length - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= length, period - idx, idx)


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad the last two dims of ``x`` by any amount.

    ``F.pad(mode="reflect")`` refuses pads as large as the image (a 64-pixel crop needs 92 pixels of
    mirror in valid mode); this repeats the reflection, like ``numpy.pad(mode="reflect")``.
    """
    if top == bottom == left == right == 0:
        return x
    h, w = x.shape[-2:]
    if max(top, bottom) < h and max(left, right) < w:  # within F.pad's reach: its native kernel
        return F.pad(x, (left, right, top, bottom), mode="reflect")
    rows = _reflect_index(h, top, bottom, x.device)
    cols = _reflect_index(w, left, right, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top = (x.shape[-2] - h) // 2
    left = (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


class DoubleConv(nn.Sequential):
    """Two 3x3 convs, each followed by (optional BatchNorm and) ReLU: one blue-arrow pair of the figure."""

    def __init__(self, in_channels: int, out_channels: int, pad: int, batch_norm: bool):
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool with stride 2 (red arrow), then a DoubleConv that doubles the channels."""

    def __init__(self, in_channels: int, out_channels: int, pad: int, batch_norm: bool):
        super().__init__(nn.MaxPool2d(2, 2), DoubleConv(in_channels, out_channels, pad, batch_norm))


class Up(nn.Module):
    """2x2 up-conv halving the channels (green arrow), crop-and-concat of the skip (grey), DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, pad: int, batch_norm: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels, pad, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = _center_crop(skip, x.shape[-2], x.shape[-1])  # a no-op in same mode
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Conv2d):
    """1x1 conv mapping the last feature map to one logit per class."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, 1)


class UNet(nn.Module):
    """U-Net with ``depth`` levels (incl. the bottleneck; the paper's 5 = 4 pools).

    Level ``i`` has ``width * 2**i`` channels. ``padding`` is "valid" (paper) or "same".
    Returns logits ``[N, num_classes, H_out, W_out]``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 19,
        width: int = 64,
        depth: int = 5,
        padding: str = "valid",
        batch_norm: bool = False,
    ):
        super().__init__()
        check_depth(depth)
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.depth, self.padding, self.batch_norm = depth, padding, batch_norm
        pad = 1 if padding == "same" else 0
        ch = [width * 2**i for i in range(depth)]
        self.inc = DoubleConv(in_channels, ch[0], pad, batch_norm)
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1], pad, batch_norm) for i in range(depth - 1))
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i], pad, batch_norm) for i in reversed(range(depth - 1)))
        self.outc = OutConv(ch[0], num_classes)
        self._init_weights()

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "UNet":
        return cls(cfg.in_channels, cfg.num_classes, cfg.width, cfg.depth, cfg.padding, cfg.batch_norm)

    def _init_weights(self) -> None:
        """The paper's init: Gaussian with std sqrt(2 / N), N = inputs feeding one unit."""
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):  # stride == kernel: each output sees one tap per input channel
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / m.in_channels))
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return around_body(self.body, x, self.depth, self.padding)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The network itself, on an input it takes as it is: a valid size ('valid') or sides that
        divide by ``2 ** (depth - 1)`` ('same'). ``forward`` checks or pads around it
        (:func:`around_body`); the ONNX export (:mod:`unet_dist.export`) is this graph, and its
        runner goes through the same :func:`around_body`."""
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)


def around_body(body, x: torch.Tensor, depth: int, padding: str) -> torch.Tensor:
    """Logits at the input's size from ``body`` (the network itself: :meth:`UNet.body`, or the ONNX
    graph of it): a 'valid' input is checked, a 'same' one mirror-padded to a multiple of
    ``2 ** (depth - 1)`` and its logits cropped back."""
    h, w = x.shape[-2:]
    if padding == "valid":
        check_valid_input(h, w, depth)
        return body(x)
    x, top, left = pad_to_multiple(x, depth)
    y = body(x)
    return y if y.shape[-2:] == (h, w) else y[..., top : top + h, left : left + w]


def check_valid_input(h: int, w: int, depth: int) -> None:
    """Refuse an input a valid U-Net cannot take as it is, naming the nearest sizes it can."""
    for side in (h, w):
        try:
            output_size(side, depth, "valid")
        except ValueError:
            below = next((s for s in range(side, 0, -1) if is_valid(s, depth)), None)
            above = next(s for s in itertools.count(side) if is_valid(s, depth))
            near = ", ".join(str(s) for s in (below, above) if s is not None)
            raise ValueError(
                f"valid U-Net (depth {depth}) got input {h}x{w}: each side must be a valid size, "
                f"near {side}: {near}; unet_dist.segment pads any image"
            ) from None


def pad_to_multiple(x: torch.Tensor, depth: int) -> tuple[torch.Tensor, int, int]:
    """Mirror-pad a 'same' model's input to sides that divide by ``2 ** (depth - 1)``; returns the
    padded input and where the original starts in it (top, left), to crop the logits back."""
    h, w = x.shape[-2:]
    mult = 2 ** (depth - 1)
    ph, pw = -h % mult, -w % mult
    top, left = ph // 2, pw // 2
    return mirror_pad(x, top, ph - top, left, pw - left), top, left
