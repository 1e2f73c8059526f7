"""What a batch prediction reads and which of it is already done.

An input is a photo file or object; its *stem* is its path below the input root without the image
suffix (and without ``_leftImg8bit``), and its outputs are ``<out>/<stem><format suffix>``. For an
official Cityscapes tree (``<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png``) the stem is taken
below ``leftImg8bit/``, so ``--format cityscapes`` writes ``<out>/<split>/<city>/<city>_<seq>_<frame>_labelIds.png``,
the layout and names the benchmark's evaluator matches.

Each output file is written whole (atomically), so an input counts as done exactly when every file
of every requested format is there: a rerun after a crash redoes only the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

from unet_dist.errors import UnetDistError
from unet_dist.mask_files import output_name, output_stem
from unet_dist.photo_files import IMAGE_SUFFIXES
from unet_dist.storage import Location

CS_PHOTOS = "leftImg8bit"


@dataclass(frozen=True)
class Item:
    source: str  # the photo: an absolute path or a URL
    stem: str  # its outputs' path below --out, without the format suffix


def _is_image(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not name.startswith(".") and ("." + name.rsplit(".", 1)[-1].lower()) in IMAGE_SUFFIXES


def list_items(root: Location, split: str | None = None) -> list[Item]:
    """Every photo below ``root`` (or ``root`` itself, a file), sorted; an error when there is none."""
    if root.exists():
        return [Item(root.url, output_stem(root.name))]
    files = [f for f in root.walk() if _is_image(f)]
    if any(f.startswith(f"{CS_PHOTOS}/") for f in files):  # an official Cityscapes tree
        below = f"{CS_PHOTOS}/{split}/" if split else f"{CS_PHOTOS}/"
        files = [f for f in files if f.startswith(below) and f.endswith("_leftImg8bit.png")]
        items = [Item((root / f).url, output_stem(f[len(CS_PHOTOS) + 1:])) for f in files]
        where = f"{root.url}/{below}<city>/*_leftImg8bit.png"
    else:
        if split:
            raise UnetDistError(f"--split {split}: {root.url} is not a Cityscapes tree (no {CS_PHOTOS}/ folder)")
        items = [Item((root / f).url, output_stem(f)) for f in files]
        where = f"{root.url} ({', '.join(sorted(IMAGE_SUFFIXES))})"
    if not items:
        raise UnetDistError(f"--input: no photos found in {where}")
    seen: dict[str, str] = {}
    for it in items:
        if it.stem in seen:
            raise UnetDistError(f"--input: {seen[it.stem]} and {it.source} would write the same outputs "
                                f"({it.stem}); keep one of them")
        seen[it.stem] = it.source
    return items


def pending(items: list[Item], out: Location, formats: tuple[str, ...]) -> list[Item]:
    """The items whose outputs are not all in ``out`` yet (one listing of ``out``)."""
    have = set(out.walk())
    return [it for it in items if not all(output_name(it.stem, f) in have for f in formats)]


def check_apart(inp: Location, out: Location) -> None:
    """Refuse an output folder inside the input folder (its masks would be read as photos next time)
    or an input inside the output."""
    a, b = inp.url.rstrip("/") + "/", out.url.rstrip("/") + "/"
    if inp.scheme == out.scheme and inp.bucket == out.bucket and (b.startswith(a) or a.startswith(b)):
        raise UnetDistError(f"--out {out.url}: must not be inside --input {inp.url}, nor contain it")
