"""The pool's tasks: sample mask pixels for the KMeans fit, and build one shard per unit.

Workers get everything they need from :func:`run_tasks` through the pool initializer: the
:class:`~unet_dist.preprocess.plan.Job` and the 2^24-entry colour table (16 MB). Under fork the
initializer's arguments are inherited, not pickled, so the table built once by the parent is
shared copy-on-write; under spawn it is pickled once per worker. Nothing is passed through module
globals of the parent: the one global below is set by the initializer inside each worker.
Workers write local files only; the job publishes them (:func:`unet_dist.preprocess.job.run`).
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from unet_dist import storage
from unet_dist.data import shards as sh
from unet_dist.data.quantize import lookup, sample_mask_pixels
from unet_dist.data.sources import BadInput, RawSample, load_sample
from unet_dist.encoding import encode_jpeg, encode_png
from unet_dist.labels import IGNORE, NUM_CLASSES, id_to_train_id_lut
from unet_dist.preprocess.plan import Job, Unit

FAR = 254  # table marker for colours far from every centroid: counted, then stored as ignore (255)
_ID_LUT = id_to_train_id_lut()


@dataclass(frozen=True)
class State:
    """A worker's whole input: the job and, for colour masks, the colour -> class table."""

    job: Job
    lut: Optional[np.ndarray] = None


_WORKER: Optional[State] = None  # this pool process's State, set by _init_worker only


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the job process dies, so a killed job leaves no orphans."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _init_worker(state: State) -> None:
    global _WORKER
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool
    _WORKER = state


def sample_pixels(state: State, task: tuple[RawSample, int, int]) -> tuple[int, Optional[np.ndarray]]:
    """Seeded pixels of one train colour mask (seeded by sample index: independent of workers)."""
    sample, n, seed = task
    try:
        dec = load_sample(state.job.root, sample, "color")
    except BadInput:
        if state.job.on_bad_input == "fail":
            raise
        return sample.index, None  # recorded when its shard is built
    return sample.index, sample_mask_pixels(dec.mask, n, np.random.default_rng([seed, sample.index]))


def _rel(job: Job, path: str) -> str:
    try:
        return Path(os.path.relpath(path, job.root)).as_posix()
    except ValueError:
        return path


def build_shard(state: State, unit: Unit) -> tuple[dict, Optional[Path]]:
    """Decode, map and encode the unit's samples into one local tar; returns its record and the
    file (None when every sample was skipped), which the job publishes. Workers never touch an
    object store: SDK connections a forked worker inherits from its parent are not safe to share
    (Azure's SDK keeps one pool per process, and two processes on one socket mix their replies)."""
    job, lut = state.job, state.lut
    out = storage.location(job.out)
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
                ids = lookup(lut, dec.mask)
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
                photo, ext = encode_jpeg(sh.resize_photo(dec.photo, job.resize)), "jpg"
                ids = sh.resize_label(ids, job.resize)
            elif dec.photo_bytes is not None:
                photo, ext = dec.photo_bytes, dec.photo_ext
            elif dec.photo_ext == "png":
                photo, ext = encode_png(dec.photo), "png"
            else:
                photo, ext = encode_jpeg(dec.photo), "jpg"
            counts[:] += np.bincount(ids.ravel(), minlength=256)
            sizes.add(ids.shape)
            rec["samples"] += 1
            rec["notes"] += dec.notes
            yield from sh.sample_members(sh.sample_key(s.split, s.index), photo, ext, ids, s.photo, s.split)

    tmp: Optional[Path] = (out / unit.name).staging()
    try:
        rec["sha256"], rec["bytes"] = sh.write_tar_file(tmp, members())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if rec["samples"] == 0:  # every sample skipped: no shard
        tmp.unlink()
        tmp, rec["sha256"], rec["bytes"] = None, None, 0
    rec["class_pixels"] = [int(c) for c in counts[:NUM_CLASSES]] + [int(counts[IGNORE])]
    rec["sizes"] = sorted([int(h), int(w)] for h, w in sizes)
    return rec, tmp


def _add_photo_error(acc: list, rgb: np.ndarray, members: list[tuple[str, bytes]]) -> None:
    """Add the stored photo's pixel error against the source pixels (what a lossless PNG keeps)."""
    from unet_dist.data.decode import decode_photo  # the loader's own decoder: what training sees

    d = decode_photo(dict(members)).astype(np.int16) - rgb
    acc[0] += int(np.abs(d).sum())
    acc[1] += int((d.astype(np.int32) ** 2).sum())
    acc[2] += int(d.size)


# Module-level entry points for the pool (a task must be picklable by name): each reads the State
# its process was initialised with.
def _pool_sample_pixels(task):
    return sample_pixels(_WORKER, task)


def _pool_build_shard(unit):
    return build_shard(_WORKER, unit)


_TASKS = {sample_pixels: _pool_sample_pixels, build_shard: _pool_build_shard}


def run_tasks(task: Callable, items: list, processes: int, state: State) -> Iterator:
    """``task(state, item)`` over ``items``, results in completion order: in this process for one
    process or one item, else in a pool (fork where available) whose initializer gets ``state``."""
    if processes <= 1 or len(items) <= 1:
        for item in items:
            yield task(state, item)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else None)  # fork: the table is inherited
    with ctx.Pool(min(processes, len(items)), _init_worker, (state,)) as pool:
        yield from pool.imap_unordered(_TASKS[task], items, chunksize=1)
