"""The served model: an MLflow pyfunc that takes photos of any size and returns their class masks.

Logged by :mod:`unet_dist.serving.model_log` as "models from code" (``logged_code.py`` is the code
MLflow keeps), with tensor-only weights, the config, the normalisation and the label table as
artifacts: nothing pickled, and the model needs only ``unet_dist`` and its dependencies. Serve it with
``mlflow models serve -m models:/<name>/<version> --env-manager local`` (see docs/serving.md).

Input, one row per photo: ``image`` (PNG/JPEG bytes; base64 in JSON) or ``pixels`` (uint8 H x W x 3
nested lists or array). Output, one record per photo: ``height``, ``width``, ``mask`` (trainIds,
uint8, the photo's size; a base64 PNG, or nested lists with ``mask_format=array``), and on request
``color_mask`` (base64 RGB PNG in the Cityscapes palette) and ``class_pixels`` ({class: pixels}).
Masks come from :func:`unet_dist.segment.segment`, the same path ``predict`` uses.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image, UnidentifiedImageError

from unet_dist.serving.loading import from_files

MAX_PIXELS_ENV = "UNET_SERVE_MAX_PIXELS"
FORMATS = ("PNG", "JPEG")
MASK_FORMATS = ("png", "array")


class BadRequest(MlflowException):
    """A request the model refuses: HTTP 400 with our one-line message.

    The scoring server rewrites an ``MlflowException``'s message to ``Failed to predict data '<the
    whole request>'. \\nError: ...`` (megabytes of base64 for a photo); this one keeps its own line.
    """

    def __init__(self, message: str):
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, _value: str) -> None:  # the server's rewrite is dropped
        pass


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _check_size(where: str, h: int, w: int, max_pixels: int) -> None:
    if h < 1 or w < 1:
        raise BadRequest(f"{where}: empty image ({h}x{w})")
    if h * w > max_pixels:
        raise BadRequest(f"{where}: {w}x{h} is {h * w} pixels, over the limit of {max_pixels} "
                         f"(serve.max_pixels or ${MAX_PIXELS_ENV})")


def decode_image(data: Any, where: str, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes (or their base64 text) -> (H, W, 3) uint8, size checked before decoding pixels."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: expected PNG or JPEG bytes (base64 in JSON)") from None
    if not isinstance(data, (bytes, bytearray)):
        raise BadRequest(f"{where}: expected PNG or JPEG bytes (base64 in JSON), got {type(data).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                _check_size(where, im.height, im.width, max_pixels)
                return np.asarray(im.convert("RGB"))  # as predict reads files: any PNG/JPEG mode -> RGB
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequest(f"{where}: not a readable PNG or JPEG image") from None


def decode_pixels(data: Any, where: str, max_pixels: int) -> np.ndarray:
    """A uint8 H x W x 3 array (or nested lists from JSON) -> (H, W, 3) uint8."""
    try:
        arr = np.asarray(data)
    except ValueError:  # ragged nested lists
        raise BadRequest(f"{where}: expected a uint8 HxWx3 array, got ragged nested lists") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadRequest(f"{where}: expected a uint8 HxWx3 array (3 channels, RGB), got shape {arr.shape}")
    _check_size(where, arr.shape[0], arr.shape[1], max_pixels)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255:
            raise BadRequest(f"{where}: expected uint8 values 0..255, got {arr.dtype} "
                             f"in [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def decode_batch(rows: list[dict], max_pixels: int, max_batch: int) -> list[np.ndarray]:
    """The request's rows -> photos; the first bad one raises :class:`BadRequest` naming it."""
    if not rows:
        raise BadRequest("empty batch: send at least one photo (a row with 'image' or 'pixels')")
    if len(rows) > max_batch:
        raise BadRequest(f"batch of {len(rows)} photos is over the limit of {max_batch} (serve.max_batch)")
    photos = []
    for i, row in enumerate(rows):
        image, pixels = row.get("image"), row.get("pixels")
        if _missing(image) == _missing(pixels):
            raise BadRequest(f"photo {i}: give exactly one of 'image' (PNG/JPEG bytes) or 'pixels' (HxWx3 uint8)")
        photos.append(decode_pixels(pixels, f"photo {i} pixels", max_pixels) if _missing(image)
                      else decode_image(image, f"photo {i} image", max_pixels))
    return photos


def _rows(model_input: Any) -> list[dict]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict("records")
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input).to_dict("records")
    if isinstance(model_input, list):
        return [dict(r) for r in model_input]
    raise BadRequest(f"input: expected rows with 'image' or 'pixels', got {type(model_input).__name__}")


class PhotoSegmenter(mlflow.pyfunc.PythonModel):
    """Photos in, trainId masks out; normalisation, tiling and the label table come with the model."""

    def load_context(self, context) -> None:
        import torch

        art = context.artifacts
        self.device = os.environ.get("UNET_SERVE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        model, cfg = from_files(art["weights"], art["config"], "served model")
        self.model = model.to(self.device)
        pre = json.loads(Path(art["preprocessing"]).read_text())
        self.mean = np.array(pre["mean"], dtype=np.float32)
        self.std = np.array(pre["std"], dtype=np.float32)
        table = json.loads(Path(art["labels"]).read_text())
        self.class_names = [c["name"] for c in table]
        self.palette = np.zeros((256, 3), dtype=np.uint8)
        for c in table:
            self.palette[c["train_id"]] = c["color"]
        self.max_pixels = int(os.environ.get(MAX_PIXELS_ENV) or cfg.serve.max_pixels)
        self.max_batch = cfg.serve.max_batch
        self.tile = cfg.serve.tile or None

    def predict(self, context, model_input, params: dict | None = None) -> list[dict]:
        from unet_dist.segment import segment

        params = params or {}
        fmt = params.get("mask_format", "png")
        if fmt not in MASK_FORMATS:
            raise BadRequest(f"params.mask_format: expected one of {'|'.join(MASK_FORMATS)}, got {fmt!r}")
        photos = decode_batch(_rows(model_input), self.max_pixels, self.max_batch)
        masks = segment(self.model, photos, device=self.device, mean=self.mean, std=self.std, tile=self.tile)
        out = []
        for mask in masks:
            rec: dict[str, Any] = {"height": int(mask.shape[0]), "width": int(mask.shape[1]),
                                   "mask": _png(mask) if fmt == "png" else mask.tolist()}
            if params.get("color_mask"):
                rec["color_mask"] = _png(self.palette[mask])
            if params.get("class_pixels"):
                counts = np.bincount(mask.ravel(), minlength=256)
                rec["class_pixels"] = {n: int(counts[i]) for i, n in enumerate(self.class_names) if counts[i]}
            out.append(rec)
        return out
