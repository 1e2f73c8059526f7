"""``manifest.json``: what a finished preprocess run wrote, assembled from the per-shard records.

It lists every shard with its sample count, size and sha256 (what training verifies), the class
pixel counts per split (class weights), the KMeans agreement and far pixels, how photos and labels
are stored, the config and the library versions. It is written last: its presence means the
shards folder is complete.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Optional

from unet_dist import storage
from unet_dist.config import Config, to_dict
from unet_dist.data import shards as sh
from unet_dist.data.sources import SPLITS
from unet_dist.errors import UnetDistError
from unet_dist.labels import NUM_CLASSES
from unet_dist.preprocess.plan import LABEL_STORAGE, PROGRESS, Unit, photo_storage, versions

log = logging.getLogger("unet_dist.preprocess")
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")


def photo_error(acc: list) -> Optional[dict]:
    """Mean absolute error (grey levels) and PSNR (dB) of stored photos against their source pixels."""
    total, sq, n = acc
    if not n:
        return None
    mse = sq / n
    return {"mean_abs_error": round(total / n, 4),
            "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else None, "values": n}


def build(cfg: Config, units: list[Unit], records: dict, q_sha: Optional[str]) -> dict:
    splits, class_pixels, far, skipped, sizes = {}, {}, {}, [], set()
    agree = [0, 0]
    for split in SPLITS:
        recs = [records[u.name] for u in units if u.split == split]
        n = sum(r["samples"] for r in recs)
        skipped += sorted((x for r in recs for x in r["skipped"]), key=lambda x: x["path"])
        if n == 0:
            raise UnetDistError(f"{cfg.data.root}: every sample of split {split!r} was skipped as bad "
                                f"input (see the log); expected at least one readable sample")
        splits[split] = {"samples": n, "shards": [
            {"name": r["name"], "samples": r["samples"], "sha256": r["sha256"], "bytes": r["bytes"]}
            for r in recs if r["samples"]]}
        class_pixels[split] = [int(sum(c)) for c in zip(*(r["class_pixels"] for r in recs))]
        far[split] = sum(r["far_pixels"] for r in recs)
        for r in recs:
            agree = [agree[0] + r["agree"][0], agree[1] + r["agree"][1]]
            sizes.update(tuple(s) for s in r["sizes"])
    image_size = list(cfg.data.resize) if cfg.data.resize else (list(next(iter(sizes))) if len(sizes) == 1 else None)
    return {
        "format": sh.FORMAT,
        "splits": splits,
        "num_classes": NUM_CLASSES,
        "class_pixels": class_pixels,
        "unmatched_pixels": far,  # mask pixels far from every KMeans centre, stored as ignore
        "image_size": image_size,
        "quantizer": {"file": sh.QUANTIZER, "sha256": q_sha} if q_sha else None,
        "label_source": cfg.data.label_source,
        "photos": {**photo_storage(cfg), "error_vs_source": {
            split: photo_error([sum(v) for v in zip(*(records[u.name].get("photo_error", [0, 0, 0])
                                                      for u in units if u.split == split))] or [0, 0, 0])
            for split in SPLITS}},
        "labels": LABEL_STORAGE,
        "config": to_dict(cfg),
        "versions": versions(),
        "skipped": skipped,
        "kmeans_agreement": round(agree[0] / agree[1], 6) if agree[1] else None,
    }


def drop_stale(out: storage.Location, units: list[Unit], manifest: dict) -> None:
    """Shards and sidecars of an earlier, different plan must not be mistaken for this one's."""
    keep = {s["name"] for v in manifest["splits"].values() for s in v["shards"]}
    planned = {u.name for u in units}
    for name in out.listdir():
        if SHARD_RE.match(name) and name not in keep:
            log.info("removing stale %s", out / name)
            (out / name).remove()
    for name in (out / PROGRESS).listdir():
        if name.endswith(".tar.json") and name[:-5] not in planned:
            (out / PROGRESS / name).remove()
