"""``python -m unet_dist.preprocess`` (and the ``unet-preprocess`` console script).

    python -m unet_dist.preprocess --config jobs/configs/demo.yaml --set data.root=data/synth
"""
from __future__ import annotations

import argparse
from typing import Optional

from unet_dist.config import add_config_args, config_from_args


def summary_text(s: dict) -> str:
    parts = [f"{split} {s['samples'][split]} samples in {s['shards'][split]} shards" for split in s["samples"]]
    agree = s["kmeans_agreement"]
    lines = [
        f"preprocess done: {', '.join(parts)}; skipped {s['skipped']}; reused {s['reused_shards']} shards",
        f"  {s['seconds']:.1f} s, {s['images_per_s']:.1f} images/s overall; mapping and writing "
        f"{s['shard_seconds']:.1f} s, {s['shard_images_per_s']:.1f} images/s with {s['processes']} processes",
        f"  kmeans agreement {'n/a' if agree is None else f'{agree:.4f}'}; "
        f"pixels far from every cluster (ignored): {sum(s['unmatched_pixels'].values())}; "
        f"photos converted to RGB: {s['converted']}",
        f"shards: {s['shards_dir']}",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    from unet_dist.cli import run_main
    from unet_dist.preprocess.job import run

    parser = argparse.ArgumentParser(
        prog="python -m unet_dist.preprocess",
        description="Raw dataset -> KMeans fitted once on mask colours -> WebDataset shards + manifest.json.",
    )
    add_config_args(parser)
    args = parser.parse_args(argv)
    run_main(lambda: print(summary_text(run(config_from_args(args))), flush=True))
