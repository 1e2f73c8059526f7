"""Pictures logged to MLflow, drawn with plain PIL + numpy (no matplotlib, no downloaded fonts).

Class colours always come from the Cityscapes palette (``labels.colorize``), so a picture reads the
same as the dataset's own colour masks; ignore (255) is black.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unet_dist.labels import BY_NAME, CLASS_NAMES, IGNORE, colorize, train_id_palette

GAP = 4  # pixels between panels of a grid
HEADER = 18  # height of a picture's title strip
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
WARN = (200, 0, 0)
# Viridis at five stops: perceptually even and readable for colour-blind viewers.
_CMAP_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _numpy(x: Any) -> np.ndarray:
    """Tensors (any device) or arrays -> numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    return right - left, bottom


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB along the viridis stops."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_CMAP_STOPS) - 1)
    lo = np.minimum(np.floor(v).astype(int), len(_CMAP_STOPS) - 2)
    frac = (v - lo)[..., None]
    return np.round(_CMAP_STOPS[lo] * (1 - frac) + _CMAP_STOPS[lo + 1] * frac).astype(np.uint8)


def overlay(photo: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colours of ``train_ids (H, W)`` over ``photo (H, W, 3) uint8``; ignore stays photo."""
    photo, train_ids = _numpy(photo), _numpy(train_ids)
    if photo.shape[:2] != train_ids.shape:
        raise ValueError(f"photo {photo.shape[:2]} and train ids {train_ids.shape} sizes differ")
    colors = colorize(train_ids).astype(np.float32)
    mixed = photo.astype(np.float32) * (1 - alpha) + colors * alpha
    mixed = np.where((train_ids == IGNORE)[..., None], photo.astype(np.float32), mixed)
    return np.round(mixed).astype(np.uint8)


def _as_nhwc_uint8(images: Any) -> np.ndarray:
    images = _numpy(images)
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be N x H x W x 3, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    return images


def prediction_grid(images: Any, labels: Any, preds: Any, max_rows: int = 4, title: str = "") -> Image.Image:
    """Rows of photo | truth | prediction, with column titles in a header strip.

    Size: width ``3 * W + 2 * GAP``, height ``HEADER + n * H + (n - 1) * GAP`` for n = min(N, max_rows).
    """
    images = _as_nhwc_uint8(images)
    labels, preds = _numpy(labels), _numpy(preds)
    n = min(len(images), max_rows)
    h, w = images.shape[1:3]
    if labels.shape[1:] != (h, w) or preds.shape[1:] != (h, w):
        raise ValueError(f"images {h}x{w}, labels {labels.shape[1:]} and preds {preds.shape[1:]} sizes differ")
    canvas = Image.new("RGB", (3 * w + 2 * GAP, HEADER + n * h + (n - 1) * GAP), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    heads = ("photo", "truth", "prediction")
    for col, head in enumerate(heads):
        text = f"{head} ({title})" if title and col == 0 else head
        tw, th = _text_size(draw, text)
        draw.text((col * (w + GAP) + max(0, (w - tw) // 2), (HEADER - th) // 2), text, fill=TEXT, font=_font())
    for row in range(n):
        y = HEADER + row * (h + GAP)
        panels = (images[row], colorize(labels[row].astype(np.uint8)), colorize(preds[row].astype(np.uint8)))
        for col, panel in enumerate(panels):
            canvas.paste(Image.fromarray(panel), (col * (w + GAP), y))
    return canvas


def confusion_heatmap(conf: Any, names: Sequence[str] = CLASS_NAMES, cell: int = 22,
                      title: str = "confusion, row-normalised (rows: truth, columns: prediction)") -> Image.Image:
    """Row-normalised confusion matrix: class names on both axes, percentages in cells, a colour scale.

    Rows with no true pixels are grey (nothing to normalise).
    """
    conf = _numpy(conf).astype(np.float64)
    k = conf.shape[0]
    if conf.shape != (k, k) or len(names) != k:
        raise ValueError(f"confusion matrix {conf.shape} and {len(names)} names do not match")
    rows = conf.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, conf / np.where(rows > 0, rows, 1), np.nan)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(_text_size(scratch, s)[0] for s in names) + 8
    tick_w = _text_size(scratch, "100%")[0]
    title_w = _text_size(scratch, title)[0]
    left, top = name_w, HEADER + name_w
    bar_x = left + k * cell + 12
    width = max(bar_x + 12 + 4 + tick_w + 6, title_w + 8)
    canvas = Image.new("RGB", (width, top + k * cell + 6), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill=TEXT, font=_font())
    colors = colormap(np.nan_to_num(norm))
    for i in range(k):
        tw, th = _text_size(draw, names[i])
        draw.text((left - 4 - tw, top + i * cell + (cell - th) // 2), names[i], fill=TEXT, font=_font())
        # column label: draw horizontally on a strip, rotate it to read bottom-up
        strip = Image.new("RGB", (name_w, cell), BACKGROUND)
        ImageDraw.Draw(strip).text((4, (cell - th) // 2), names[i], fill=TEXT, font=_font())
        canvas.paste(strip.rotate(90, expand=True), (left + i * cell, HEADER))
        for j in range(k):
            x0, y0 = left + j * cell, top + i * cell
            if np.isnan(norm[i, j]):
                draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(200, 200, 200))
                continue
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=tuple(int(c) for c in colors[i, j]))
            pct = int(round(norm[i, j] * 100))
            if pct > 0:
                tw, th = _text_size(draw, str(pct))
                ink = TEXT if norm[i, j] > 0.6 else (255, 255, 255)
                draw.text((x0 + (cell - tw) // 2, y0 + (cell - th) // 2), str(pct), fill=ink, font=_font())
    bar_h = k * cell
    bar = colormap(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(12, axis=1)
    canvas.paste(Image.fromarray(bar), (bar_x, top))
    for frac, label in ((1.0, "100%"), (0.5, "50%"), (0.0, "0%")):
        y = top + int(round((1 - frac) * (bar_h - 1)))
        th = _text_size(draw, label)[1]
        draw.text((bar_x + 16, min(max(top, y - th // 2), top + bar_h - th)), label, fill=TEXT, font=_font())
    return canvas


def _swatch_row(draw: ImageDraw.ImageDraw, y: int, row_h: int, items: list[tuple[str, Any]]) -> None:
    """Draw ``items`` left to right: ("swatch", rgb) | ("text", (str, ink)) | ("x", rgb) (crossed swatch)."""
    x = 4
    for kind, value in items:
        if kind in ("swatch", "x"):
            box = (x, y + 1, x + row_h - 3, y + row_h - 2)
            draw.rectangle(box, fill=tuple(int(c) for c in value), outline=(120, 120, 120))
            if kind == "x":
                draw.line(box, fill=WARN, width=2)
                draw.line((box[0], box[3], box[2], box[1]), fill=WARN, width=2)
            x += row_h + 2
        else:
            text, ink = value
            th = _text_size(draw, text)[1]
            draw.text((x, y + (row_h - th) // 2), text, fill=ink, font=_font())
            x += _text_size(draw, text)[0] + 6


def quantizer_picture(quantizer: dict, row_h: int = 18, width: int = 420) -> Image.Image:
    """One row per KMeans centroid: its colour, the palette colour it was named after, class and distance.

    Centroids mapped to ignore (255) get a crossed swatch and red text, so stray clusters stand out.
    Size: ``width x (HEADER + K * row_h)``.
    """
    centroids = np.asarray(quantizer["centroids"], dtype=np.float64)
    train_ids = list(quantizer["train_ids"])
    k = len(centroids)
    names = list(quantizer.get("names") or [""] * k)
    distances = list(quantizer.get("distances") or [float("nan")] * k)
    palette = train_id_palette()
    canvas = Image.new("RGB", (width, HEADER + k * row_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), f"KMeans centroids (k={k}) -> nearest palette colour -> trainId", fill=TEXT, font=_font())
    for i in range(k):
        tid = int(train_ids[i])
        named = BY_NAME[names[i]].color if names[i] in BY_NAME else tuple(palette[tid])
        centroid = tuple(int(c) for c in np.clip(np.round(centroids[i]), 0, 255))
        ignored = tid == IGNORE
        klass = "IGNORE" if ignored else f"{tid} {CLASS_NAMES[tid]}"
        _swatch_row(draw, HEADER + i * row_h, row_h, [
            ("text", (f"{i:2d}", TEXT)),
            ("swatch", centroid),
            ("x" if ignored else "swatch", named),
            ("text", (f"{names[i] or '?'} -> {klass}  d={float(distances[i]):.1f}", WARN if ignored else TEXT)),
        ])
    return canvas
