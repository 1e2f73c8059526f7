"""Segment photos: colour masks (Cityscapes palette), trainId maps and overlays at the input's size.

``python -m unet_dist.predict --model M --input PATH --out DIR`` where PATH is an image, a folder
of images, or (with ``--pairs``) a folder of side-by-side pairs JPEGs whose left half is the photo.
Any image size: 'same' models pad internally, 'valid' models use overlap-tile.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unet_dist.cli import run_main
from unet_dist.errors import UnetDistError
from unet_dist.segment import segment
from unet_dist.labels import colorize
from unet_dist.viz import overlay

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            return files
        raise UnetDistError(f"{path}: no images found (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
    raise UnetDistError(f"{path}: input not found")


def read_photo(path: Path, pairs: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            photo = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise UnetDistError(f"{path}: not a readable image ({e})") from None
    if pairs:
        h, w = photo.shape[:2]
        if w != 2 * h:
            raise UnetDistError(f"{path}: a pairs image must be twice as wide as high, got {w}x{h}")
        photo = photo[:, : w // 2]
    return np.ascontiguousarray(photo)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unet_dist.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint dir, run dir, runs:/... or models:/...")
    parser.add_argument("--input", required=True, help="image file or folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pairs", action="store_true", help="inputs are side-by-side pairs; use the left half")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    def run() -> None:
        from unet_dist.serving.loading import load_model

        inputs = list_inputs(Path(args.input))
        model, _ = load_model(args.model, args.device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        root = Path(args.input) if Path(args.input).is_dir() else Path(args.input).parent
        for path in inputs:
            photo = read_photo(path, args.pairs)
            (ids,) = segment(model, [photo], device=args.device)
            stem = "__".join(path.relative_to(root).with_suffix("").parts)
            Image.fromarray(colorize(ids)).save(out / f"{stem}_color.png")
            Image.fromarray(ids).save(out / f"{stem}_trainIds.png")
            Image.fromarray(overlay(photo, ids)).save(out / f"{stem}_overlay.jpg", quality=90)
        print(f"wrote {len(inputs)} predictions to {out}")

    run_main(run)


if __name__ == "__main__":
    main(sys.argv[1:])
