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
from unet_dist.files import encode_png, fsync_dir, sha256_file, tmp_path

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


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
    """Write a deterministic tar atomically; returns (sha256, bytes)."""
    path = Path(path)
    tmp = tmp_path(path)
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
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return digest, size


def load_manifest(shards_dir: str | Path) -> dict:
    """The manifest of a finished preprocess run; a clear error if it is missing or invalid."""
    d = Path(shards_dir)
    hint = "run python -m unet_dist.preprocess first"
    if not d.is_dir():
        raise UnetDistError(f"{d}: shards directory not found; {hint}")
    path = d / MANIFEST
    if not path.is_file():
        raise UnetDistError(f"{path}: manifest not found (preprocess unfinished?); {hint}")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UnetDistError(f"{path}: not valid JSON ({e}); {hint}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("splits"), dict):
        raise UnetDistError(f"{path}: expected a format {FORMAT} manifest with 'splits'; {hint}")
    for split, s in m["splits"].items():
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list) or not all(
                isinstance(x, dict) and {"name", "sha256", "samples"} <= x.keys() for x in s["shards"]):
            raise UnetDistError(f"{path}: split {split!r} lacks a valid 'shards' list; {hint}")
    return m


def _split(manifest: dict, split: str, where: str) -> dict:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UnetDistError(f"{where}: no split {split!r} in the manifest (has: {', '.join(splits) or 'none'})")
    return splits[split]


def shard_paths(shards_dir: str | Path, manifest: dict, split: str) -> list[str]:
    """Paths of the split's shards, in order, as strings webdataset accepts as URLs."""
    entry = _split(manifest, split, str(Path(shards_dir) / MANIFEST))
    return [str(Path(shards_dir) / s["name"]) for s in entry["shards"]]


def verify_shards(shards_dir: str | Path, manifest: dict, split: str) -> None:
    """Check every shard of ``split`` exists and matches its manifest sha256."""
    entry = _split(manifest, split, str(Path(shards_dir) / MANIFEST))
    for s in entry["shards"]:
        path = Path(shards_dir) / s["name"]
        if not path.is_file():
            raise UnetDistError(f"{path}: shard listed in the manifest is missing")
        got = sha256_file(path)
        if got != s["sha256"]:
            raise UnetDistError(f"{path}: sha256 {got[:12]}... does not match the manifest's "
                                f"{s['sha256'][:12]}...; the shard is corrupt or stale, rerun preprocess")
