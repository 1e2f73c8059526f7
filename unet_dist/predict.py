"""Segment photos: colour masks (Cityscapes palette), trainId maps and overlays at the input's size.

``python -m unet_dist.predict --model M --input PATH --out DIR`` where PATH is an image, a folder
of images, or (with ``--pairs``) a folder of side-by-side pairs JPEGs whose left half is the photo.
Any image size: 'same' models pad internally, 'valid' models use overlap-tile.

MLflow models are read from ``$MLFLOW_TRACKING_URI``, else from the store training writes by
default (./runs/mlflow/mlflow.db); a store that does not exist is an error, never created.

Example::

    python -m unet_dist.predict --model runs/checkpoints/unet-demo --input photos/ --out masks/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from unet_dist import cli, devices, model_source
from unet_dist.errors import UnetDistError
from unet_dist.photo_files import IMAGE_SUFFIXES, photo_rgb


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            return files
        raise UnetDistError(f"--input: {path}: no images found (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
    raise UnetDistError(f"--input: {path}: not found")


def read_photo(path: Path, pairs: bool) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UnetDistError(f"{path}: cannot read ({e.strerror or e})") from None
    return photo_rgb(data, str(path), pairs)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Every argument checked, the device and the MLflow store included: the part that can refuse."""
    parser = cli.parser("python -m unet_dist.predict", __doc__)
    model_source.add_argument(parser)
    parser.add_argument("--input", required=True, type=cli.non_empty, metavar="PATH", help="image file or folder")
    parser.add_argument("--out", required=True, type=cli.non_empty, metavar="DIR",
                        help="output folder (made if missing)")
    parser.add_argument("--pairs", action="store_true", help="inputs are side-by-side pairs; use the left half")
    parser.add_argument("--device", type=devices.device_name, default="auto",
                        help=f"{devices.DEVICES}; auto: cuda when present, else cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.inputs = list_inputs(Path(args.input))
    if Path(args.out).exists() and not Path(args.out).is_dir():
        cli.fail("--out", f"{args.out} is a file; expected a folder")
    args.device = devices.resolve(args.device)
    model_source.check(args.model)
    return args


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: predict(parse(argv)))


def predict(args: argparse.Namespace) -> None:
    from unet_dist import mask_files
    from unet_dist.segment import segment
    from unet_dist.serving.loading import load_model
    from unet_dist.viz import overlay

    model, _ = load_model(args.model, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.input) if Path(args.input).is_dir() else Path(args.input).parent
    for path in args.inputs:
        photo = read_photo(path, args.pairs)
        (ids,) = segment(model, [photo], device=args.device)
        stem = "__".join(path.relative_to(root).with_suffix("").parts)
        for fmt in ("color", "trainid"):
            (out / mask_files.output_name(stem, fmt)).write_bytes(mask_files.encode(ids, fmt))
        Image.fromarray(overlay(photo, ids)).save(out / f"{stem}_overlay.jpg", quality=90)
    print(f"wrote {len(args.inputs)} predictions to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
