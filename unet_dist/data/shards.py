"""WebDataset shard files: deterministic encoding, atomic writes, and the manifest that lists them.

Bytes depend only on the inputs and the config: fixed member order, tar headers with mtime 0 and
owner 0/"" , the fixed PNG/JPEG encoders of :mod:`unet_dist.files`, JSON with sorted keys. A shard
appears under its final name only once complete, so a reader or a rerun never sees half a tar.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from unet_dist.errors import UnetDistError
from unet_dist import storage
from unet_dist.files import encode_png, sha256_file

MANIFEST = "manifest.json"
QUANTIZER = "quantizer.json"  # beside the manifest when labels come from KMeans on colour masks
FORMAT = 1


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def resize_photo(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (PIL antialiases when shrinking, close to area averaging); size = (h, w)."""
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def resize_label(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour only: a label must never be blended into another class."""
    h, w = size
    return np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.NEAREST))


def sample_members(key: str, image: bytes, image_ext: str, label: np.ndarray,
                   source: str, split: str) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in fixed order: image, label, json."""
    meta = {"source": source, "height": int(label.shape[0]), "width": int(label.shape[1]), "split": split}
    return [
        (f"{key}.image.{image_ext}", image),
        (f"{key}.label.png", encode_png(label)),
        (f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
    ]


def write_tar(url: str | Path, members: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
    """Write a deterministic tar, published in one step (a local rename or one S3 PUT) only once
    complete; returns (sha256, bytes)."""
    tmp = storage.staging_path(url)
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        digest, size = sha256_file(tmp), tmp.stat().st_size
        storage.publish_file(tmp, url)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, size


HINT = "run python -m unet_dist.preprocess first"


def load_manifest(shards_dir: str | Path) -> dict:
    """The manifest of a finished preprocess run; a clear error if it is missing or invalid."""
    d = str(shards_dir)
    storage.check(d)
    path = storage.join(d, MANIFEST)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        if not storage.is_dir(d):
            raise UnetDistError(f"{d}: shards directory not found; {HINT}") from None
        raise UnetDistError(f"{path}: manifest not found (preprocess unfinished?); {HINT}") from None
    except UnicodeDecodeError as e:
        raise UnetDistError(f"{path}: not valid JSON ({e}); {HINT}") from None
    try:
        m = json.loads(text)
    except ValueError as e:
        raise UnetDistError(f"{path}: not valid JSON ({e}); {HINT}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("splits"), dict):
        raise UnetDistError(f"{path}: expected a format {FORMAT} manifest with 'splits'; {HINT}")
    for split, s in m["splits"].items():
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list) or not all(
                isinstance(x, dict) and {"name", "sha256", "samples"} <= x.keys() for x in s["shards"]):
            raise UnetDistError(f"{path}: split {split!r} lacks a valid 'shards' list; {HINT}")
    return m


def _split(manifest: dict, split: str, where: str) -> dict:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UnetDistError(f"{where}: no split {split!r} in the manifest (has: {', '.join(splits) or 'none'})")
    return splits[split]


def shard_paths(shards_dir: str | Path, manifest: dict, split: str) -> list[str]:
    """Paths or ``s3://`` URLs of the split's shards, in order (webdataset opens both)."""
    entry = _split(manifest, split, storage.join(shards_dir, MANIFEST))
    return [storage.join(shards_dir, s["name"]) for s in entry["shards"]]


def check_listed(shards_dir: str | Path, manifest: dict, split: str) -> None:
    """Every shard the manifest lists for ``split`` is there with the listed size: one listing plus
    one size query per shard, cheap enough for a driver's preflight before any worker starts."""
    entry = _split(manifest, split, storage.join(shards_dir, MANIFEST))
    listed = set(storage.listdir(shards_dir))
    for s in entry["shards"]:
        path = storage.join(shards_dir, s["name"])
        if s["name"] not in listed:
            raise UnetDistError(f"{path}: shard listed in the manifest is missing")
        if "bytes" in s and (size := storage.size(path)) != s["bytes"]:
            raise UnetDistError(f"{path}: {size} bytes, the manifest says {s['bytes']}; "
                                f"the shard is corrupt or stale, rerun preprocess")


def verify_shards(shards_dir: str | Path, manifest: dict, split: str) -> None:
    """:func:`check_listed`, then every shard's sha256 against the manifest (on S3 each object is
    read once: a checksum stored beside it would only be the uploader's word)."""
    check_listed(shards_dir, manifest, split)
    for s in _split(manifest, split, storage.join(shards_dir, MANIFEST))["shards"]:
        path = storage.join(shards_dir, s["name"])
        got = storage.sha256(path)
        if got != s["sha256"]:
            raise UnetDistError(f"{path}: sha256 {got[:12]}... does not match the manifest's "
                                f"{s['sha256'][:12]}...; the shard is corrupt or stale, rerun preprocess")
