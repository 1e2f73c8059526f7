"""Full-size predictions for both padding modes: the paper's overlap-tile strategy for ``valid``.

A valid U-Net's output is smaller than its input by ``margin`` pixels per side. To predict every pixel
of an image we mirror-pad it by the margin (the paper's Fig. 2) and run tiles whose *outputs* are
adjacent blocks. Tile offsets are multiples of ``2 ** (depth - 1)`` so every tile's pooling grid lines
up with that of one big forward over the padded image: tiled and untiled logits are the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from unet_dist.data.decode import MEAN, STD, normalize
from unet_dist.model import margin, mirror_pad, output_size, valid_input_size


@dataclass(frozen=True)
class _Axis:
    """How one image axis is cut: pad, then windows at ``k * block``; each keeps ``[keep, keep + block)``."""

    pad_before: int
    pad_after: int
    window: int
    block: int
    n: int
    keep: int


def _unwrap(model: nn.Module) -> nn.Module:
    """The UNet inside DDP (``.module``); ``torch.compile`` wrappers forward attributes already."""
    return getattr(model, "module", model)


def _valid_axis(length: int, depth: int, tile: int | None) -> _Axis:
    m, mult = margin(depth), 2 ** (depth - 1)
    whole = valid_input_size(length, depth)
    if tile is None or whole <= tile:
        out = output_size(whole, depth)
        return _Axis(m, m + out - length, whole, out, 1, 0)
    window = tile
    while window > 0:  # largest valid input size that fits in the tile
        try:
            out = output_size(window, depth)
            break
        except ValueError:
            window -= 1
    block = (out // mult) * mult if window > 0 else 0
    if block <= 0:
        raise ValueError(f"tile {tile} is too small for a valid U-Net of depth {depth}; "
                         f"use at least {valid_input_size(mult, depth)}")
    n = math.ceil(length / block)
    return _Axis(m, (n - 1) * block + window - m - length, window, block, n, 0)


def _same_axis(length: int, depth: int, tile: int | None) -> _Axis:
    mult = 2 ** (depth - 1)
    if tile is None or length <= tile:
        return _Axis(0, 0, length, length, 1, 0)
    window = (tile // mult) * mult
    ctx = (window // 4 // mult) * mult  # context kept on each side of a tile, discarded from its output
    block = window - 2 * ctx
    if block <= 0:
        raise ValueError(f"tile {tile} is too small for a same-padded U-Net of depth {depth}; use at least {mult}")
    n = math.ceil(length / block)
    return _Axis(ctx, n * block + ctx - length, window, block, n, ctx)


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Logits ``[N, K, H, W]`` covering every pixel of ``image [N, C, H, W]``, for either padding mode.

    ``tile`` is the largest input window side (pixels) sent through the model at once; None sends the
    whole (padded) image. Valid mode: exact overlap-tile. Same mode: tiles overlap by a quarter of the
    tile on each side and only their centres are kept (zero padding at tile borders makes this close to,
    not equal to, one big forward). The caller chooses ``model.eval()``.
    """
    net = _unwrap(model)
    depth, padding = net.depth, net.padding
    h, w = image.shape[-2:]
    plan = _valid_axis if padding == "valid" else _same_axis
    ay, ax = plan(h, depth, tile), plan(w, depth, tile)
    if padding == "same" and ay.n == ax.n == 1:
        return model(image)
    x = mirror_pad(image, ay.pad_before, ay.pad_after, ax.pad_before, ax.pad_after)
    out: torch.Tensor | None = None
    for iy in range(ay.n):
        y0 = iy * ay.block
        bh = min(ay.block, h - y0)
        for ix in range(ax.n):
            x0 = ix * ax.block
            bw = min(ax.block, w - x0)
            logits = model(x[..., y0 : y0 + ay.window, x0 : x0 + ax.window])
            if out is None:
                out = logits.new_empty(image.shape[0], logits.shape[1], h, w)
            out[..., y0 : y0 + bh, x0 : x0 + bw] = logits[..., ay.keep : ay.keep + bh, ax.keep : ax.keep + bw]
    assert out is not None
    return out


@torch.no_grad()
def segment(model: nn.Module, photos: list[np.ndarray], *, device: str | torch.device = "cpu",
            mean: np.ndarray = MEAN, std: np.ndarray = STD, tile: int | None = None) -> list[np.ndarray]:
    """(H, W, 3) uint8 photos -> (H, W) uint8 trainId masks, each at its photo's size.

    The one path from photos to masks: ``predict``, the served pyfunc and the benchmarks call it.
    Photos of the same size go through the model together; others one size at a time.
    """
    masks: list[np.ndarray | None] = [None] * len(photos)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, photo in enumerate(photos):
        by_size.setdefault(photo.shape[:2], []).append(i)
    for idx in by_size.values():
        x = torch.stack([normalize(photos[i], mean, std) for i in idx]).to(device)
        ids = predict_logits(model, x, tile).argmax(1).to(torch.uint8).cpu().numpy()
        for i, m in zip(idx, ids):
            masks[i] = m
    return masks  # type: ignore[return-value]

