"""``python -m unet_dist.synth``: write a synthetic Cityscapes-like dataset in a raw layout.

    python -m unet_dist.synth --layout pairs --out data/synth --train 200 --val 40 --seed 0
    python -m unet_dist.synth --layout cityscapes --out data/synth_cs --train 20 --val 5 --size 256x512

Deterministic per (seed, split, index) and resumable: rerunning into the same ``--out`` keeps the
samples already written.
"""
from __future__ import annotations

import argparse
import re
from typing import Optional

from unet_dist.cli import run_main
from unet_dist.synth.layouts import LAYOUTS, write_dataset
from unet_dist.errors import UnetDistError


def parse_size(text: str) -> tuple[int, int]:
    """``"256x512"`` -> (256, 512): height x width."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UnetDistError(f"--size: expected HEIGHTxWIDTH such as 256x512, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unet_dist.synth", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=LAYOUTS, default="pairs",
                   help="pairs: 256x512 photo|mask JPEGs; cityscapes: leftImg8bit/gtFine PNG tree")
    p.add_argument("--out", required=True, help="dataset directory (new, or one this tool wrote)")
    p.add_argument("--train", type=int, default=200, help="train samples (default 200)")
    p.add_argument("--val", type=int, default=40, help="val samples (default 40)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", default=None,
                   help="HEIGHTxWIDTH of cityscapes samples (default 256x512); pairs are always 256x512 files")
    p.add_argument("--processes", type=int, default=0, help="worker processes, 0 = one per core (default)")
    return p


def _main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    size = parse_size(args.size) if args.size else None
    summary = write_dataset(args.out, args.layout, args.train, args.val, seed=args.seed, size=size,
                            processes=args.processes)
    h, w = summary["size"]
    print(f"synth: {summary['layout']} dataset in {summary['out']}: {summary['train']} train + {summary['val']} val "
          f"({h}x{w} photos, seed {summary['seed']}); wrote {summary['written']}, kept {summary['kept']}, "
          f"removed {summary['removed']}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    run_main(lambda: _main(argv))
