"""Readers for the raw dataset layouts (``pairs`` and ``cityscapes``, see the data contract).

Listing is cheap and strict about the tree (a missing or empty directory is always an error);
decoding is per sample and raises :class:`BadInput` for a file that cannot be used, so the caller
decides between stopping (``on_bad_input: fail``) and recording it (``skip``).
"""
from __future__ import annotations

import io
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from unet_dist.config import Layout
from unet_dist.errors import UnetDistError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
LAYOUTS = typing.get_args(Layout)
PAIRS_SUFFIXES = (".jpg", ".jpeg", ".png")
CS_PHOTO_DIR = "leftImg8bit"  # <root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
CS_LABEL_DIR = "gtFine"  # <root>/gtFine/<split>/<city>/<stem>_gtFine_{color,labelIds}.png
CS_PHOTO = "_leftImg8bit.png"
CS_COLOR = "_gtFine_color.png"
CS_IDS = "_gtFine_labelIds.png"


class BadInput(UnetDistError):
    """One unusable input file; ``path`` names it and ``reason`` says what was expected."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # picklable across worker processes
        return (BadInput, (self.path, self.reason))


@dataclass(frozen=True)
class RawSample:
    """One raw sample; paths are POSIX paths relative to the dataset root."""

    split: str
    index: int  # position in the split's sorted list: the shard key's number
    photo: str  # pairs: the side-by-side file; cityscapes: the leftImg8bit PNG
    color: Optional[str] = None  # cityscapes: gtFine colour mask
    label_ids: Optional[str] = None  # cityscapes: gtFine labelIds


@dataclass
class Decoded:
    """A decoded sample: ``mask`` is colour (H, W, 3) or labelIds (H, W), both uint8."""

    photo: np.ndarray
    mask: np.ndarray
    truth: Optional[np.ndarray] = None  # labelIds next to a colour mask, when present
    photo_bytes: Optional[bytes] = None  # the source file, when it can be stored unchanged
    photo_ext: str = "jpg"
    notes: list[str] = field(default_factory=list)


def check_label_source(layout: str, label_source: str) -> None:
    if layout not in LAYOUTS:
        raise UnetDistError(f"data.layout: expected one of {'|'.join(LAYOUTS)}, got {layout!r}")
    if label_source == "labelIds" and layout != "cityscapes":
        raise UnetDistError(
            f"data.label_source: 'labelIds' needs data.layout=cityscapes (got {layout!r}); "
            "use label_source=color for colour masks"
        )


def _pairs_key(p: Path) -> tuple:
    """Numeric order for ``<n>.jpg`` (1, 2, ..., 10), then any other names alphabetically."""
    return (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name)


def list_split(root: str | Path, layout: str, split: str) -> list[RawSample]:
    """The split's samples in sorted source order; an error if its directory is missing or empty."""
    root = Path(root)
    if layout == "pairs":
        d = root / split
        if not d.is_dir():
            raise UnetDistError(f"{d}: split directory not found (pairs layout: <root>/{split}/*.jpg)")
        files = [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
        photos = sorted((p for p in files if p.suffix.lower() in PAIRS_SUFFIXES), key=_pairs_key)
        if len(photos) < len(files):
            log.warning("%s: ignored %d files that are not .jpg/.jpeg/.png", d, len(files) - len(photos))
        out = [RawSample(split, i, p.relative_to(root).as_posix()) for i, p in enumerate(photos)]
        if not out:
            raise UnetDistError(f"{d}: no .jpg files in split {split!r} (expected <root>/{split}/<n>.jpg)")
        return out
    d = root / CS_PHOTO_DIR / split
    if not d.is_dir():
        raise UnetDistError(f"{d}: split directory not found (cityscapes layout: leftImg8bit/{split}/<city>/)")
    photos = sorted(p.relative_to(root).as_posix() for p in d.glob(f"*/*{CS_PHOTO}") if p.is_file())
    if not photos:
        raise UnetDistError(f"{d}: no <city>/*{CS_PHOTO} files in split {split!r}")
    out = []
    for i, rel in enumerate(photos):
        stem = rel[len(CS_PHOTO_DIR) + 1:-len(CS_PHOTO)]  # <split>/<city>/<city>_<seq>_<frame>
        out.append(RawSample(split, i, rel, f"{CS_LABEL_DIR}/{stem}{CS_COLOR}", f"{CS_LABEL_DIR}/{stem}{CS_IDS}"))
    return out


def list_samples(root: str | Path, layout: str, label_source: str = "color",
                 max_samples: int = 0) -> dict[str, list[RawSample]]:
    """Both splits, each sorted and cut to ``max_samples`` (0 = all)."""
    check_label_source(layout, label_source)
    root = Path(root)
    if not root.is_dir():
        raise UnetDistError(f"{root}: data.root not found (expected a {layout} dataset directory)")
    if not any(root.iterdir()):
        raise UnetDistError(f"{root}: data.root is empty (expected a {layout} dataset directory)")
    out = {s: list_split(root, layout, s) for s in SPLITS}
    if max_samples > 0:
        out = {s: v[:max_samples] for s, v in out.items()}
    return out


def _read(root: Path, rel: str, what: str) -> tuple[bytes, Image.Image]:
    """File bytes and the fully decoded image; any decoder failure is bad input."""
    path = root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(str(path), f"{what} not found") from None
    except OSError as e:
        raise BadInput(str(path), f"cannot read {what} ({e.strerror})") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises assorted types for truncated/corrupt/non-image data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            msg = "not an image file"
        raise BadInput(str(path), f"cannot decode {what}: {msg}; expected a readable image") from None
    return data, img


def _rgb(img: Image.Image, path: str, what: str, notes: list[str]) -> np.ndarray:
    if img.mode != "RGB":
        notes.append(f"{path}: converted {img.mode} {what} to RGB")
        img = img.convert("RGB")
    return np.asarray(img)


def _label_ids(img: Image.Image, path: str) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 2 or img.mode not in ("L", "P", "I", "I;16") or (arr.size and arr.max() > 255):
        raise BadInput(path, f"expected a single-channel 8-bit labelIds PNG, got mode {img.mode}")
    return arr.astype(np.uint8, copy=False)


def _same_size(a: np.ndarray, b: np.ndarray, path: str, what: str) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise BadInput(path, f"{what} is {b.shape[1]}x{b.shape[0]} but its photo is "
                             f"{a.shape[1]}x{a.shape[0]}; expected the same size")


def load_sample(root: str | Path, sample: RawSample, label_source: str = "color",
                want_truth: bool = False) -> Decoded:
    """Decode one sample; raises :class:`BadInput` naming the file and what was expected."""
    root = Path(root)
    notes: list[str] = []
    if sample.color is None:  # pairs: photo left, colour mask right
        path = str(root / sample.photo)
        _, img = _read(root, sample.photo, "side-by-side image")
        arr = _rgb(img, path, "image", notes)
        h, w = arr.shape[:2]
        if w != 2 * h:
            raise BadInput(path, f"image is {w}x{h}; expected a side-by-side photo|mask twice as wide as high")
        return Decoded(arr[:, :h], np.ascontiguousarray(arr[:, h:]), notes=notes)
    data, img = _read(root, sample.photo, "photo")
    keep = img.mode == "RGB" and img.format in ("PNG", "JPEG")
    ext = "png" if img.format == "PNG" else "jpg"
    photo = _rgb(img, str(root / sample.photo), "photo", notes)
    truth = None
    if label_source == "labelIds":
        _, mimg = _read(root, sample.label_ids, "labelIds mask")
        mask = _label_ids(mimg, str(root / sample.label_ids))
        _same_size(photo, mask, str(root / sample.label_ids), "labelIds mask")
    else:
        _, mimg = _read(root, sample.color, "colour mask")
        mask = np.asarray(mimg.convert("RGB"))  # RGBA / palette masks: drop alpha
        _same_size(photo, mask, str(root / sample.color), "colour mask")
        if want_truth and (root / sample.label_ids).is_file():
            try:  # truth is only for measuring KMeans agreement: a bad file just means "unknown"
                _, timg = _read(root, sample.label_ids, "labelIds mask")
                truth = _label_ids(timg, str(root / sample.label_ids))
                _same_size(photo, truth, str(root / sample.label_ids), "labelIds mask")
            except BadInput as e:
                log.warning("no KMeans truth for %s", e)
                truth = None
    return Decoded(photo, mask, truth, data if keep else None, ext, notes)
