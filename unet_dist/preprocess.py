"""The preprocess job: raw dataset -> KMeans fitted once -> deterministic, resumable WebDataset shards.

    python -m unet_dist.preprocess --config jobs/configs/demo.yaml --set data.root=data/synth

Steps: list the sorted samples of each split; sample mask pixels across the train masks (seeded);
fit KMeans once and save ``quantizer.json``; build the 256^3 colour -> trainId table once; then map
and write shards in a process pool, one shard per task (workers inherit the table through fork).
Each finished shard leaves a hidden sidecar (``.progress/<shard>.json``) with its sha256 and stats,
so a rerun keeps verified shards and rebuilds only missing or invalid ones; ``manifest.json`` is
written last, so its presence means the directory is complete.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import sys
import time
import dataclasses
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from unet_dist.config import Config, config_from_args, to_dict, validate
from unet_dist import files
from unet_dist import storage
from unet_dist.data import shards as sh
from unet_dist.data.quantize import Quantizer, fit_quantizer, lookup, sample_mask_pixels
from unet_dist.data.sources import SPLITS, BadInput, Sample, list_samples, load_sample
from unet_dist.errors import UnetDistError
from unet_dist.labels import IGNORE, NUM_CLASSES, id_to_train_id_lut

log = logging.getLogger("unet_dist.preprocess")

FAR = 254  # table marker for colours far from every centroid: counted, then stored as ignore (255)
FIT_MAX_MASKS = 500  # train masks read to sample KMeans pixels (a seeded subset beyond this)
PROGRESS = ".progress"  # hidden folder of per-shard sidecars (resume state)
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")


@dataclass(frozen=True)
class Job:
    """What every worker needs: small and picklable (the table itself is inherited or rebuilt)."""

    root: str
    out: str
    label_source: str
    on_bad_input: str
    resize: Optional[tuple[int, int]]
    quantizer_json: Optional[str] = None
    quantizer_sha: Optional[str] = None
    photo_encoding: str = "source"  # shards.photo_encoding
    jpeg_quality: int = files.JPEG_QUALITY
    photo_tile: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Unit:
    """One shard: the unit of parallel work and of resume."""

    split: str
    index: int
    samples: tuple[Sample, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return sh.shard_name(self.split, self.index)


_JOB: Optional[Job] = None
_LUT: Optional[np.ndarray] = None
_LUT_SHA: Optional[str] = None
_ID_LUT = id_to_train_id_lut()


def versions() -> dict[str, str]:
    """Versions that can change shard bytes or the fit, recorded in the manifest."""
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "pillow", "scikit-learn", "unet_dist"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _stat(root: Path, rel: Optional[str]) -> list:
    try:
        st = (root / rel).stat()
        return [rel, st.st_size, st.st_mtime_ns]
    except (OSError, TypeError):
        return [rel, None, None]


def _source_files(s: Sample, label_source: str) -> list[Optional[str]]:
    if s.color is None:
        return [s.photo]
    return [s.photo, s.label_ids] if label_source == "labelIds" else [s.photo, s.color, s.label_ids]


# ---------------------------------------------------------------- workers


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the job process dies, so a killed job leaves no orphans."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _init_worker(job: Job, in_process: bool = False) -> None:
    """Set the job; build the colour table unless it was inherited through fork."""
    global _JOB, _LUT, _LUT_SHA
    if not in_process:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool
    _JOB = job
    if job.quantizer_json and _LUT_SHA != job.quantizer_sha:
        _LUT = Quantizer.from_json(job.quantizer_json).build_lut(far_value=FAR)
        _LUT_SHA = job.quantizer_sha


def _sample_task(task: tuple[Sample, int, int]) -> tuple[int, Optional[np.ndarray]]:
    """Seeded pixels of one train colour mask (seeded by sample index: independent of workers)."""
    sample, n, seed = task
    try:
        dec = load_sample(_JOB.root, sample, "color")
    except BadInput:
        if _JOB.on_bad_input == "fail":
            raise
        return sample.index, None  # recorded when its shard is built
    return sample.index, sample_mask_pixels(dec.mask, n, np.random.default_rng([seed, sample.index]))


def _rel(job: Job, path: str) -> str:
    try:
        return Path(os.path.relpath(path, job.root)).as_posix()
    except ValueError:
        return path


def _unit_task(unit: Unit) -> dict:
    """Decode, map and encode the unit's samples into one shard; returns (and saves) its record."""
    job = _JOB
    out = job.out
    rec = {"fingerprint": unit.fingerprint, "name": unit.name, "split": unit.split, "samples": 0,
           "sha256": None, "bytes": 0, "far_pixels": 0, "agree": [0, 0], "sizes": [],
           "skipped": [], "notes": [], "photo_error": [0, 0, 0]}  # sum |d|, sum d^2, values
    counts = np.zeros(256, dtype=np.int64)
    sizes: set[tuple[int, int]] = set()

    def members() -> Iterator[tuple[str, bytes]]:
        for s in unit.samples:
            try:
                dec = load_sample(job.root, s, job.label_source, want_truth=job.quantizer_json is not None)
            except BadInput as e:
                if job.on_bad_input == "fail":
                    raise
                rec["skipped"].append({"path": _rel(job, e.path), "split": s.split, "reason": e.reason})
                continue
            if job.label_source == "labelIds":
                ids = _ID_LUT[dec.mask]
            else:
                ids = lookup(_LUT, dec.mask)
                far = ids == FAR
                rec["far_pixels"] += int(far.sum())
                ids[far] = IGNORE
                if dec.truth is not None:
                    rec["agree"][0] += int((ids == _ID_LUT[dec.truth]).sum())
                    rec["agree"][1] += int(ids.size)
            if job.photo_encoding != "source":
                rgb = sh.resize_photo(dec.photo, job.resize) if job.resize else dec.photo
                photo, ext = sh.encode_photo(rgb, job.photo_encoding, job.jpeg_quality, job.photo_tile), ""
                if job.resize:
                    ids = sh.resize_label(ids, job.resize)
                if job.photo_encoding == "jpeg":
                    _add_photo_error(rec["photo_error"], rgb, photo)
            elif job.resize:
                photo, ext = files.encode_jpeg(sh.resize_photo(dec.photo, job.resize)), "jpg"
                ids = sh.resize_label(ids, job.resize)
            elif dec.photo_bytes is not None:
                photo, ext = dec.photo_bytes, dec.photo_ext
            elif dec.photo_ext == "png":
                photo, ext = files.encode_png(dec.photo), "png"
            else:
                photo, ext = files.encode_jpeg(dec.photo), "jpg"
            counts[:] += np.bincount(ids.ravel(), minlength=256)
            sizes.add(ids.shape)
            rec["samples"] += 1
            rec["notes"] += dec.notes
            yield from sh.sample_members(sh.sample_key(s.split, s.index), photo, ext, ids, s.photo, s.split)

    path = storage.join(out, unit.name)
    rec["sha256"], rec["bytes"] = sh.write_tar(path, members())
    if rec["samples"] == 0:  # every sample skipped: no shard
        storage.remove(path)
        rec["sha256"], rec["bytes"] = None, 0
    rec["class_pixels"] = [int(c) for c in counts[:NUM_CLASSES]] + [int(counts[IGNORE])]
    rec["sizes"] = sorted([int(h), int(w)] for h, w in sizes)
    storage.write_json(storage.join(out, PROGRESS, f"{unit.name}.json"), rec)
    return rec


def _add_photo_error(acc: list, rgb: np.ndarray, members: list[tuple[str, bytes]]) -> None:
    """Add the stored photo's pixel error against the source pixels (what a lossless PNG keeps)."""
    from unet_dist.data.loader import decode_photo  # the loader's own decoder: what training sees

    d = decode_photo(dict(members)).astype(np.int16) - rgb
    acc[0] += int(np.abs(d).sum())
    acc[1] += int((d.astype(np.int32) ** 2).sum())
    acc[2] += int(d.size)


def photo_error(acc: list) -> Optional[dict]:
    """Mean absolute error (grey levels) and PSNR (dB) of stored photos against their source pixels."""
    total, sq, n = acc
    if not n:
        return None
    mse = sq / n
    return {"mean_abs_error": round(total / n, 4),
            "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else None, "values": n}


def _run_tasks(fn: Callable, tasks: list, processes: int, job: Job) -> Iterator:
    """Results of ``fn`` over ``tasks`` in completion order: a fork pool, or in-process for one."""
    if processes <= 1 or len(tasks) <= 1:
        _init_worker(job, in_process=True)
        for t in tasks:
            yield fn(t)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else None)  # fork: workers inherit the table
    with ctx.Pool(min(processes, len(tasks)), _init_worker, (job,)) as pool:
        yield from pool.imap_unordered(fn, tasks, chunksize=1)


def _progress(it: Iterable, total: int, desc: str, every: Callable[[object, int], str]) -> Iterator:
    """A tqdm bar on a terminal, plain log lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(it, total=total, desc=desc, unit="shard")
        return
    for i, r in enumerate(it, 1):
        log.info("%s [%d/%d]", every(r, i), i, total)
        yield r


# ---------------------------------------------------------------- the job


def _fit(cfg: Config, job: Job, train: list[Sample], out: str, processes: int) -> tuple[Quantizer, dict]:
    """Reuse ``quantizer.json`` when its inputs match, else sample pixels and fit KMeans once."""
    q_cfg = cfg.quantize
    root = Path(cfg.data.root)
    chosen = train
    if len(train) > FIT_MAX_MASKS:
        pick = np.random.default_rng(q_cfg.seed).choice(len(train), FIT_MAX_MASKS, replace=False)
        chosen = [train[i] for i in sorted(pick)]
    key = _digest({"quantize": vars(q_cfg), "layout": cfg.data.layout, "versions": versions(),
                   "max_masks": FIT_MAX_MASKS, "sources": [_stat(root, s.color or s.photo) for s in chosen]})
    key_file, q_file = storage.join(out, PROGRESS, "quantizer.key"), storage.join(out, sh.QUANTIZER)
    if storage.exists(key_file) and storage.exists(q_file) and storage.read_text(key_file) == key:
        log.info("reusing %s (same inputs)", q_file)
        return Quantizer.from_json(storage.read_text(q_file), q_file), {"reused": True}
    per = math.ceil(q_cfg.sample_pixels / len(chosen))
    import sklearn.cluster  # noqa: F401  (imported here, about a second, so it is not timed as the fit)

    t0 = time.perf_counter()
    tasks = [(s, per, q_cfg.seed) for s in chosen]
    got = dict(_run_tasks(_sample_task, tasks, processes, job))
    parts = [got[s.index] for s in chosen if got[s.index] is not None]
    pixels = np.concatenate(parts)[: q_cfg.sample_pixels] if parts else np.zeros((0, 3), np.uint8)
    t1 = time.perf_counter()
    q = fit_quantizer(pixels, q_cfg.k, q_cfg.seed, q_cfg.max_distance)
    t2 = time.perf_counter()
    storage.write_bytes(q_file, q.to_json().encode())
    storage.write_bytes(key_file, key.encode())
    log.info("KMeans k=%d on %d pixels from %d masks: sampled in %.2fs, fitted in %.2fs",
             len(q.centroids), len(pixels), len(chosen), t1 - t0, t2 - t1)
    return q, {"reused": False, "sample_s": t1 - t0, "fit_s": t2 - t1}


LABEL_STORAGE = {"encoding": "png", "filter": "none", "zlib_level": sh.LABEL_LEVEL}  # always lossless


def photo_storage(cfg: Config) -> dict:
    """How photos are stored, as the manifest records it."""
    enc = cfg.shards
    out: dict = {"encoding": enc.photo_encoding}
    if enc.photo_encoding == "jpeg":
        out.update(jpeg_quality=enc.jpeg_quality, tile=list(enc.photo_tile) if enc.photo_tile else None)
    elif enc.photo_encoding == "source":
        out["note"] = "source bytes when not resized, else JPEG q95"
    return out


def _plan(cfg: Config, samples: dict[str, list[Sample]], q_sha: Optional[str]) -> list[Unit]:
    d = cfg.data
    root = Path(d.root)
    base = {"format": sh.FORMAT, "layout": d.layout, "label_source": d.label_source,
            "resize": d.resize, "quantizer": q_sha, "versions": versions(), "photos": photo_storage(cfg),
            "labels": LABEL_STORAGE}
    n = cfg.shards.samples_per_shard
    units = []
    for split in SPLITS:
        for i in range(0, len(samples[split]), n):
            chunk = tuple(samples[split][i:i + n])
            files = [_stat(root, f) for s in chunk for f in _source_files(s, d.label_source)]
            fp = _digest({**base, "name": sh.shard_name(split, i // n), "sources": files})
            units.append(Unit(split, i // n, chunk, fp))
    return units


def _finished(out: str, unit: Unit, on_bad_input: str) -> Optional[dict]:
    """The unit's sidecar record when its shard is present and its bytes verify, else None (on S3
    the object is read back and hashed: the sidecar is the manifest-in-progress it must match).

    A shard that skipped bad input is rebuilt under ``fail``, so the error is raised.
    """
    try:
        rec = json.loads(storage.read_text(storage.join(out, PROGRESS, f"{unit.name}.json")))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != unit.fingerprint:
        return None
    if on_bad_input == "fail" and rec.get("skipped"):
        return None
    if rec.get("samples") == 0:
        return rec
    path = storage.join(out, unit.name)
    if not storage.exists(path) or storage.size(path) != rec.get("bytes") or storage.sha256(path) != rec.get("sha256"):
        log.warning("%s: missing or does not match its record; rebuilding", path)
        return None
    return rec


def _clean_start(out: str) -> None:
    """A rerun first drops the manifest (the 'complete' mark) and any half-written temp file."""
    storage.check(out)
    storage.remove(storage.join(out, sh.MANIFEST))
    _remove_tmp(out)


def _remove_tmp(out: str) -> None:
    """Local half-written files (``.name.tmp``); S3 never holds any: an object is one whole PUT."""
    for d in (out, storage.join(out, PROGRESS)):
        for name in storage.listdir(d):
            if name.startswith(".") and name.endswith(".tmp"):
                storage.remove(storage.join(d, name))


def run(cfg: Config) -> dict:
    """Run the whole job; returns the summary (also printed by :func:`main`)."""
    t_start = time.perf_counter()
    validate(cfg)  # the schema's checks (samples_per_shard, resize, jpeg_quality, photo_tile, ...)
    d = cfg.data
    samples = list_samples(d.root, d.layout, d.label_source, d.max_samples)
    out = storage.absolute(cfg.shards.dir)  # a local path or s3://bucket/prefix
    processes = cfg.shards.processes or os.cpu_count() or 1
    resize = tuple(d.resize) if d.resize else None
    enc = cfg.shards
    tile = tuple(enc.photo_tile) if enc.photo_tile and enc.photo_encoding == "jpeg" else None
    job = Job(str(d.root), out, d.label_source, d.on_bad_input, resize,
              photo_encoding=enc.photo_encoding, jpeg_quality=enc.jpeg_quality, photo_tile=tile)
    _clean_start(out)
    log.info("%s layout at %s: %s", d.layout, d.root, ", ".join(f"{s} {len(v)} samples" for s, v in samples.items()))

    global _LUT, _LUT_SHA
    q, fit_info, q_sha, lut_s = None, {}, None, 0.0
    if d.label_source == "color":
        q, fit_info = _fit(cfg, job, samples["train"], out, processes)
        q_sha = storage.sha256(storage.join(out, sh.QUANTIZER))
        job = dataclasses.replace(job, quantizer_json=q.to_json(), quantizer_sha=q_sha)
    else:
        storage.remove(storage.join(out, sh.QUANTIZER))

    units = _plan(cfg, samples, q_sha)
    records = {u.name: r for u in units if (r := _finished(out, u, d.on_bad_input)) is not None}
    todo = [u for u in units if u.name not in records]
    if records:
        log.info("resuming: %d of %d shards already complete and verified", len(records), len(units))
    if q is not None and todo and _LUT_SHA != q_sha:
        t0 = time.perf_counter()
        _LUT, _LUT_SHA = q.build_lut(far_value=FAR), q_sha  # built once; forked workers inherit it
        lut_s = time.perf_counter() - t0
        log.info("colour table (2^24 entries) built in %.2fs", lut_s)
    t0 = time.perf_counter()
    results = _run_tasks(_unit_task, todo, min(processes, max(1, len(todo))), job)
    try:
        for rec in _progress(results, len(todo), "shards", lambda r, i: f"wrote {r['name']} ({r['samples']} samples)"):
            records[rec["name"]] = rec
    except BaseException:
        results.close()  # the pool is stopped first, then its half-written files go
        _remove_tmp(out)
        raise
    shard_s = time.perf_counter() - t0
    manifest = _manifest(cfg, units, records, q_sha)
    _drop_stale(out, units, manifest)
    storage.write_json(storage.join(out, sh.MANIFEST), manifest)  # last: the directory is complete

    seconds = time.perf_counter() - t_start
    built = sum(records[u.name]["samples"] for u in todo)
    for r in (records[u.name] for u in units):
        for note in r["notes"]:
            log.warning("%s", note)
    return {
        "shards_dir": out,
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


def _manifest(cfg: Config, units: list[Unit], records: dict, q_sha: Optional[str]) -> dict:
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


def _drop_stale(out: str, units: list[Unit], manifest: dict) -> None:
    """Shards and sidecars of an earlier, different plan must not be mistaken for this one's."""
    keep = {s["name"] for v in manifest["splits"].values() for s in v["shards"]}
    planned = {u.name for u in units}
    for name in storage.listdir(out):
        if SHARD_RE.match(name) and name not in keep:
            log.info("removing stale %s", storage.join(out, name))
            storage.remove(storage.join(out, name))
    for name in storage.listdir(storage.join(out, PROGRESS)):
        if name.endswith(".tar.json") and name[:-5] not in planned:
            storage.remove(storage.join(out, PROGRESS, name))


def _summary_text(s: dict) -> str:
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
    from unet_dist import cli

    def parse() -> Config:
        parser = cli.parser("python -m unet_dist.preprocess", __doc__, config=True)
        return config_from_args(parser.parse_args(sys.argv[1:] if argv is None else argv))

    cli.run_main(lambda: print(_summary_text(run(parse())), flush=True))


if __name__ == "__main__":
    main()
