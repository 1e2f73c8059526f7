"""Preprocess a raw dataset into WebDataset shards: KMeans fitted once on mask colours, every mask
mapped to Cityscapes trainIds, image/label pairs written into tar shards with manifest.json.

    python -m unet_dist.preprocess --config jobs/configs/demo.yaml --set data.root=data/synth

Reruns are resumable: verified shards are kept, missing or invalid ones rebuilt, and manifest.json
is written last, so its presence means the folder is complete. ``data.root`` is a local folder;
``shards.dir`` a path or an s3://, gs://, az:// URL.
"""
from __future__ import annotations

import sys
from typing import Optional

from unet_dist import cli
from unet_dist.config import Config, config_from_args


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
    def parse() -> Config:
        parser = cli.parser("python -m unet_dist.preprocess", __doc__, config=True)
        return config_from_args(parser.parse_args(sys.argv[1:] if argv is None else argv))

    cli.run_main(lambda: preprocess(parse()))


def preprocess(cfg: Config) -> None:
    """Run the job (its heavy imports start here, after the arguments parsed) and print its summary."""
    from unet_dist.preprocess.job import run

    print(summary_text(run(cfg)), flush=True)
