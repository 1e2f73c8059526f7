"""What a preprocess run will write: the job's settings, its units (one shard each) with their
fingerprints, and which units an earlier run already finished (the resume check).

A unit's fingerprint digests everything its bytes depend on: the source files (path, size, mtime),
the layout, label source, resize, quantizer, photo/label encodings and library versions. A rerun
keeps a shard only when its sidecar record (``.progress/<shard>.json``) has the same fingerprint
and the shard's bytes still hash to the recorded sha256.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

from unet_dist import storage
from unet_dist.config import Config
from unet_dist.data import shards as sh
from unet_dist.data.sources import SPLITS, RawSample
from unet_dist.encoding import JPEG_QUALITY

log = logging.getLogger("unet_dist.preprocess")

PROGRESS = ".progress"  # hidden folder of per-shard sidecars (resume state)
LABEL_STORAGE = {"encoding": "png", "filter": "none", "zlib_level": sh.LABEL_LEVEL}  # always lossless


@dataclass(frozen=True)
class Job:
    """What every worker needs: small and picklable (the colour table travels beside it)."""

    root: str
    out: str  # the shards location, as text (a path or a URL)
    label_source: str
    on_bad_input: str
    resize: Optional[tuple[int, int]]
    quantizer_json: Optional[str] = None
    quantizer_sha: Optional[str] = None
    photo_encoding: str = "source"  # shards.photo_encoding
    jpeg_quality: int = JPEG_QUALITY
    photo_tile: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Unit:
    """One shard: the unit of parallel work and of resume."""

    split: str
    index: int
    samples: tuple[RawSample, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return sh.shard_name(self.split, self.index)


def versions() -> dict[str, str]:
    """Versions that can change shard bytes or the fit, recorded in the manifest."""
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "pillow", "scikit-learn", "unet_dist"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def stat(root: Path, rel: Optional[str]) -> list:
    try:
        st = (root / rel).stat()
        return [rel, st.st_size, st.st_mtime_ns]
    except (OSError, TypeError):
        return [rel, None, None]


def source_files(s: RawSample, label_source: str) -> list[Optional[str]]:
    if s.color is None:
        return [s.photo]
    return [s.photo, s.label_ids] if label_source == "labelIds" else [s.photo, s.color, s.label_ids]


def photo_storage(cfg: Config) -> dict:
    """How photos are stored, as the manifest records it."""
    enc = cfg.shards
    out: dict = {"encoding": enc.photo_encoding}
    if enc.photo_encoding == "jpeg":
        out.update(jpeg_quality=enc.jpeg_quality, tile=list(enc.photo_tile) if enc.photo_tile else None)
    elif enc.photo_encoding == "source":
        out["note"] = "source bytes when not resized, else JPEG q95"
    return out


def plan_units(cfg: Config, samples: dict[str, list[RawSample]], q_sha: Optional[str]) -> list[Unit]:
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
            files = [stat(root, f) for s in chunk for f in source_files(s, d.label_source)]
            fp = digest({**base, "name": sh.shard_name(split, i // n), "sources": files})
            units.append(Unit(split, i // n, chunk, fp))
    return units


def finished(out: storage.Location, unit: Unit, on_bad_input: str) -> Optional[dict]:
    """The unit's sidecar record when its shard is present and its bytes verify, else None (in a
    store the object is read back and hashed: the sidecar is the manifest-in-progress it must match).

    A shard that skipped bad input is rebuilt under ``fail``, so the error is raised.
    """
    try:
        rec = json.loads((out / PROGRESS / f"{unit.name}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != unit.fingerprint:
        return None
    if on_bad_input == "fail" and rec.get("skipped"):
        return None
    if rec.get("samples") == 0:
        return rec
    path = out / unit.name
    if not path.exists() or path.size() != rec.get("bytes") or path.sha256() != rec.get("sha256"):
        log.warning("%s: missing or does not match its record; rebuilding", path)
        return None
    return rec
