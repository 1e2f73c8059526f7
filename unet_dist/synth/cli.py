"""Write a synthetic Cityscapes-like dataset in a raw layout (side-by-side pairs, or the official tree).

Examples::

    python -m unet_dist.synth --layout pairs --out data/synth --train 200 --val 40 --seed 0
    python -m unet_dist.synth --layout cityscapes --out data/synth_cs --train 20 --val 5 --size 256x512

Deterministic per (seed, split, index) and resumable: rerunning into the same ``--out`` keeps the
samples already written.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

from unet_dist import cli
from unet_dist.synth.layouts import CITYSCAPES_SIZE, LAYOUTS, PAIRS_SIZE, write_dataset

SIDES = (16, 4096)  # pixels per side the generator draws


def parse_size(text: str) -> tuple[int, int]:
    """An argparse type: ``"256x512"`` -> (256, 512), height x width, each 16..4096 pixels."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not all(SIDES[0] <= int(v) <= SIDES[1] for v in m.groups()):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 256x512, each {SIDES[0]}..{SIDES[1]} "
                                         f"pixels, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m unet_dist.synth", __doc__)
    p.add_argument("--layout", choices=LAYOUTS, default="pairs",
                   help="pairs: 256x512 photo|mask JPEGs; cityscapes: leftImg8bit/gtFine PNG tree")
    p.add_argument("--out", required=True, type=cli.non_empty, metavar="DIR",
                   help="dataset directory (new, or one this tool wrote)")
    p.add_argument("--train", type=cli.natural, default=200, metavar="N", help="train samples, >= 0")
    p.add_argument("--val", type=cli.natural, default=40, metavar="N", help="val samples, >= 0")
    p.add_argument("--seed", type=cli.natural, default=0, metavar="N", help="dataset seed, >= 0")
    p.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                   help=f"HEIGHTxWIDTH of cityscapes samples (default {CITYSCAPES_SIZE[0]}x{CITYSCAPES_SIZE[1]}); "
                        f"pairs are always {PAIRS_SIZE[0]}x{2 * PAIRS_SIZE[1]} files")
    p.add_argument("--processes", type=cli.natural, default=0, metavar="N",
                   help="worker processes, >= 0; 0 = one per core")
    return p


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.layout == "pairs" and args.size not in (None, PAIRS_SIZE):
        cli.fail("--size", f"the pairs layout is always a {PAIRS_SIZE[0]}x{PAIRS_SIZE[1]} photo beside its mask "
                           f"(a {PAIRS_SIZE[0]}x{2 * PAIRS_SIZE[1]} file); give --size only with --layout cityscapes")
    return args


def synth(args: argparse.Namespace) -> dict:
    summary = write_dataset(args.out, args.layout, args.train, args.val, seed=args.seed, size=args.size,
                            processes=args.processes)
    h, w = summary["size"]
    print(f"synth: {summary['layout']} dataset in {summary['out']}: {summary['train']} train + {summary['val']} val "
          f"({h}x{w} photos, seed {summary['seed']}); wrote {summary['written']}, kept {summary['kept']}, "
          f"removed {summary['removed']}")
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    cli.run_main(lambda: synth(parse(argv)))
