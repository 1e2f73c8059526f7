"""The raw dataset layouts on disk (``pairs`` and ``cityscapes``, as :mod:`unet_dist.data.sources`
reads them), written resumably and in parallel from :mod:`unet_dist.synth.scenes`."""
from __future__ import annotations

import json
import os
import typing
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from unet_dist.config import Layout
from unet_dist.data.sources import CS_COLOR, CS_IDS, CS_LABEL_DIR, CS_PHOTO, CS_PHOTO_DIR
from unet_dist.errors import UnetDistError
from unet_dist.encoding import encode_jpeg, encode_png
from unet_dist.storage.local import write_bytes_atomic
from unet_dist.synth.scenes import ID_COLORS, render_scene, sample_rng

LAYOUTS = typing.get_args(Layout)
PAIRS_SIZE = (256, 256)  # photo size; the file is the photo and its mask side by side (256x512)
PAIRS_JPEG_QUALITY = 90  # lower than the shards': the public pairs set is noisy JPEG too
CITYSCAPES_SIZE = (256, 512)
CITIES = {"train": ("synthcity", "testville"), "val": ("valburg",)}
MARKER = "synth.json"
_VERSION = 1  # bump when scenes change: a marker with another version refuses to resume


def pairs_image(rng: np.random.Generator) -> np.ndarray:
    """A 256x512 photo|colour-mask image like the public pairs set: the mask is rendered at 2x,
    colourised and downsized with a bilinear filter, so edges carry blended colours (the JPEG
    written from it adds the rest of the noise)."""
    h, w = PAIRS_SIZE
    photo, label2x = render_scene(rng, h, w, supersample=2)
    mask = Image.fromarray(ID_COLORS[label2x]).resize((w, h), Image.BILINEAR)
    return np.concatenate([photo, np.asarray(mask)], axis=1)


def sample_paths(layout: str, split: str, index: int) -> list[str]:
    """The files (relative to the dataset root) that sample ``index`` (0-based) of a split writes."""
    if layout == "pairs":
        return [f"{split}/{index + 1}.jpg"]
    cities = CITIES[split]
    city, seq = cities[index % len(cities)], index // len(cities)
    stem = f"{city}/{city}_{seq:06d}_000019"
    return [f"{CS_PHOTO_DIR}/{split}/{stem}{CS_PHOTO}", f"{CS_LABEL_DIR}/{split}/{stem}{CS_COLOR}",
            f"{CS_LABEL_DIR}/{split}/{stem}{CS_IDS}"]


def write_sample(out: str, layout: str, split: str, index: int, seed: int,
                 size: Optional[tuple[int, int]]) -> bool:
    """Render and write one sample; False when all its files already exist (a resumed run)."""
    root = Path(out)
    paths = [root / p for p in sample_paths(layout, split, index)]
    if all(p.is_file() for p in paths):
        return False
    rng = sample_rng(seed, split, index)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    if layout == "pairs":
        write_bytes_atomic(paths[0], encode_jpeg(pairs_image(rng), quality=PAIRS_JPEG_QUALITY))
        return True
    h, w = size or CITYSCAPES_SIZE
    photo, label = render_scene(rng, h, w)
    color = np.concatenate([ID_COLORS[label], np.full((h, w, 1), 255, np.uint8)], axis=2)
    # labelIds and colour first, the photo last: the reader lists photos, so a sample only
    # becomes visible once all three of its files are in place
    write_bytes_atomic(paths[2], encode_png(label))
    write_bytes_atomic(paths[1], encode_png(color))
    write_bytes_atomic(paths[0], encode_png(photo))
    return True


def _write_sample_args(args: tuple) -> bool:
    return write_sample(*args)


def _check_args(layout, n_train, n_val, seed, size) -> Optional[tuple[int, int]]:
    if layout not in LAYOUTS:
        raise UnetDistError(f"layout: expected one of {'|'.join(LAYOUTS)}, got {layout!r}")
    for key, n in (("train", n_train), ("val", n_val)):
        if not isinstance(n, int) or n < 0:
            raise UnetDistError(f"{key}: expected a sample count >= 0, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UnetDistError(f"seed: expected an integer >= 0, got {seed!r}")
    if size is None:
        return None
    size = tuple(int(v) for v in size)
    if len(size) != 2 or not all(16 <= v <= 4096 for v in size):
        raise UnetDistError(f"size: expected [height, width] of 16..4096 pixels each, got {list(size)}")
    if layout == "pairs" and size != PAIRS_SIZE:
        raise UnetDistError(f"size: the pairs layout is always a 256x256 photo beside its mask "
                            f"(a 256x512 file); got {size[0]}x{size[1]}")
    return size


def _prepare_root(root: Path, marker: dict) -> None:
    """Refuse to mix datasets: a non-empty directory must hold the same generator settings."""
    path = root / MARKER
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UnetDistError(f"{path}: unreadable; expected the JSON this generator writes") from None
        if old != marker:
            diff = ", ".join(f"{k}={old.get(k)!r}" for k in marker if old.get(k) != marker[k])
            raise UnetDistError(f"{path}: {root} was generated with {diff}; use the same settings "
                                "to resume or another --out")
    elif root.is_dir() and any(root.iterdir()):
        raise UnetDistError(f"{root}: not empty and has no {MARKER}; expected a new or synthetic dataset directory")
    root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())


def _drop_extras(root: Path, layout: str, split: str, n: int) -> int:
    """Remove samples of an earlier, larger run (their names are ours: the marker matched)."""
    removed, i = 0, n
    while True:
        paths = [root / p for p in sample_paths(layout, split, i)]
        present = [p for p in paths if p.is_file()]
        if not present:
            return removed
        for p in present:
            p.unlink()
        removed, i = removed + 1, i + 1


def _drop_partials(root: Path) -> None:
    for p in root.rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def write_dataset(out: str | Path, layout: str, n_train: int, n_val: int, seed: int = 0,
                  size: tuple[int, int] | None = None, processes: int = 0) -> dict:
    """Write a synthetic dataset in a raw layout; resumable (existing samples are kept as they are,
    the bytes would be identical) and parallel (``processes`` 0 = one per core, 1 = in-process)."""
    size = _check_args(layout, n_train, n_val, seed, size)
    root = Path(out)
    eff = size if layout == "cityscapes" else None
    marker = {"generator": "unet_dist.synth", "version": _VERSION, "layout": layout, "seed": seed,
              "size": list(eff or (CITYSCAPES_SIZE if layout == "cityscapes" else PAIRS_SIZE))}
    _prepare_root(root, marker)
    _drop_partials(root)
    counts = {"train": n_train, "val": n_val}
    removed = sum(_drop_extras(root, layout, s, n) for s, n in counts.items())
    tasks = [(str(root), layout, s, i, seed, eff) for s, n in counts.items() for i in range(n)]
    procs = (os.cpu_count() or 1) if processes <= 0 else processes
    procs = max(1, min(procs, len(tasks)))
    if procs == 1:
        written = [_write_sample_args(t) for t in tasks]
    else:  # spawn: safe even when the caller has threads (torch, ray) running
        with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
            written = list(pool.map(_write_sample_args, tasks, chunksize=max(1, len(tasks) // (procs * 8))))
    return {"layout": layout, "out": str(root), "train": n_train, "val": n_val, "seed": seed,
            "size": marker["size"], "written": int(sum(written)), "kept": len(tasks) - int(sum(written)),
            "removed": removed}
