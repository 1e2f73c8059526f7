"""Shared by the batch prediction and export tests: a small trained-format checkpoint and photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_checkpoint(directory: Path, *, width: int = 4, depth: int = 3, padding: str = "same",
                    batch_norm: bool = False, seed: int = 0) -> Path:
    """A checkpoint folder as training writes it (checkpoint.pt + meta.json) of a freshly initialised U-Net."""
    from unet_dist import checkpoint
    from unet_dist.config import load_config
    from unet_dist.model import UNet

    cfg = load_config(None, [f"model.width={width}", f"model.depth={depth}", f"model.padding={padding}",
                             f"model.batch_norm={str(batch_norm).lower()}"])
    torch.manual_seed(seed)
    model = UNet.from_config(cfg.model)
    meta = checkpoint.files.meta(cfg, step=7, best_miou=0.0, run_id=None, world_size=1, launcher="test",
                                 manifest_sha256=None)
    return checkpoint.files.write(directory, {"model": model.state_dict()}, meta)


def write_photos(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, names: list[str] | None = None) -> list[Path]:
    """Street-like noise photos (smooth colour fields plus noise) as PNG, one per size."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate(sizes):
        base = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
        img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
        path = folder / (names[i] if names else f"p{i:02d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        out.append(path)
    return out
