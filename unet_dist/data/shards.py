"""WebDataset shard files: deterministic encoding, atomic writes, and the manifest that lists them.

Bytes depend only on the inputs and the config: fixed member order, tar headers with mtime 0 and
owner 0/"" , the fixed PNG/JPEG encoders of :mod:`unet_dist.encoding`, JSON with sorted keys. A shard
appears under its final name only once complete, so a reader or a rerun never sees half a tar.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from unet_dist.errors import UnetDistError
from unet_dist import storage
from unet_dist.encoding import encode_jpeg, encode_png
from unet_dist.storage import PathOrUrl

MANIFEST = "manifest.json"
QUANTIZER = "quantizer.json"  # beside the manifest when labels come from KMeans on colour masks
FORMAT = 1
LABEL_LEVEL = 1  # zlib level of label PNGs: inflates ~2x faster than level 6 (benchmarks/bench_loader.py)
LABEL_BLOCK = 64  # label rows between deflate flush points: a crop inflates only the blocks it needs
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


TILES_MAGIC = b"unet-dist jpeg tiles 1\n"


def encode_photo(rgb: np.ndarray, encoding: str, quality: int, tile: tuple[int, int] | None) -> list[tuple[str, bytes]]:
    """``(suffix, bytes)`` members of one photo: ``image.png``, ``image.jpg``, or ``image.tiles``
    (:func:`pack_tiles`: a grid of JPEG tiles in one member, so a loader decodes only the tiles
    under its crop; one tar member, because each member costs the tar reader ~0.1 ms)."""
    if encoding == "png":
        return [("image.png", encode_png(rgb))]
    h, w = rgb.shape[:2]
    if not tile or (tile[0] >= h and tile[1] >= w):
        return [("image.jpg", encode_jpeg(rgb, quality))]
    th, tw = tile
    jpegs = [encode_jpeg(np.ascontiguousarray(rgb[y:y + th, x:x + tw]), quality)
             for y in range(0, h, th) for x in range(0, w, tw)]
    return [("image.tiles", pack_tiles((h, w), (th, tw), jpegs))]


def pack_tiles(size: tuple[int, int], tile: tuple[int, int], jpegs: list[bytes]) -> bytes:
    """A magic line, a 4-byte big-endian length, a JSON header (photo size, tile size, byte length of
    each tile, row-major), then the tiles' JPEG files back to back."""
    head = json.dumps({"height": size[0], "width": size[1], "tile": list(tile),
                       "lengths": [len(j) for j in jpegs]}, separators=(",", ":")).encode()
    return TILES_MAGIC + struct.pack(">I", len(head)) + head + b"".join(jpegs)


def unpack_tiles(data: bytes) -> tuple[tuple[int, int], list[tuple[int, int, int, int, memoryview]]]:
    """(height, width) and ``(y0, x0, y1, x1, jpeg)`` per tile of :func:`pack_tiles`' bytes."""
    if not data.startswith(TILES_MAGIC):
        raise ValueError("not a jpeg tiles member")
    at = len(TILES_MAGIC)
    (n,) = struct.unpack(">I", data[at:at + 4])
    head = json.loads(data[at + 4:at + 4 + n])
    h, w, (th, tw) = head["height"], head["width"], head["tile"]
    pos, view, tiles = at + 4 + n, memoryview(data), []
    grid = ((y, x) for y in range(0, h, th) for x in range(0, w, tw))
    for (y, x), length in zip(grid, head["lengths"]):
        tiles.append((y, x, min(h, y + th), min(w, x + tw), view[pos:pos + length]))
        pos += length
    return (h, w), tiles


def encode_label_png(ids: np.ndarray) -> bytes:
    """A standard 8-bit greyscale PNG with every row unfiltered (filter type 0) and the deflate
    stream fully flushed every ``LABEL_BLOCK`` rows, the byte offsets of those points kept in a
    private ancillary chunk (``unIx``, which PNG readers skip). Any PNG reader opens it;
    :func:`decode_label_rows` inflates only the blocks a crop's rows need, several times faster than
    a general PNG decoder (benchmarks/bench_loader.py)."""
    h, w = ids.shape
    rows = np.zeros((h, w + 1), np.uint8)
    rows[:, 1:] = ids
    deflate = zlib.compressobj(LABEL_LEVEL)
    parts, offsets, size = [], [], 0
    for y in range(0, h, LABEL_BLOCK):
        part = deflate.compress(rows[y:y + LABEL_BLOCK].tobytes())
        part += deflate.flush(zlib.Z_FULL_FLUSH if y + LABEL_BLOCK < h else zlib.Z_FINISH)
        offsets.append(size + (2 if y == 0 else 0))  # block 0 starts after the 2-byte zlib header
        parts.append(part)
        size += len(part)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    index = struct.pack(f">I{len(offsets)}I", LABEL_BLOCK, *offsets)
    return (PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"unIx", index) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def decode_label_rows(data: bytes, start: int = 0, stop: int | None = None) -> np.ndarray | None:
    """Rows ``[start, stop)`` of an unfiltered 8-bit greyscale PNG (:func:`encode_label_png`), or
    None when the PNG is of another kind (filtered rows, other bit depth or colour type): the caller
    then uses a general decoder. Labels of older shards take that path."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if depth != 8 or colour != 0 or interlace != 0:
        return None
    stop = h if stop is None else min(h, stop)
    idat, index, pos = [], None, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        elif kind == b"unIx":
            index = data[pos + 8:pos + 8 + length]
        elif kind == b"IEND":
            break
        pos += 12 + length
    stream = b"".join(idat)
    first = 0
    if index is not None and start > 0:  # begin at the flush point at or above `start`
        block = struct.unpack(">I", index[:4])[0]
        first = start // block * block
        at = struct.unpack(">I", index[4 + 4 * (first // block):8 + 4 * (first // block)])[0]
        inflate, stream = zlib.decompressobj(-15), stream[at:]
    else:
        inflate = zlib.decompressobj()
    need = (w + 1) * (stop - first)
    try:
        raw = inflate.decompress(stream, need)
    except zlib.error:
        return None
    if len(raw) < need:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(stop - first, w + 1)
    if rows[:, 0].any():  # some row is filtered: not ours to shortcut
        return None
    return rows[start - first:, 1:]


def resize_photo(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (PIL antialiases when shrinking, close to area averaging); size = (h, w)."""
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))


def resize_label(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour only: a label must never be blended into another class."""
    h, w = size
    return np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.NEAREST))


def sample_members(key: str, image: bytes | list[tuple[str, bytes]], image_ext: str, label: np.ndarray,
                   source: str, split: str) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in fixed order: image (or its tiles), label, json.
    ``image`` is the photo's bytes (``image_ext`` names them) or :func:`encode_photo`'s members."""
    meta = {"source": source, "height": int(label.shape[0]), "width": int(label.shape[1]), "split": split}
    photo = [(f"image.{image_ext}", image)] if isinstance(image, bytes) else image
    return [
        *((f"{key}.{suffix}", data) for suffix, data in photo),
        (f"{key}.label.png", encode_label_png(label)),
        (f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
    ]


def write_tar_file(path: Path, members: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
    """Write a deterministic tar to the local file ``path`` (fsynced); returns (sha256, bytes)."""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    return storage.location(path).sha256(), Path(path).stat().st_size


def write_tar(url: PathOrUrl, members: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
    """Write a deterministic tar, published in one step (a local rename or one whole object) only
    once complete; returns (sha256, bytes)."""
    target = storage.location(url)
    tmp = target.staging()
    try:
        digest, size = write_tar_file(tmp, members)
        target.publish_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, size


HINT = "run python -m unet_dist.preprocess first"


def load_manifest(shards_dir: PathOrUrl) -> dict:
    """The manifest of a finished preprocess run; a clear error if it is missing or invalid."""
    return read_manifest(shards_dir)[0]


def read_manifest(shards_dir: PathOrUrl) -> tuple[dict, str]:
    """:func:`load_manifest` and the text it was read from (its sha256 identifies the data)."""
    d = storage.location(shards_dir)
    d.check()
    path = d / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not d.is_dir():
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
    return m, text


def _split(manifest: dict, split: str, where: str) -> dict:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UnetDistError(f"{where}: no split {split!r} in the manifest (has: {', '.join(splits) or 'none'})")
    return splits[split]


def shard_paths(shards_dir: PathOrUrl, manifest: dict, split: str) -> list[str]:
    """Paths or URLs of the split's shards, in order, as text (what webdataset opens)."""
    d = storage.location(shards_dir)
    entry = _split(manifest, split, str(d / MANIFEST))
    return [str(d / s["name"]) for s in entry["shards"]]


def check_listed(shards_dir: PathOrUrl, manifest: dict, split: str) -> None:
    """Every shard the manifest lists for ``split`` is there with the listed size: one listing plus
    one size query per shard, cheap enough for a driver's preflight before any worker starts."""
    d = storage.location(shards_dir)
    entry = _split(manifest, split, str(d / MANIFEST))
    listed = set(d.listdir())
    for s in entry["shards"]:
        path = d / s["name"]
        if s["name"] not in listed:
            raise UnetDistError(f"{path}: shard listed in the manifest is missing")
        if "bytes" in s and (size := path.size()) != s["bytes"]:
            raise UnetDistError(f"{path}: {size} bytes, the manifest says {s['bytes']}; "
                                f"the shard is corrupt or stale, rerun preprocess")


def verify_shards(shards_dir: PathOrUrl, manifest: dict, split: str) -> None:
    """:func:`check_listed`, then every shard's sha256 against the manifest (on a store each object
    is read once: a checksum stored beside it would only be the uploader's word)."""
    check_listed(shards_dir, manifest, split)
    d = storage.location(shards_dir)
    for s in _split(manifest, split, str(d / MANIFEST))["shards"]:
        path = d / s["name"]
        got = path.sha256()
        if got != s["sha256"]:
            raise UnetDistError(f"{path}: sha256 {got[:12]}... does not match the manifest's "
                                f"{s['sha256'][:12]}...; the shard is corrupt or stale, rerun preprocess")
