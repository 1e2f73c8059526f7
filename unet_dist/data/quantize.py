"""KMeans on mask colours, fitted once, then a 256^3 colour -> trainId lookup table.

Resized, JPEG-compressed colour masks hold far more colours than the 29 of the Cityscapes palette.
KMeans, fitted once on a seeded sample of mask pixels, finds the colours that really occur; each
cluster is named by its nearest palette colour. Mapping a mask is then one table lookup per pixel
(``lut[(r << 16) | (g << 8) | b]``), so KMeans never runs per image.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np

from unet_dist.data.shards import QUANTIZER
from unet_dist.errors import UnetDistError
from unet_dist.labels import IGNORE, LABELS, palette_colors

N_INIT = 4  # KMeans restarts; fixed so a fit repeats exactly
BOX = 16  # colour-table boxes per axis step (16^3 colours each)
DECIMALS = 4  # centroids/distances are stored rounded; the in-memory quantizer uses the same values


def color_codes(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours -> (...) uint32 ``(r << 16) | (g << 8) | b``."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1:] != (3,) or rgb.dtype != np.uint8:
        raise ValueError(f"expected (..., 3) uint8 colours, got {rgb.shape} {rgb.dtype}")
    # One uint32 array shifted and or-ed in place: a third of the temporaries of the plain
    # expression (benchmarks/bench_preprocess.py: about 1.5x faster on a 256x256 mask).
    c = rgb[..., 0].astype(np.uint32)
    c <<= 8
    c |= rgb[..., 1]
    c <<= 8
    c |= rgb[..., 2]
    return c


def lookup(lut: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours -> (...) entries of a (2**24,) colour table.

    ``np.take`` rather than ``lut[codes]``: the same result, about twice as fast for one mask.
    """
    return np.take(lut, color_codes(rgb))


def sample_mask_pixels(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` pixels of an (H, W, 3) colour mask drawn uniformly with replacement: (n, 3) uint8."""
    flat = mask.reshape(-1, 3)
    return flat[rng.integers(0, len(flat), size=n)]


def palette_names() -> list[str]:
    """The label name of each :func:`palette_colors` entry (the label that owns its trainId)."""
    colors, train_ids = palette_colors()
    names = []
    for c, t in zip(colors.tolist(), train_ids.tolist()):
        names.append(next(lab.name for lab in LABELS if list(lab.color) == c and lab.train_id == t))
    return names


@dataclass
class Quantizer:
    """Fitted cluster centres, each named by its nearest palette colour (255 = ignore)."""

    k: int  # clusters asked for; fewer centroids when the sample had fewer distinct colours
    seed: int
    sample_pixels: int  # pixels the fit saw
    max_distance: float  # RGB distance beyond which a centroid or a colour maps to ignore
    centroids: np.ndarray  # (K, 3) float64
    train_ids: np.ndarray  # (K,) uint8
    names: list[str]
    distances: np.ndarray  # (K,) distance of each centroid to its nearest palette colour

    def to_json(self) -> str:
        return json.dumps({
            "k": self.k, "seed": self.seed, "sample_pixels": self.sample_pixels,
            "max_distance": self.max_distance,
            "centroids": [[float(v) for v in c] for c in self.centroids],
            "train_ids": [int(t) for t in self.train_ids], "names": list(self.names),
            "distances": [float(d) for d in self.distances],
        }, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, origin: str = QUANTIZER) -> "Quantizer":
        try:
            d = json.loads(text)
            q = cls(int(d["k"]), int(d["seed"]), int(d["sample_pixels"]), float(d["max_distance"]),
                    np.asarray(d["centroids"], dtype=np.float64).reshape(-1, 3),
                    np.asarray(d["train_ids"], dtype=np.uint8), [str(n) for n in d["names"]],
                    np.asarray(d["distances"], dtype=np.float64))
        except (ValueError, KeyError, TypeError) as e:
            raise UnetDistError(f"{origin}: not a valid quantizer file ({type(e).__name__}: {e})") from None
        if not (len(q.centroids) == len(q.train_ids) == len(q.names) == len(q.distances) >= 1):
            raise UnetDistError(f"{origin}: centroids, train_ids, names and distances differ in length")
        return q

    def build_lut(self, far_value: int = IGNORE) -> np.ndarray:
        """The (2**24,) uint8 colour -> trainId table: nearest centroid, exact, built in chunks.

        Colours farther than ``max_distance`` from every centroid get ``far_value`` (ignore by
        default; the preprocess job passes a marker to count them).
        """
        return build_lut(self.centroids, self.train_ids, self.max_distance, far_value)


def build_lut(centroids: np.ndarray, train_ids: np.ndarray, max_distance: float,
              far_value: int = IGNORE) -> np.ndarray:
    """Nearest-centroid class for all 2**24 colours, exact, in 16^3-colour boxes.

    For each box only the centroids that can be nearest to some colour in it are compared (those
    whose nearest point of the box is no farther than the best centroid's farthest point), and a
    box with a single candidate that is near enough everywhere is filled at once. Candidates keep
    index order, so ties resolve as a brute-force ``argmin`` over all centroids does.
    """
    c = np.asarray(centroids, dtype=np.float64).reshape(-1, 3)
    ids = np.asarray(train_ids, dtype=np.uint8)
    far2 = float(max_distance) ** 2
    v = np.arange(256, dtype=np.float64)
    sq = (v[:, None, None] - c[None]) ** 2  # (256, K, 3): per-axis squared differences
    lut = np.empty((256, 256, 256), dtype=np.uint8)
    for r, g, b in itertools.product(range(0, 256, BOX), repeat=3):
        lo = np.array([r, g, b], dtype=np.float64)
        hi = lo + (BOX - 1)
        dmin = ((c - np.clip(c, lo, hi)) ** 2).sum(1)
        dmax = (np.maximum(np.abs(c - lo), np.abs(c - hi)) ** 2).sum(1)
        cand = np.flatnonzero(dmin <= dmax.min())
        box = (slice(r, r + BOX), slice(g, g + BOX), slice(b, b + BOX))
        if len(cand) == 1 and dmax[cand[0]] <= far2:
            lut[box] = ids[cand[0]]
            continue
        d = (sq[r:r + BOX, cand, 0][:, None, None, :] + sq[g:g + BOX, cand, 1][None, :, None, :]
             + sq[b:b + BOX, cand, 2][None, None, :, :])
        idx = d.argmin(-1)
        out = ids[cand][idx]
        out[np.take_along_axis(d, idx[..., None], -1)[..., 0] > far2] = far_value
        lut[box] = out
    return lut.reshape(-1)


def fit_quantizer(pixels: np.ndarray, k: int, seed: int, max_distance: float) -> Quantizer:
    """Fit KMeans once on (N, 3) uint8 mask pixels and name each cluster.

    The fit runs on the distinct colours weighted by their counts: the same objective as fitting
    every pixel, much faster, and ``k`` drops to the number of distinct colours when that is less.
    """
    from sklearn.cluster import KMeans  # heavy import, only where a fit happens

    pixels = np.asarray(pixels, dtype=np.uint8).reshape(-1, 3)
    if len(pixels) == 0:
        raise UnetDistError("KMeans: no mask pixels to fit on (every train mask was unreadable?)")
    if k < 1 or k > 254:
        raise UnetDistError(f"quantize.k: expected 1..254 clusters, got {k}")
    codes, counts = np.unique(color_codes(pixels), return_counts=True)
    colors = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], 1).astype(np.float64)
    km = KMeans(n_clusters=min(k, len(codes)), n_init=N_INIT, random_state=seed, algorithm="lloyd")
    km.fit(colors, sample_weight=counts.astype(np.float64))
    cent = np.round(km.cluster_centers_, DECIMALS)
    cent = cent[np.lexsort((cent[:, 2], cent[:, 1], cent[:, 0]))]  # stable, readable order
    pal, pal_ids = palette_colors()
    names_all = palette_names()
    d = np.sqrt(((cent[:, None, :] - pal[None].astype(np.float64)) ** 2).sum(-1))  # (K, 29)
    near = d.argmin(1)
    dist = np.round(d[np.arange(len(cent)), near], DECIMALS)
    ids = np.where(dist <= max_distance, pal_ids[near], IGNORE).astype(np.uint8)
    return Quantizer(k, seed, len(pixels), float(max_distance), cent, ids,
                     [names_all[j] for j in near], dist)
