"""Sizes through the U-Net, as plain integer arithmetic (no torch): which input sides a 'valid'
U-Net takes, what it returns, and the smallest crops and tiles that work.

Why a module of its own: the config schema checks ``train.crop`` and ``serve.tile`` against the
model's depth before anything heavy is imported, and the model, the training loop and inference
use the same functions.
"""
from __future__ import annotations

from typing import Optional


def check_depth(depth: int) -> None:
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")


def margin(depth: int) -> int:
    """Pixels lost per side in valid mode: 92 at depth 5, 2 at depth 1.

    Each level loses 4 pixels (two 3x3 convs) at its own scale on the way down (levels 0..depth-1) and
    on the way up (levels 0..depth-2): 4(2^d - 1) + 4(2^(d-1) - 1) in total, half of it per side.
    """
    check_depth(depth)
    return (12 * 2 ** (depth - 1) - 8) // 2


def output_size(in_size: int, depth: int, padding: str = "valid") -> int:
    """Output side for an input side; ``ValueError`` if valid mode cannot take this size exactly."""
    check_depth(depth)
    if padding == "same":
        return in_size
    if padding != "valid":
        raise ValueError(f"padding must be one of ('same', 'valid'), got {padding!r}")
    s = in_size
    for _ in range(depth - 1):  # contracting path: DoubleConv, then pool
        s -= 4
        if s <= 0 or s % 2:
            raise ValueError(f"valid U-Net of depth {depth} cannot take size {in_size} (odd map {s} before a pool)")
        s //= 2
    s -= 4  # bottleneck
    for _ in range(depth - 1):  # expanding path: up-conv doubles, DoubleConv
        s = 2 * s - 4
    if s <= 0:
        raise ValueError(f"valid U-Net of depth {depth} cannot take size {in_size} (output would be {s})")
    return s


def is_valid(size: int, depth: int) -> bool:
    try:
        output_size(size, depth, "valid")
        return True
    except ValueError:
        return False


def valid_input_size(out_size: int, depth: int) -> int:
    """Smallest valid-mode input side whose output side is >= ``out_size`` (572 for 388 at depth 5)."""
    size = max(int(out_size), 1) + 2 * margin(depth)
    while not is_valid(size, depth):  # valid sizes repeat every 2^(depth-1) pixels: a short loop
        size += 1
    return size


def smallest_output(depth: int) -> int:
    """The smallest output side of a valid U-Net of ``depth``."""
    return output_size(valid_input_size(1, depth), depth)


def valid_crop(size: int, depth: int) -> Optional[int]:
    """The largest label side <= ``size`` that a valid U-Net of ``depth`` maps exactly (its input is
    that side plus the margin on both sides); None when even the smallest output is larger."""
    m = margin(depth)
    smallest = smallest_output(depth)
    if size < smallest:
        return None
    for out in range(size, smallest - 1, -1):  # valid outputs repeat every 2^(depth-1) pixels
        if is_valid(out + 2 * m, depth) and output_size(out + 2 * m, depth) == out:
            return out
    return None


def smallest_tile(depth: int, padding: str) -> int:
    """The smallest ``serve.tile`` (window side) inference can cut a photo into."""
    mult = 2 ** (depth - 1)
    return valid_input_size(mult, depth) if padding == "valid" else mult


def bottleneck_side(size: int, depth: int, padding: str) -> int:
    """Side of the deepest feature map for an input (same) or label (valid) side."""
    if padding == "valid":
        inner = size + 2 * margin(depth)
        for _ in range(depth - 1):
            inner = (inner - 4) // 2
        return inner - 4
    mult = 2 ** (depth - 1)
    return -(-size // mult)  # same mode pads up to a multiple of 2^(depth-1)
