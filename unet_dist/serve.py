"""The served model: an MLflow pyfunc that takes photos of any size and returns their class masks.

Logged as "models from code" (``serving_model.py`` is the code MLflow keeps), with tensor-only weights,
the config, the normalisation and the label table as artifacts: nothing pickled, and the model needs
only ``unet_dist`` and its dependencies. Serve it with
``mlflow models serve -m models:/<name>/<version> --env-manager local`` (see docs/serving.md).

Input, one row per photo: ``image`` (PNG/JPEG bytes; base64 in JSON) or ``pixels`` (uint8 H x W x 3
nested lists or array). Output, one record per photo: ``height``, ``width``, ``mask`` (trainIds,
uint8, the photo's size; a base64 PNG, or nested lists with ``mask_format=array``), and on request
``color_mask`` (base64 RGB PNG in the Cityscapes palette) and ``class_pixels`` ({class: pixels}).
Masks come from :func:`unet_dist.inference.segment`, the same path ``predict`` uses.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image, UnidentifiedImageError

from unet_dist import __version__, labels
from unet_dist.data.loader import MEAN, STD
from unet_dist.model_io import CONFIG, WEIGHTS, from_files

PREPROCESSING, LABELS = "preprocessing.json", "labels.json"
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
        from unet_dist.inference import segment

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


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.binary, "image", required=False),  # PNG/JPEG bytes, base64 in JSON
                     ColSpec(AnyType(), "pixels", required=False)])  # uint8 HxWx3 (nested lists in JSON)
    outputs = Schema([ColSpec(DataType.long, "height"), ColSpec(DataType.long, "width"),
                      ColSpec(AnyType(), "mask"),  # trainIds: base64 PNG (uint8, L mode) or nested lists
                      ColSpec(DataType.string, "color_mask", required=False),
                      ColSpec(AnyType(), "class_pixels", required=False)])
    params = ParamSchema([ParamSpec("color_mask", DataType.boolean, False),
                          ParamSpec("class_pixels", DataType.boolean, False),
                          ParamSpec("mask_format", DataType.string, "png")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _example_photo(h: int, w: int) -> bytes:
    """A smooth gradient (compresses to a small PNG) at the training crop size."""
    y, x = np.mgrid[0:h, 0:w]
    photo = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1)
    buf = io.BytesIO()
    Image.fromarray(photo.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def requirements() -> list[str]:
    """What the served model imports: this package and the libraries its inference path uses."""
    from importlib.metadata import version

    libs = ["torch", "numpy", "pillow", "pandas", "mlflow", "pyyaml", "webdataset"]
    return [f"unet_dist=={__version__}"] + [f"{lib}=={version(lib).split('+')[0]}" for lib in libs]


def log_model(model, cfg, example_hw: tuple[int, int], registered_model_name: str | None = None) -> str:
    """Log (and optionally register) ``model`` as the serving pyfunc in the active run; its model URI."""
    import pandas as pd
    import torch

    from unet_dist.config import to_dict

    with tempfile.TemporaryDirectory() as tmp:
        files = {"weights": Path(tmp) / WEIGHTS, "config": Path(tmp) / CONFIG,
                 "preprocessing": Path(tmp) / PREPROCESSING, "labels": Path(tmp) / LABELS}
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, files["weights"])
        files["config"].write_text(json.dumps(to_dict(cfg), indent=2))
        files["preprocessing"].write_text(json.dumps(
            {"input": "RGB uint8 HxWx3", "mean": MEAN.tolist(), "std": STD.tolist(),
             "formula": "(pixel - mean) / std per channel"}, indent=2))
        files["labels"].write_text(json.dumps(
            [{"train_id": lab.train_id, "name": lab.name, "id": lab.id, "color": list(lab.color)}
             for lab in labels.TRAIN_LABELS], indent=2))
        example = pd.DataFrame({"image": [_example_photo(*example_hw)]})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("serving_model.py")),
            artifacts={k: str(v) for k, v in files.items()}, signature=_signature(),
            input_example=(example, {"color_mask": True, "class_pixels": True}),
            pip_requirements=requirements(), registered_model_name=registered_model_name or None,
        )
    return info.model_uri
