"""Synthetic Cityscapes-like street scenes: a photo and its labelIds, rendered from a seed.

Why: the real sets need a login and gigabytes, yet the whole pipeline (KMeans on noisy mask colours,
shards, distributed training, metrics) must run offline in seconds. Scenes come from a small pinhole
street model (horizon, vanishing point, ground plane, facades along the street, objects as upright
planes), so classes have believable shapes, sizes and context. Photo colours are per-image textures
under a random light, shading and pixel noise, never the palette colours: the network has to *learn*
the photo -> class mapping, while each class keeps its own hue/texture family so a small U-Net can.

World units: lateral ``X`` and height ``Z`` are pixels at the depth of the bottom image row; depth
``D`` is a multiple of that depth (D=1 is the bottom row). A world point projects to
``x = vx + X / D`` and ``y = yh + (cam - Z) / D`` where ``cam`` is the camera height; a length L
along the street spans ``L / f`` in D. Everything is vectorised numpy over bounding boxes; no
transcendental functions, so the bytes are stable across machines.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from unet_dist.data.sources import SPLITS
from unet_dist.errors import UnetDistError
from unet_dist.labels import BY_NAME, LABELS

SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}  # train 0, val 1: part of each sample's seed

_ID = {name: lab.id for name, lab in BY_NAME.items()}  # label name -> Cityscapes labelId


def _id_colors() -> np.ndarray:
    """A (256, 3) table: Cityscapes labelId -> palette colour (unknown ids black)."""
    lut = np.zeros((256, 3), np.uint8)
    for lab in LABELS:
        lut[lab.id] = lab.color
    return lut


ID_COLORS = _id_colors()


# ----------------------------------------------------------------------------------------------
# small helpers


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _rgb(rng: np.random.Generator, base, amount: float = 0.1) -> np.ndarray:
    """A per-image variant of a base colour: each channel scaled by 1 +- amount."""
    scale = rng.uniform(1 - amount, 1 + amount, 3)
    return np.clip(np.asarray(base, np.float64) * scale, 0, 255).astype(np.float32)


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise (std ~0.7) with features about ``cell`` pixels wide: a bilinear upscale."""
    gh, gw = max(2, int(round(h / cell)) + 2), max(2, int(round(w / cell)) + 2)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _frac(a):
    return a - np.floor(a)


# ----------------------------------------------------------------------------------------------
# class colour families (photo colours before lighting). Palette colours are never used here.

SKY_CLEAR = ((95, 145, 210), (185, 205, 232))
SKY_OVERCAST = ((168, 174, 186), (214, 214, 218))
ROAD = (88, 88, 93)
SIDEWALK = ((186, 142, 140), (172, 130, 128), (192, 156, 150))  # reddish pavers
BUILDING = ((222, 210, 186), (208, 188, 152), (200, 192, 176), (214, 196, 170))  # light plaster
WALL = ((112, 122, 152), (126, 132, 164), (100, 112, 140))  # blue-grey stone
FENCE = ((140, 92, 52), (118, 78, 44), (150, 100, 56))  # brown wood
VEGETATION = ((56, 98, 40), (70, 112, 36), (44, 86, 46))
TERRAIN = ((140, 160, 80), (124, 150, 72), (150, 165, 90))  # light yellow-green grass
POLE = ((70, 112, 112), (84, 124, 128), (60, 98, 104))  # teal-painted metal
CLOTHES = ((120, 40, 92), (92, 52, 124), (150, 40, 64), (70, 44, 96), (130, 60, 110))
TROUSERS = ((50, 40, 70), (40, 40, 60), (60, 36, 56))
SKIN = ((226, 186, 160), (192, 142, 112), (132, 92, 72))
HIVIS = ((242, 124, 32), (235, 105, 40), (245, 140, 50))  # orange high-visibility jackets
CAR = ((180, 30, 30), (30, 60, 140), (190, 190, 196), (232, 232, 232), (28, 28, 32), (112, 112, 118))
TRUCK = ((222, 222, 216), (200, 200, 188))
BUS = ((200, 46, 40), (40, 90, 172))
BIKE = ((40, 170, 190), (150, 200, 40), (40, 190, 140))  # bright frames, unlike car paints
GLASS = (44, 54, 66)
TYRE = (24, 24, 26)


# ----------------------------------------------------------------------------------------------
# the scene


class _Scene:
    """One street scene: geometry, canvases (photo float RGB, labelIds) and the painters."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.rng, self.h, self.w = rng, h, w
        self.photo = np.zeros((h, w, 3), np.float32)
        self.label = np.zeros((h, w), np.uint8)
        s = h / 256
        self.fine = _noise(rng, h, w, 2.0 * s)
        self.mid = _noise(rng, h, w, 7.0 * s)
        self.coarse = _noise(rng, h, w, 28.0 * s)
        self.ys = np.arange(h, dtype=np.float32) + 0.5
        self.xs = np.arange(w, dtype=np.float32) + 0.5
        self.yh = h * _u(rng, 0.34, 0.46)  # horizon row
        self.cam = h - self.yh  # camera height: Z = cam projects onto the horizon
        self.vx = w / 2 + _u(rng, -0.1, 0.1) * h  # vanishing point column
        self.f = h * _u(rng, 1.0, 1.3)  # focal length: street length L spans L / f in depth D
        self.minw = 0.04 * h  # thinnest screen width of the thin classes (pole, sign, light)

    # -- projection and painting -----------------------------------------------------------------

    def _win(self, x0, y0, x1, y1):
        ix0, ix1 = max(0, int(np.floor(min(x0, x1)))), min(self.w, int(np.ceil(max(x0, x1))))
        iy0, iy1 = max(0, int(np.floor(min(y0, y1)))), min(self.h, int(np.ceil(max(y0, y1))))
        if ix1 <= ix0 or iy1 <= iy0:
            return None
        return slice(iy0, iy1), slice(ix0, ix1)

    def facing(self, D, Xa, Xb, Z0, Z1):
        """An upright plane facing the camera at depth D: (window, X (1,w), Z (h,1)) or None."""
        cam, yh, vx = self.cam, self.yh, self.vx
        win = self._win(vx + Xa / D, yh + (cam - Z1) / D, vx + Xb / D, yh + (cam - Z0) / D)
        if win is None:
            return None
        X = ((self.xs[win[1]] - vx) * D)[None, :]
        Z = (cam - (self.ys[win[0]] - yh) * D)[:, None]
        return win, X, Z

    def along(self, Xp, D0, D1, Z0, Z1):
        """An upright plane along the street at lateral Xp, depth D0..D1, height Z0..Z1:
        (window, D (1,w), Z (h,w), inside) or None."""
        cam, yh, vx = self.cam, self.yh, self.vx
        ytop = min(yh + (cam - Z1) / D0, yh + (cam - Z1) / D1)
        ybot = max(yh + (cam - Z0) / D0, yh + (cam - Z0) / D1)
        win = self._win(vx + Xp / D0, ytop, vx + Xp / D1, ybot)
        if win is None:
            return None
        dx = self.xs[win[1]] - vx
        dx = np.where(np.abs(dx) < 1e-3, np.float32(1e-3), dx)
        D = (Xp / dx)[None, :].astype(np.float32)
        Z = cam - (self.ys[win[0]] - yh)[:, None] * D
        inside = (D >= D0) & (D <= D1) & (Z >= Z0) & (Z <= Z1)
        return win, D, Z, inside

    def put(self, win, mask, name: str, rgb) -> None:
        lab = self.label[win]
        mask = np.broadcast_to(mask, lab.shape)
        lab[mask] = _ID[name]
        ph = self.photo[win]
        rgb = np.asarray(rgb, np.float32)
        ph[mask] = rgb if rgb.ndim == 1 else np.broadcast_to(rgb, ph.shape)[mask]

    def tex(self, win, base, mid=0.06, fine=0.04, coarse=0.0):
        m = 1 + mid * self.mid[win] + fine * self.fine[win]
        if coarse:
            m = m + coarse * self.coarse[win]
        return np.asarray(base, np.float32) * m[..., None]

    def darken(self, win, mask, k: float) -> None:
        ph = self.photo[win]
        mask = np.broadcast_to(mask, ph.shape[:2])
        ph[mask] *= k

    # -- the street --------------------------------------------------------------------------

    def build(self) -> None:
        rng, cam = self.rng, self.cam
        self.overcast = rng.random() < 0.35
        self.XL, self.XR = -cam * _u(rng, 1.1, 2.4), cam * _u(rng, 1.1, 2.4)  # road edges
        # from the road outwards: a grass verge (sometimes), the sidewalk, grass (sometimes), facades
        verge = [cam * _u(rng, 0.5, 1.5) if rng.random() < 0.3 else 0.0 for _ in range(2)]
        walk = [cam * _u(rng, 1.0, 2.2) for _ in range(2)]
        lawn = [cam * _u(rng, 0.8, 2.5) if rng.random() < 0.6 else 0.0 for _ in range(2)]
        self.inL, self.inR = self.XL - verge[0], self.XR + verge[1]  # sidewalk inner edges
        self.outL, self.outR = self.inL - walk[0], self.inR + walk[1]  # sidewalk outer edges
        self.XfL, self.XfR = self.outL - lawn[0], self.outR + lawn[1]  # facade lines
        self.Dend = _u(rng, 14, 36)  # the street ends (a cross facade) or fades to the horizon
        self.shadow_side = _pick(rng, (-1, 1))  # the facade side in shade
        k = _u(rng, 0.86, 0.95) if self.overcast else _u(rng, 0.55, 0.78)
        self.facade_light = {self.shadow_side: k, -self.shadow_side: _u(rng, 0.98, 1.1)}
        self.ground_shadow = None if self.overcast or rng.random() < 0.3 else _u(rng, -0.6, 1.4) * cam
        self.ground_k = _u(rng, 0.55, 0.75)
        self._sky()
        self._ground()
        self._backdrop()
        for side in (-1, 1):
            self._facade(side)
        self._boundaries()
        self._objects()
        if rng.random() < 0.25:
            self._ego()

    def _sky(self) -> None:
        rng = self.rng
        top, hor = SKY_OVERCAST if self.overcast else SKY_CLEAR
        top, hor = _rgb(rng, top, 0.08), _rgb(rng, hor, 0.05)
        t = np.clip(self.ys / max(self.yh, 1.0), 0, 1)[:, None, None]
        col = top + (hor - top) * t  # (h, 1, 3)
        cloud = np.clip(0.8 * self.coarse + 0.35 * self.mid - _u(rng, 0.1, 0.7), 0, 1)[..., None]
        white = np.float32(230 if not self.overcast else 200)
        self.photo[:] = col + (white - col) * cloud * np.float32(_u(rng, 0.5, 0.9))
        self.photo *= (1 + 0.01 * self.fine)[..., None]
        self.label[:] = _ID["sky"]

    def _ground(self) -> None:
        rng, cam, f = self.rng, self.cam, self.f
        r0 = int(np.ceil(self.yh))
        if r0 >= self.h:
            return
        win = (slice(r0, self.h), slice(0, self.w))
        Drow = (cam / (self.ys[r0:] - self.yh))[:, None]  # (hg, 1)
        X = (self.xs[None, :] - self.vx) * Drow  # (hg, w)
        road = (X >= self.XL) & (X <= self.XR)
        walk = ((X >= self.outL) & (X <= self.inL)) | ((X >= self.inR) & (X <= self.outR))
        # asphalt: dark grey, blotchy, with markings painted in the photo only (still road)
        rgb_road = self.tex(win, _rgb(rng, ROAD, 0.05) * _u(rng, 0.8, 1.2), 0.06, 0.07, 0.06)
        marks = np.zeros(X.shape, bool)
        mw = 0.06 * cam
        seen = (2 * mw / Drow) >= 0.8  # markings narrower than a pixel would only alias
        lane = cam * _u(rng, 1.7, 2.2)
        period, duty = cam * _u(rng, 4, 8), _u(rng, 0.35, 0.6)
        dash = _frac(Drow * f / period) < duty
        for m in np.arange(-3, 4) * lane + lane / 2:
            if self.XL + 0.6 * cam < m < self.XR - 0.6 * cam:
                marks |= (np.abs(X - m) < mw) & dash & seen
        if rng.random() < 0.6:
            for edge in (self.XL + 0.25 * cam, self.XR - 0.25 * cam):
                marks |= (np.abs(X - edge) < mw) & seen
        if rng.random() < 0.25:  # zebra crossing
            d0 = _u(rng, 2.0, 8.0)
            rows = (Drow >= d0) & (Drow <= d0 + 2.5 * cam / f)
            marks |= road & rows & (_frac(X / (0.9 * cam)) < 0.5) & ((0.45 * cam / Drow) >= 1.5)
        paint = np.float32(_u(rng, 190, 225))
        rgb_road = np.where(marks[..., None], paint * (1 + 0.06 * self.fine[win])[..., None], rgb_road)
        # sidewalk: pavers with grooves (where a tile is big enough to see), a light curb stone
        base = _rgb(rng, _pick(rng, SIDEWALK), 0.07)
        tile = cam * _u(rng, 0.35, 0.7)
        groove = ((_frac(X / tile) < 0.07) | (_frac(Drow * f / tile) < 0.07)) & ((tile / Drow) >= 5)
        rgb_walk = self.tex(win, base, 0.05, 0.05, 0.04) * np.where(groove, 0.8, 1.0)[..., None]
        curb = walk & ((np.abs(X - self.inL) < 0.12 * cam) | (np.abs(X - self.inR) < 0.12 * cam))
        curb_rgb = _rgb(rng, (182, 182, 176), 0.05)
        rgb_walk = np.where(curb[..., None], curb_rgb * (1 + 0.04 * self.fine[win])[..., None], rgb_walk)
        # beyond the sidewalks: grass or dry earth, mottled
        rgb_ter = self.tex(win, _rgb(rng, _pick(rng, TERRAIN), 0.08), 0.12, 0.1, 0.1)
        rgb = np.where(road[..., None], rgb_road, np.where(walk[..., None], rgb_walk, rgb_ter))
        lab = np.where(road, _ID["road"], np.where(walk, _ID["sidewalk"], _ID["terrain"]))
        if self.ground_shadow is not None:  # the shade cast by the facades on one side
            shade = (X < self.XL + self.ground_shadow) if self.shadow_side < 0 else (X > self.XR - self.ground_shadow)
            rgb = rgb * np.where(shade, np.float32(self.ground_k), np.float32(1))[..., None]
        self.photo[win] = rgb
        self.label[win] = lab.astype(np.uint8)

    def _building_rgb(self, rng):
        return _rgb(rng, _pick(rng, BUILDING), 0.1)

    def _backdrop(self) -> None:
        """Whatever closes the street far away: a cross facade, a tree line, or open sky."""
        rng, cam, D = self.rng, self.cam, self.Dend
        r = rng.random()
        if r > 0.8:
            return
        top = cam * _u(rng, 2.5, 8.0) if r < 0.5 else cam * _u(rng, 1.5, 3.5)
        got = self.facing(D, self.XfL - 20 * cam, self.XfR + 20 * cam, 0, top * 1.3)
        if got is None:
            return
        win, X, Z = got
        k = np.float32(_u(rng, 0.85, 1.0))
        if r < 0.5:
            base = self._building_rgb(rng)
            mask = (Z >= 0) & (Z <= top)
            rgb = self.tex(win, base * k, 0.04, 0.04)
            p, fh = cam * _u(rng, 1.2, 2.2), cam * _u(rng, 1.7, 2.3)
            fz = _frac(Z / fh)
            wins = (_frac(X / p) < 0.45) & (fz > 0.35) & (fz < 0.8) & (Z > cam) & (Z < top - 0.5 * cam)
            if p * 0.45 / D >= 2:
                rgb = np.where(wins[..., None], np.asarray(GLASS, np.float32) * k, rgb)
            self.put(win, mask, "building", rgb)
        else:
            mask = (Z >= 0) & (Z <= top * (1 + 0.35 * self.mid[win] + 0.15 * self.coarse[win]))
            self.put(win, mask, "vegetation", self._veg_rgb(win, rng) * k)

    def _veg_rgb(self, win, rng):
        base = _rgb(rng, _pick(rng, VEGETATION), 0.1)
        return self.tex(win, base, 0.28, 0.22, 0.12)

    def _facade(self, side: int) -> None:
        """The facades along one side of the street: buildings with windows, parks, walls, fences."""
        rng, cam, f = self.rng, self.cam, self.f
        Xf = self.XfL if side < 0 else self.XfR
        cols = slice(0, max(0, min(self.w, int(np.ceil(self.vx))))) if side < 0 else \
            slice(max(0, int(np.floor(self.vx))), self.w)
        if cols.stop <= cols.start:
            return
        dx = self.xs[cols] - self.vx
        dx = np.where(np.abs(dx) < 1e-3, np.float32(1e-3), dx)
        D = Xf / dx  # depth per column, (wc,)
        vis = (D > 0) & (D <= self.Dend)
        # segments along the street: (d0, d1, low kind, low top, high kind, high top, colours, windows)
        kinds = ("building", "vegetation", "wall", "fence")
        bounds, segs = [0.05], []
        while bounds[-1] < self.Dend:
            kind = kinds[int(rng.choice(4, p=(0.5, 0.12, 0.19, 0.19)))]
            length = cam * (_u(rng, 5, 14) if kind == "building" else _u(rng, 3, 9))
            bounds.append(bounds[-1] + length / f)
            seg = {"low": kind, "high": None, "win": None}
            if kind == "building":
                seg["ztop"] = cam * _u(rng, 2.5, 8.0)
                seg["rgb"] = self._building_rgb(rng)
                seg["win"] = (cam * _u(rng, 1.3, 2.4), cam * _u(rng, 1.7, 2.3), _u(rng, 0, 1))
            elif kind == "vegetation":
                seg["ztop"] = cam * _u(rng, 1.2, 3.5)
                seg["rgb"] = _rgb(rng, _pick(rng, VEGETATION), 0.1)
            else:
                seg["ztop"] = cam * _u(rng, 0.6, 1.4)
                seg["rgb"] = _rgb(rng, _pick(rng, WALL if kind == "wall" else FENCE), 0.08)
                r = rng.random()
                if r < 0.5:
                    seg["high"], seg["htop"] = "vegetation", cam * _u(rng, 1.5, 3.5)
                    seg["hrgb"] = _rgb(rng, _pick(rng, VEGETATION), 0.1)
                elif r < 0.75:
                    seg["high"], seg["htop"] = "building", cam * _u(rng, 2.5, 7.0)
                    seg["hrgb"] = self._building_rgb(rng)
            segs.append(seg)
        idx = np.clip(np.searchsorted(np.asarray(bounds), D) - 1, 0, len(segs) - 1)
        code = {None: 0, "building": 1, "vegetation": 2, "wall": 3, "fence": 4}
        t_low = np.array([code[s["low"]] for s in segs])[idx]
        t_high = np.array([code[s["high"]] for s in segs])[idx]
        z_low = np.array([s["ztop"] for s in segs], np.float32)[idx]
        z_high = np.array([s.get("htop", 0.0) for s in segs], np.float32)[idx]
        c_low = np.stack([s["rgb"] for s in segs])[idx]
        c_high = np.stack([s.get("hrgb", s["rgb"]) for s in segs])[idx]
        Z = self.cam - (self.ys[:, None] - self.yh) * D[None, :]  # (h, wc)
        win = (slice(0, self.h), cols)
        bump = cam * (0.35 * self.mid[win] + 0.2 * self.coarse[win])
        z_low_eff = np.where(t_low == 2, z_low + bump, z_low)
        z_high_eff = np.where(t_high == 2, z_high + bump, z_high)
        low = vis & (Z >= 0) & (Z <= z_low_eff)
        high = vis & ~low & (t_high > 0) & (Z >= 0) & (Z <= z_high_eff)
        kind = np.where(low, t_low, np.where(high, t_high, 0))
        if not kind.any():
            return
        rgb = np.where(low[..., None], c_low, c_high)
        amid = np.array([0, 0.05, 0.28, 0.06, 0.06], np.float32)[kind]
        afine = np.array([0, 0.04, 0.22, 0.06, 0.05], np.float32)[kind]
        acoarse = np.array([0, 0.03, 0.12, 0.05, 0.03], np.float32)[kind]
        rgb = rgb * (1 + amid * self.mid[win] + afine * self.fine[win] + acoarse * self.coarse[win])[..., None]
        l_world = D * f  # position along the street, (wc,)
        # buildings: windows on a floor grid where a window is at least ~2 px wide, cornice at the top
        wp = np.array([s["win"][0] if s["win"] else 1.0 for s in segs], np.float32)[idx]
        fh = np.array([s["win"][1] if s["win"] else 1.0 for s in segs], np.float32)[idx]
        ph = np.array([s["win"][2] if s["win"] else 0.0 for s in segs], np.float32)[idx]
        big = (np.abs(Xf) * 0.45 * wp / (f * np.maximum(D, 1e-3) ** 2)) >= 2.0
        fz = _frac(Z / fh)
        glass = (kind == 1) & big & (_frac(l_world / wp + ph) < 0.45) & (fz > 0.35) & (fz < 0.8) & \
            (Z > 1.2 * cam) & (Z < z_low_eff - 0.4 * cam)
        glass_rgb = _rgb(rng, GLASS, 0.15) * (1 + 0.25 * self.coarse[win] + 0.1 * self.mid[win])[..., None]
        rgb = np.where(glass[..., None], glass_rgb, rgb)
        top_b = np.where(low, z_low_eff, z_high_eff)
        cornice = (kind == 1) & (Z > top_b - 0.15 * cam)
        # fences: vertical slats and rails; walls: blocks; vegetation: darker low down
        dark, groove = self._barrier_pattern(l_world, Z, z_low, D, Xf)
        fac = np.where(cornice | ((kind == 3) & groove), np.float32(0.78), np.float32(1.0))
        fac = np.where((kind == 4) & dark, np.float32(0.55), fac)
        fac = np.where(kind == 2, 0.7 + 0.35 * np.clip(Z / (top_b + 1e-3), 0, 1), fac)
        rgb = rgb * (fac * self.facade_light[side])[..., None]
        paint = kind > 0
        names = {1: "building", 2: "vegetation", 3: "wall", 4: "fence"}
        lab = self.label[win]
        for c, name in names.items():
            lab[kind == c] = _ID[name]
        self.photo[win][paint] = rgb[paint]

    def _barrier_pattern(self, l_world, Z, ztop, D, Xp):
        """Fence slats and rails (``dark``) and wall block joints (``groove``) on a plane along the
        street; joints are drawn only where they are a few pixels apart (no aliasing)."""
        cam, f = self.cam, self.f
        px_per = np.abs(Xp) / (f * D ** 2)  # screen pixels per world unit along the street
        slat = 0.25 * cam
        dark = ((_frac(l_world / slat) < 0.3) & (px_per * slat >= 3)) | (np.abs(Z - 0.8 * ztop) < 0.05 * cam)
        course = _frac(Z / (0.6 * cam)) < 0.5
        groove = (_frac(Z / (0.3 * cam)) < 0.1) | \
            ((_frac(l_world / (0.9 * cam) + 0.5 * course) < 0.04) & (px_per * 0.9 * cam >= 6))
        return dark, groove

    def _boundaries(self) -> None:
        """Low walls or fences between a sidewalk and what lies behind it, over a stretch of street."""
        rng, cam, f = self.rng, self.cam, self.f
        for side in (-1, 1):
            if rng.random() >= 0.75:
                continue
            kind = _pick(rng, ("wall", "fence"))
            Xp = self.outL if side < 0 else self.outR
            D0 = _u(rng, 0.5, 3.0)
            D1 = D0 + cam * _u(rng, 6, 30) / f
            ztop = cam * _u(rng, 0.6, 1.3)
            got = self.along(Xp, D0, min(D1, self.Dend), 0, ztop)
            if got is None:
                continue
            win, D, Z, inside = got
            base = _rgb(rng, _pick(rng, WALL if kind == "wall" else FENCE), 0.08)
            rgb = self.tex(win, base, 0.06, 0.06, 0.04)
            dark, groove = self._barrier_pattern(D * f, Z, ztop, D, Xp)
            k = np.where(dark if kind == "fence" else groove, np.float32(0.55 if kind == "fence" else 0.78), 1)
            self.put(win, inside, kind, rgb * (k * self.facade_light[side])[..., None])

    # -- objects -----------------------------------------------------------------------------

    def _objects(self) -> None:
        """Place cars, trucks, buses, people, riders, poles and trees; paint far to near."""
        rng, cam = self.rng, self.cam
        todo: list[tuple[float, Callable[[], None]]] = []
        Wc = 1.2 * cam

        def vehicle(kind, Xa, D0, front=False):
            dims = {"car": (Wc, cam * _u(rng, 0.95, 1.1), cam * _u(rng, 2.7, 3.2)),
                    "truck": (1.6 * cam, cam * _u(rng, 2.0, 2.5), cam * _u(rng, 4.5, 7)),
                    "bus": (1.7 * cam, cam * _u(rng, 1.9, 2.2), cam * _u(rng, 7, 9))}[kind]
            wv, hv, lv = dims
            colors = {"car": CAR, "truck": TRUCK, "bus": BUS}[kind]
            body = _rgb(rng, _pick(rng, colors), 0.08)
            todo.append((D0, lambda: self._vehicle(kind, Xa, Xa + wv, D0, lv, hv, body, front)))
            return D0 + lv / self.f

        # parked rows along the curbs
        for side in (-1, 1):
            if rng.random() < 0.6:
                d = _u(rng, 1.0, 4.0)
                for _ in range(int(rng.integers(1, 5))):
                    kind = "car" if rng.random() > 0.15 else "truck"
                    w = Wc if kind == "car" else 1.6 * cam
                    Xa = self.XL + 0.1 * cam if side < 0 else self.XR - 0.1 * cam - w
                    d = vehicle(kind, Xa, d) + _u(rng, 0.3, 1.5) * cam / self.f
                    if d > self.Dend:
                        break
        # traffic in lanes
        lane = cam * _u(rng, 1.3, 1.7)
        lanes = [c for c in (-lane, 0.0, lane) if self.XL + 1.1 * cam <= c <= self.XR - 1.1 * cam]
        bus_lane = int(rng.integers(len(lanes))) if rng.random() < 0.25 else -1  # a bus in ~1 scene in 5
        for i, centre in enumerate(lanes):
            d = _u(rng, 1.8 if centre == 0 else 1.4, 6.0)
            for j in range(int(rng.integers(0, 3)) + (i == bus_lane)):
                r = rng.random()
                kind = "bus" if i == bus_lane and j == 0 else ("car" if r < 0.85 else "truck")
                w = {"car": Wc, "truck": 1.6 * cam, "bus": 1.7 * cam}[kind]
                if centre - w / 2 < self.XL + 0.2 * cam or centre + w / 2 > self.XR - 0.2 * cam:
                    break
                d = vehicle(kind, centre - w / 2 + _u(rng, -0.2, 0.2) * cam, d, front=centre < 0)
                d += cam * _u(rng, 1, 12) / self.f
        # people on the sidewalks
        for _ in range(int(rng.integers(2, 9))):
            side = _pick(rng, (-1, 1))
            lo, hi = (self.outL, self.inL) if side < 0 else (self.inR, self.outR)
            X = _u(rng, lo + 0.3 * cam, hi - 0.3 * cam)
            D = _u(rng, min(max(1.2, self._near_visible(X)), 5.0), 5.0)
            todo.append((D, lambda X=X, D=D: self._person(X, D)))
        # riders on bicycles near the curb, and parked bicycles
        for p_rider in (0.6, 0.25):
            if rng.random() >= p_rider:
                break
            side = _pick(rng, (-1, 1))
            X = (self.XL + 0.7 * cam) if side < 0 else (self.XR - 0.7 * cam)
            D = _u(rng, min(max(1.3, self._near_visible(X)), 3.5), 3.5)
            todo.append((D, lambda X=X, D=D: self._bicycle(X, D, rider=True)))
        if rng.random() < 0.3:
            side = _pick(rng, (-1, 1))
            X = (self.XL - 0.5 * cam) if side < 0 else (self.XR + 0.5 * cam)
            D = _u(rng, min(max(1.3, self._near_visible(X)), 4.5), 4.5)
            todo.append((D, lambda X=X, D=D: self._bicycle(X, D, rider=False)))
        # poles near the curb, some with signs / traffic lights
        for _ in range(int(rng.integers(2, 7))):
            side = _pick(rng, (-1, 1))
            X = (self.XL - 0.3 * cam) if side < 0 else (self.XR + 0.3 * cam)
            D = _u(rng, min(max(1.3, self._near_visible(X)), 8.0), 8.0)
            todo.append((D, lambda X=X, D=D, side=side: self._pole(X, D, side)))
        # trees on the outer part of the sidewalk / the grass strip
        for side in (-1, 1):
            if rng.random() < 0.5:
                X = (self.outL + 0.4 * cam) if side < 0 else (self.outR - 0.4 * cam)
                d = _u(rng, 1.2, 4.0)
                step = cam * _u(rng, 4, 9) / self.f
                while d < min(self.Dend, 25):
                    todo.append((d, lambda X=X, d=d: self._tree(X, d)))
                    d += step * _u(rng, 0.8, 1.2)
        for _, paint in sorted(todo, key=lambda t: -t[0]):
            paint()

    def _near_visible(self, X: float) -> float:
        """The nearest depth at which lateral position X is inside the frame (with a small margin);
        objects placed from there on are seen, instead of landing beside the picture."""
        m = 0.08 * self.h
        if X < 0:
            return -X / max(self.vx - m, 1.0)
        return X / max(self.w - m - self.vx, 1.0)

    def _ground_shadow(self, Xa, Xb, D0, D1, k=0.5):
        """Darken the ground under an object (photo only)."""
        cam, yh, vx = self.cam, self.yh, self.vx
        win = self._win(vx + Xa / D0, yh + cam / D1, vx + Xb / D0, yh + cam / D0 + 2)
        if win is None:
            return
        dy = self.ys[win[0]] - yh
        Drow = (cam / np.maximum(dy, 1e-3))[:, None]
        X = (self.xs[win[1]] - vx)[None, :] * Drow
        mask = (dy[:, None] > 0) & (Drow >= D0) & (Drow <= D1) & (X >= Xa) & (X <= Xb)
        ground = np.isin(self.label[win], (_ID["road"], _ID["sidewalk"], _ID["terrain"]))
        self.darken(win, mask & ground, k)

    def _vehicle(self, kind, Xa, Xb, D0, length, height, body, front) -> None:
        rng, f, cam = self.rng, self.f, self.cam
        D1 = D0 + length / f
        self._ground_shadow(Xa - 0.05 * cam, Xb + 0.05 * cam, D0 - 0.02, D1, _u(rng, 0.4, 0.6))
        Xs = Xb if Xb < 0 else (Xa if Xa > 0 else None)
        glass = _rgb(rng, GLASS, 0.12)
        tyre = np.asarray(TYRE, np.float32)
        k_side = np.float32(self.facade_light[-1 if Xs is not None and Xs < 0 else 1] * 0.92)
        if Xs is not None:
            got = self.along(Xs, D0, D1, 0, height)
            if got is not None:
                win, D, Z, inside = got
                lw = (D - D0) * f  # world length from the near end
                u, v = lw / length, Z / height
                r = (0.17 if kind == "car" else 0.13) * height
                centres = (0.18, 0.82) if kind != "truck" else (0.12, 0.55, 0.88)
                wheel = np.zeros(inside.shape, bool)
                hub = np.zeros(inside.shape, bool)
                for c in centres:
                    d2 = (lw - c * length) ** 2 + (Z - r) ** 2
                    wheel |= d2 <= r * r
                    hub |= d2 <= (0.45 * r) ** 2
                if kind == "car":
                    cab = (v >= 0.55) & (u >= 0.22 + 0.12 * (v - 0.55) / 0.45) & (u <= 0.78 - 0.18 * (v - 0.55) / 0.45)
                    shell = (v >= 0.12) & (v <= 0.55) | cab
                    win_mask = cab & (v >= 0.6) & (v <= 0.93) & (u >= 0.26 + 0.12 * (v - 0.55) / 0.45) & \
                        (u <= 0.74 - 0.18 * (v - 0.55) / 0.45) & (np.abs(u - 0.5) > 0.015)
                elif kind == "truck":
                    box = (u <= 0.72) & (v >= 0.22)
                    cabin = (u >= 0.75) & (v >= 0.12) & (v <= 0.72)
                    shell = box | cabin | ((v >= 0.12) & (v <= 0.24))
                    win_mask = cabin & (u >= 0.8) & (u <= 0.97) & (v >= 0.48) & (v <= 0.68)
                else:
                    shell = v >= 0.08
                    win_mask = (v >= 0.5) & (v <= 0.85) & (_frac(u * 8) > 0.08) & (u > 0.04) & (u < 0.96)
                mask = inside & (shell | wheel)
                gloss = 0.82 + 0.3 * np.clip(v, 0, 1)
                rgb = body * (gloss * (1 + 0.03 * self.mid[win] + 0.03 * self.fine[win]))[..., None]
                if kind == "truck":
                    cab_rgb = _rgb(rng, _pick(rng, ((200, 40, 40), (240, 240, 240), (40, 70, 150))), 0.08)
                    rgb = np.where((inside & (u >= 0.73))[..., None], cab_rgb * gloss[..., None], rgb)
                rgb = np.where(win_mask[..., None], glass * (0.8 + 0.4 * np.clip(v, 0, 1))[..., None], rgb)
                rgb = np.where(((v < 0.16) & ~wheel)[..., None], rgb * 0.55, rgb)
                rgb = np.where(wheel[..., None], np.where(hub[..., None], np.float32(130), tyre), rgb)
                self.put(win, mask, kind, rgb * k_side)
        got = self.facing(D0, Xa, Xb, 0, height)
        if got is None:
            return
        win, X, Z = got
        u, v = (X - Xa) / (Xb - Xa), Z / height
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
        tyres = (u >= 0.04) & (u <= 0.22) | (u >= 0.78) & (u <= 0.96)
        if kind == "car":
            taper = 0.1 * (v - 0.58) / 0.42
            shell = ((v >= 0.12) & (v <= 0.58)) | ((v > 0.58) & (np.abs(u - 0.5) <= 0.46 - taper))
            win_mask = (v >= 0.63) & (v <= 0.93) & (np.abs(u - 0.5) <= 0.4 - taper)
            wheel = (v <= 0.18) & tyres
            light_v = (v >= 0.4) & (v <= 0.5)
        elif kind == "truck":
            shell = v >= 0.1
            win_mask = np.zeros_like(inside) if not front else (v >= 0.45) & (v <= 0.7) & (np.abs(u - 0.5) < 0.4)
            wheel = (v <= 0.13) & tyres
            light_v = (v >= 0.14) & (v <= 0.2)
        else:
            shell = v >= 0.08
            win_mask = (v >= 0.55 if front else v >= 0.6) & (v <= 0.9) & (np.abs(u - 0.5) < 0.4)
            wheel = (v <= 0.1) & tyres
            light_v = (v >= 0.15) & (v <= 0.25)
        mask = inside & (shell | wheel)
        gloss = 0.85 + 0.25 * np.clip(v, 0, 1)
        rgb = body * (gloss * (1 + 0.03 * self.mid[win] + 0.03 * self.fine[win]))[..., None]
        rgb = np.where(win_mask[..., None], glass * (0.8 + 0.3 * np.clip(v, 0, 1))[..., None], rgb)
        if kind == "truck" and not front:
            seam = (np.abs(u - 0.5) < 0.012) | (np.abs(v - 0.2) < 0.01)
            rgb = np.where(seam[..., None], rgb * 0.6, rgb)
        lights = light_v & ((u < 0.15) | (u > 0.85))
        lamp = np.asarray((235, 235, 205) if front else (205, 30, 30), np.float32)
        rgb = np.where(lights[..., None], lamp, rgb)
        plate = (v >= 0.22) & (v <= 0.3) & (np.abs(u - 0.5) < 0.1) if kind == "car" else np.zeros_like(inside)
        rgb = np.where(plate[..., None], np.float32(222), rgb)
        rgb = np.where(((v >= 0.1) & (v <= 0.2) & ~wheel & ~plate)[..., None], rgb * 0.6, rgb)
        rgb = np.where(wheel[..., None], tyre, rgb)
        self.put(win, mask, kind, rgb)

    def _person(self, Xc, D) -> None:
        rng, cam = self.rng, self.cam
        hp = cam * _u(rng, 1.0, 1.25)
        wp = max(0.42 * hp, self.minw * D * 1.2)
        got = self.facing(D, Xc - wp / 2, Xc + wp / 2, 0, hp)
        if got is None:
            return
        self._ground_shadow(Xc - wp * 0.6, Xc + wp * 0.9, D - 0.05, D + 0.25 * cam / self.f, 0.65)
        win, X, Z = got
        a, v = (X - Xc) / (wp / 2), Z / hp
        head = (a / 0.32) ** 2 + ((v - 0.91) / 0.085) ** 2 <= 1
        torso = (v >= 0.44) & (v <= 0.84) & (np.abs(a) <= 0.92 - 0.9 * np.maximum(v - 0.78, 0) / 0.06 * 0.3)
        legs = (v < 0.46) & (np.abs(a) <= 0.55)
        mask = head | torso | legs
        skin = _rgb(rng, _pick(rng, SKIN), 0.06)
        hair = _rgb(rng, _pick(rng, ((40, 30, 24), (90, 70, 40), (20, 20, 20), (150, 150, 150))), 0.1)
        coat = _rgb(rng, _pick(rng, CLOTHES), 0.1)
        pants = _rgb(rng, _pick(rng, TROUSERS), 0.1)
        shade = (1 - 0.35 * a * a)[..., None] * (1 + 0.05 * self.mid[win])[..., None]
        rgb = np.where(head[..., None], np.where((v > 0.9)[..., None], hair, skin),
                       np.where(torso[..., None], coat, pants)) * shade
        seam = legs & (np.abs(a) < 0.06) & (v < 0.3)
        rgb = np.where(seam[..., None], rgb * 0.6, rgb)
        self.put(win, mask, "person", rgb)

    def _bicycle(self, Xc, D, rider: bool) -> None:
        rng, cam = self.rng, self.cam
        L = cam * _u(rng, 1.1, 1.3)
        r = 0.21 * L
        H = 2.4 * r + (0.62 * cam if rider else 0.25 * r)
        got = self.facing(D, Xc - L / 2 - r * 0.2, Xc + L / 2 + r * 0.2, 0, H)
        if got is None:
            return
        self._ground_shadow(Xc - L / 2, Xc + L / 2, D - 0.05, D + 0.2 * cam / self.f, 0.7)
        win, X, Z = got
        flip = _pick(rng, (-1.0, 1.0))
        x = (X - Xc) * flip  # +x is the front
        xr, xf = -L / 2 + r, L / 2 - r
        d_r = np.sqrt((x - xr) ** 2 + (Z - r) ** 2)
        d_f = np.sqrt((x - xf) ** 2 + (Z - r) ** 2)
        wheels = (d_r <= r) | (d_f <= r)
        tyre = ((d_r <= r) & (d_r > 0.78 * r)) | ((d_f <= r) & (d_f > 0.78 * r))
        frame = (x >= xr) & (x <= xf) & (Z >= r * 0.9) & (Z <= 2.1 * r) & \
            (Z <= r + (x - xr) / (xf - xr) * 0.4 * r + 1.0 * r)
        bars = (np.abs(x - (xf - 0.1 * r)) <= 0.22 * r) & (Z >= r) & (Z <= 2.4 * r)
        seat = (np.abs(x - (xr + 0.35 * r)) <= 0.35 * r) & (Z >= 2.0 * r) & (Z <= 2.3 * r)
        bike = wheels | frame | bars | seat
        frame_rgb = _rgb(rng, _pick(rng, BIKE), 0.1)
        spokes = _rgb(rng, (160, 166, 178), 0.06)
        rgb = np.where(tyre[..., None], np.asarray(TYRE, np.float32),
                       np.where(wheels[..., None] & ~(frame | bars)[..., None],
                                spokes * (1 + 0.1 * self.fine[win])[..., None], frame_rgb))
        self.put(win, bike, "bicycle", rgb)
        if not rider:
            return
        base = 2.1 * r
        top = H
        hv = top - base
        t = np.clip((Z - base) / (0.65 * hv), 0, 1)
        torso_x = xr + 0.4 * r + t * 0.6 * r  # leaning forward
        torso = (Z >= base - 0.1 * r) & (Z <= base + 0.65 * hv) & (np.abs(x - torso_x) <= 0.55 * r)
        head = ((x - (xr + 1.15 * r)) / (0.42 * r)) ** 2 + ((Z - (base + 0.83 * hv)) / (0.17 * hv)) ** 2 <= 1
        xb = xf - 0.1 * r  # handlebar
        s_arm = np.clip((x - (xr + r)) / max(xb - xr - r, 1e-3), 0, 1)
        arm_z = base + 0.58 * hv + s_arm * (2.45 * r - base - 0.58 * hv)
        arm = (x >= xr + r) & (x <= xb) & (np.abs(Z - arm_z) <= 0.2 * r)
        xp = 0.5 * (xr + xf) - 0.1 * r  # pedal
        s_leg = np.clip((base - Z) / (base - r), 0, 1)
        leg = (Z >= 0.85 * r) & (Z <= base) & (np.abs(x - (xr + 0.4 * r + s_leg * (xp - xr - 0.4 * r))) <= 0.32 * r)
        body = torso | head | arm | leg
        jacket = _rgb(rng, _pick(rng, HIVIS), 0.08)
        helmet = _rgb(rng, _pick(rng, ((235, 235, 235), (30, 30, 30), (40, 80, 180))), 0.05)
        pants = _rgb(rng, _pick(rng, TROUSERS), 0.1)
        rgb = np.where(head[..., None], helmet, np.where(leg[..., None], pants, jacket))
        rgb = rgb * (1 + 0.05 * self.mid[win])[..., None]
        self.put(win, body, "rider", rgb)

    def _pole(self, Xc, D, side: int) -> None:
        rng, cam = self.rng, self.cam
        wp = max(0.14 * cam, self.minw * D * 1.25)
        Zp = cam * _u(rng, 1.9, 2.7)
        got = self.facing(D, Xc - wp / 2, Xc + wp / 2, 0, Zp)
        if got is None:
            return
        win, X, Z = got
        a = (X - Xc) / (wp / 2)
        mask = (np.abs(a) <= 1) & (Z >= 0) & (Z <= Zp)
        metal = _rgb(rng, _pick(rng, POLE), 0.08)
        rgb = metal * ((1.1 - 0.45 * (a - 0.3) ** 2) * (1 + 0.03 * self.fine[win]))[..., None]
        self.put(win, mask, "pole", rgb)
        towards = -side  # the road is on the other side of the pole
        r = rng.random()
        if r < 0.3:  # street lamp: an arm over the road (still pole)
            arm_t = max(0.08 * cam, self.minw * D)
            arm_l = cam * _u(rng, 0.8, 1.6)
            xa, xb = sorted((Xc, Xc + towards * arm_l))
            got = self.facing(D, xa, xb, Zp - arm_t, Zp)
            if got is not None:
                win, X, Z = got
                self.put(win, (X >= xa) & (X <= xb) & (Z >= Zp - arm_t), "pole", metal * 0.95)
        if r > 0.25 and rng.random() < 0.75:  # a sign on the pole
            rs = max(0.35 * cam, self.minw * D * 1.8)
            zs = Zp - rs * 1.3 if r >= 0.3 else Zp - rs * 2.5
            self._sign(Xc + towards * rs * _u(rng, 0.0, 0.6), zs, rs, D * 0.995)
        if r > 0.45:  # a traffic light at the top
            wl = max(0.25 * cam, self.minw * D * 1.3)
            self._light(Xc + towards * wl * 0.6, Zp + wl * 2.6 * 0.3, wl, D * 0.99)

    def _sign(self, Xc, Zc, rs, D) -> None:
        rng = self.rng
        got = self.facing(D, Xc - rs, Xc + rs, Zc - rs, Zc + rs)
        if got is None:
            return
        win, X, Z = got
        a, b = (X - Xc) / rs, (Z - Zc) / rs
        shape = int(rng.integers(4))
        if shape == 0:
            rad = a * a + b * b
            plate, inner = rad <= 1, rad <= 0.55
        elif shape == 1:
            plate = (b >= -0.8) & (np.abs(a) <= (1 - b) * 0.58)
            inner = (b >= -0.5) & (np.abs(a) <= (0.6 - b) * 0.5)
        elif shape == 2:
            plate = (np.abs(a) <= 0.85) & (np.abs(b) <= 0.85)
            inner = (np.abs(a) <= 0.55) & (np.abs(b) <= 0.55)
        else:
            plate, inner = np.abs(a) + np.abs(b) <= 1, np.abs(a) + np.abs(b) <= 0.7
        scheme = int(rng.integers(3))
        outer_c, inner_c = [((30, 80, 172), (236, 236, 236)), ((202, 32, 32), (236, 236, 236)),
                            ((236, 192, 32), (40, 40, 40))][scheme]
        outer_c, inner_c = _rgb(rng, outer_c, 0.06), _rgb(rng, inner_c, 0.04)
        if scheme == 0:  # blue signs: white symbol inside a blue field
            inner = inner & (np.abs(a) < 0.22)
        rgb = np.where(inner[..., None], inner_c, outer_c) * (1 + 0.03 * self.fine[win])[..., None]
        self.put(win, plate, "traffic sign", rgb)

    def _light(self, Xc, Zb, wl, D) -> None:
        rng = self.rng
        hl = 2.6 * wl
        got = self.facing(D, Xc - wl / 2, Xc + wl / 2, Zb, Zb + hl)
        if got is None:
            return
        win, X, Z = got
        box = (np.abs(X - Xc) <= wl / 2) & (Z >= Zb) & (Z <= Zb + hl)
        body = _rgb(rng, _pick(rng, ((36, 38, 36), (46, 50, 44), (58, 60, 34))), 0.1)
        rgb = np.broadcast_to(body * (1 + 0.05 * self.mid[win])[..., None], box.shape + (3,)).copy()
        if rng.random() < 0.75:  # seen from the front: three lamps, one lit
            lit = int(rng.integers(3))
            on = ((255, 64, 40), (255, 196, 40), (64, 232, 130))
            for i, zc in enumerate((0.8, 0.5, 0.2)):
                lamp = (X - Xc) ** 2 + (Z - (Zb + zc * hl)) ** 2 <= (0.3 * wl) ** 2
                col = np.asarray(on[i] if i == lit else (70, 70, 64), np.float32)
                rgb = np.where(lamp[..., None], col, rgb)
        self.put(win, box, "traffic light", rgb)

    def _tree(self, Xt, D) -> None:
        rng, cam = self.rng, self.cam
        rx, rz = cam * _u(rng, 0.6, 1.1), cam * _u(rng, 0.6, 1.0)
        zc = cam * _u(rng, 1.5, 2.3)
        tw = max(0.14 * cam, 0.025 * self.h * D)
        got = self.facing(D, Xt - rx * 1.4, Xt + rx * 1.4, 0, zc + rz * 1.4)
        if got is None:
            return
        win, X, Z = got
        q = ((X - Xt) / rx) ** 2 + ((Z - zc) / rz) ** 2
        crown = q <= 1 + 0.5 * self.mid[win] + 0.25 * self.coarse[win]
        trunk = (np.abs(X - Xt) <= tw / 2) & (Z >= 0) & (Z <= zc)
        green = self._veg_rgb(win, rng) * (0.7 + 0.4 * np.clip((Z - zc + rz) / (2 * rz), 0, 1))[..., None]
        bark = _rgb(rng, (92, 76, 60), 0.1) * (1 + 0.08 * self.fine[win])[..., None]
        rgb = np.where(crown[..., None], green, bark)
        self.put(win, crown | trunk, "vegetation", rgb)

    def _ego(self) -> None:
        """The bonnet of the recording car along the bottom edge (labelId 'ego vehicle' -> ignore)."""
        rng, h, w = self.rng, self.h, self.w
        e = h * _u(rng, 0.07, 0.13)
        xn = (self.xs - w / 2) / (w / 2)
        top = h - e * (1 - 0.45 * xn * xn)  # (w,)
        r0 = int(max(0, np.floor(top.min())))
        win = (slice(r0, h), slice(0, w))
        mask = self.ys[r0:, None] >= top[None, :]
        t = np.clip((self.ys[r0:, None] - top[None, :]) / e, 0, 1)
        base = _rgb(rng, _pick(rng, ((34, 34, 38), (60, 62, 70), (150, 152, 158))), 0.06)
        rgb = base * (0.8 + 0.5 * (1 - t) * (1 + 0.2 * self.coarse[win]))[..., None]
        self.put(win, mask, "ego vehicle", rgb)


def _finish(rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
    """Global light: brightness and colour cast, a gradient, vignetting, then sensor noise -> uint8."""
    h, w = photo.shape[:2]
    gain = _u(rng, 0.8, 1.15)
    cast = rng.uniform(0.92, 1.08, 3).astype(np.float32) * np.float32(gain)
    gy, gx, vig = _u(rng, -0.15, 0.15), _u(rng, -0.15, 0.15), _u(rng, 0.0, 0.25)
    ty = ((np.arange(h, dtype=np.float32) + 0.5) / h - 0.5)[:, None] * 2
    tx = ((np.arange(w, dtype=np.float32) + 0.5) / w - 0.5)[None, :] * 2
    field = (1 + gy * ty + gx * tx) * (1 - vig * (tx * tx + ty * ty) / 2)
    out = photo * field[..., None] * cast
    sigma = np.float32(_u(rng, 2.0, 6.0))
    out += rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _render(rng: np.random.Generator, height: int, width: int, supersample: int = 1):
    """Photo (height, width) and labelIds at ``supersample`` times the size (for smooth masks)."""
    if height < 16 or width < 16:
        raise UnetDistError(f"scene size: expected at least 16x16 pixels, got {height}x{width}")
    hs, ws = height * supersample, width * supersample
    scene = _Scene(rng, hs, ws)
    scene.build()
    photo = scene.photo
    if supersample > 1:  # average the supersampled photo: anti-aliased edges like a real camera
        photo = photo.reshape(height, supersample, width, supersample, 3).mean(axis=(1, 3))
    return _finish(rng, photo), scene.label


def render_scene(rng: np.random.Generator, height: int, width: int,
                 supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: a photo (H, W, 3) uint8 and its Cityscapes labelIds uint8, the labels at
    ``supersample`` times the photo's size."""
    return _render(rng, height, width, supersample)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for sample ``index`` of ``split``: independent of every other sample."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])
