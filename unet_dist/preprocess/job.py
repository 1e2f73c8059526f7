"""The preprocess job: raw dataset -> KMeans fitted once -> deterministic, resumable shards.

Steps: list the sorted samples of each split; sample mask pixels across the train masks (seeded);
fit KMeans once and save ``quantizer.json``; build the 256^3 colour -> trainId table once; then map
and write shards in a process pool, one shard per task (:mod:`.worker`; the table reaches the
workers through the pool initializer). Workers build each tar in a local file; this process
publishes it (a rename, or one upload to a store) and then its hidden sidecar
(``.progress/<shard>.json``) with its sha256 and stats, so a rerun keeps verified shards and
rebuilds only missing or invalid ones (:mod:`.plan`); ``manifest.json`` is written last
(:mod:`.manifest`), so its presence means the folder is complete.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from unet_dist import storage
from unet_dist.config import Config, validate
from unet_dist.data import shards as sh
from unet_dist.data.quantize import Quantizer, fit_quantizer
from unet_dist.data.sources import RawSample, list_samples
from unet_dist.errors import UnetDistError
from unet_dist.preprocess import manifest as mf
from unet_dist.preprocess.plan import PROGRESS, Job, digest, finished, plan_units, stat, versions
from unet_dist.preprocess.worker import FAR, State, build_shard, run_tasks, sample_pixels

log = logging.getLogger("unet_dist.preprocess")
FIT_MAX_MASKS = 500  # train masks read to sample KMeans pixels (a seeded subset beyond this)


def _progress(it: Iterable, total: int, desc: str, every: Callable[[object, int], str]) -> Iterator:
    """A tqdm bar on a terminal, plain log lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(it, total=total, desc=desc, unit="shard")
        return
    for i, r in enumerate(it, 1):
        log.info("%s [%d/%d]", every(r, i), i, total)
        yield r


def _fit(cfg: Config, job: Job, train: list[RawSample], out: storage.Location, processes: int) -> tuple[Quantizer, dict]:
    """Reuse ``quantizer.json`` when its inputs match, else sample pixels and fit KMeans once."""
    q_cfg = cfg.quantize
    root = Path(cfg.data.root)
    chosen = train
    if len(train) > FIT_MAX_MASKS:
        pick = np.random.default_rng(q_cfg.seed).choice(len(train), FIT_MAX_MASKS, replace=False)
        chosen = [train[i] for i in sorted(pick)]
    key = digest({"quantize": vars(q_cfg), "layout": cfg.data.layout, "versions": versions(),
                  "max_masks": FIT_MAX_MASKS, "sources": [stat(root, s.color or s.photo) for s in chosen]})
    key_file, q_file = out / PROGRESS / "quantizer.key", out / sh.QUANTIZER
    if key_file.exists() and q_file.exists() and key_file.read_text() == key:
        log.info("reusing %s (same inputs)", q_file)
        return Quantizer.from_json(q_file.read_text(), str(q_file)), {"reused": True}
    per = math.ceil(q_cfg.sample_pixels / len(chosen))
    import sklearn.cluster  # noqa: F401  (imported here, about a second, so it is not timed as the fit)

    t0 = time.perf_counter()
    tasks = [(s, per, q_cfg.seed) for s in chosen]
    got = dict(run_tasks(sample_pixels, tasks, processes, State(job)))
    parts = [got[s.index] for s in chosen if got[s.index] is not None]
    pixels = np.concatenate(parts)[: q_cfg.sample_pixels] if parts else np.zeros((0, 3), np.uint8)
    t1 = time.perf_counter()
    q = fit_quantizer(pixels, q_cfg.k, q_cfg.seed, q_cfg.max_distance)
    t2 = time.perf_counter()
    q_file.write_bytes(q.to_json().encode())
    key_file.write_bytes(key.encode())
    log.info("KMeans k=%d on %d pixels from %d masks: sampled in %.2fs, fitted in %.2fs",
             len(q.centroids), len(pixels), len(chosen), t1 - t0, t2 - t1)
    return q, {"reused": False, "sample_s": t1 - t0, "fit_s": t2 - t1}


def _clean_start(out: storage.Location) -> None:
    """A rerun first drops the manifest (the 'complete' mark) and any half-written temp file."""
    out.check()
    (out / sh.MANIFEST).remove()
    _remove_tmp(out)


def _remove_tmp(out: storage.Location) -> None:
    """Local half-written files (``.name.tmp``); a store never holds any: an object is written whole."""
    for d in (out, out / PROGRESS):
        for name in d.listdir():
            if name.startswith(".") and name.endswith(".tmp"):
                (d / name).remove()


def _publish(out: storage.Location, rec: dict, tmp: Optional[Path]) -> dict:
    """Put a built shard in place (a local rename or one whole object), then its sidecar record,
    which says the shard is done. A unit whose samples were all skipped leaves no shard."""
    shard = out / rec["name"]
    if tmp is None:
        shard.remove()  # an earlier run's shard of that name
    else:
        shard.publish_file(tmp)
    (out / PROGRESS / f"{rec['name']}.json").write_json(rec)
    return rec


def _job(cfg: Config, out: storage.Location) -> Job:
    """The worker's settings, after the one check the config schema cannot express."""
    d, enc = cfg.data, cfg.shards
    if storage.location(d.root).local_path is None:
        raise UnetDistError(f"data.root: {d.root}: raw data must be a local path (preprocess reads it from this "
                            "machine; shards.dir may be in an object store)")
    tile = tuple(enc.photo_tile) if enc.photo_tile and enc.photo_encoding == "jpeg" else None
    return Job(str(d.root), str(out), d.label_source, d.on_bad_input, tuple(d.resize) if d.resize else None,
               photo_encoding=enc.photo_encoding, jpeg_quality=enc.jpeg_quality, photo_tile=tile)


def run(cfg: Config) -> dict:
    """Run the whole job; returns the summary (also printed by :func:`unet_dist.preprocess.cli.main`)."""
    t_start = time.perf_counter()
    validate(cfg)  # the schema's checks (samples_per_shard, resize, jpeg_quality, photo_tile, ...)
    d = cfg.data
    out = storage.location(cfg.shards.dir)  # a local path or an object-store URL
    job = _job(cfg, out)
    samples = list_samples(d.root, d.layout, d.label_source, d.max_samples)
    processes = cfg.shards.processes or os.cpu_count() or 1
    _clean_start(out)
    log.info("%s layout at %s: %s", d.layout, d.root, ", ".join(f"{s} {len(v)} samples" for s, v in samples.items()))

    q, fit_info, q_sha, lut, lut_s = None, {}, None, None, 0.0
    if d.label_source == "color":
        q, fit_info = _fit(cfg, job, samples["train"], out, processes)
        q_sha = (out / sh.QUANTIZER).sha256()
        job = dataclasses.replace(job, quantizer_json=q.to_json(), quantizer_sha=q_sha)
    else:
        (out / sh.QUANTIZER).remove()

    units = plan_units(cfg, samples, q_sha)
    records = {u.name: r for u in units if (r := finished(out, u, d.on_bad_input)) is not None}
    todo = [u for u in units if u.name not in records]
    if records:
        log.info("resuming: %d of %d shards already complete and verified", len(records), len(units))
    if q is not None and todo:
        t0 = time.perf_counter()
        lut = q.build_lut(far_value=FAR)  # built once; forked workers inherit it
        lut_s = time.perf_counter() - t0
        log.info("colour table (2^24 entries) built in %.2fs", lut_s)
    t0 = time.perf_counter()
    results = run_tasks(build_shard, todo, min(processes, max(1, len(todo))), State(job, lut))
    try:
        published = (_publish(out, rec, tmp) for rec, tmp in results)
        for rec in _progress(published, len(todo), "shards", lambda r, i: f"wrote {r['name']} ({r['samples']} samples)"):
            records[rec["name"]] = rec
    except BaseException:
        results.close()  # the pool is stopped first, then its half-written files go
        _remove_tmp(out)
        raise
    shard_s = time.perf_counter() - t0
    manifest = mf.build(cfg, units, records, q_sha)
    mf.drop_stale(out, units, manifest)
    (out / sh.MANIFEST).write_json(manifest)  # last: the folder is complete

    seconds = time.perf_counter() - t_start
    built = sum(records[u.name]["samples"] for u in todo)
    for r in (records[u.name] for u in units):
        for note in r["notes"]:
            log.warning("%s", note)
    return {
        "shards_dir": str(out),
        "samples": {s: v["samples"] for s, v in manifest["splits"].items()},
        "shards": {s: len(v["shards"]) for s, v in manifest["splits"].items()},
        "skipped": len(manifest["skipped"]), "reused_shards": len(units) - len(todo),
        "converted": sum(len(records[u.name]["notes"]) for u in units),
        "unmatched_pixels": manifest["unmatched_pixels"], "kmeans_agreement": manifest["kmeans_agreement"],
        "seconds": seconds, "images_per_s": built / seconds if seconds > 0 else 0.0,
        "shard_seconds": shard_s, "shard_images_per_s": built / shard_s if shard_s > 0 else 0.0,
        "lut_seconds": lut_s, "fit_seconds": fit_info.get("fit_s"),
        "processes": processes,
    }
