"""Logging the served model to the active MLflow run: :func:`log_model` (training calls it through
``RunLogger.model``; a sweep's best trial is registered by :mod:`unet_dist.tune`).

The model is "models from code": MLflow keeps ``logged_code.py`` (which builds
:class:`unet_dist.serving.pyfunc.PhotoSegmenter`), tensor-only weights, the config, the
normalisation and the label table; nothing pickled.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from unet_dist import __version__, labels
from unet_dist.data.decode import MEAN, STD
from unet_dist.serving.loading import CONFIG, WEIGHTS

PREPROCESSING, LABELS = "preprocessing.json", "labels.json"


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
    import mlflow
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
            name="model", python_model=str(Path(__file__).with_name("logged_code.py")),
            artifacts={k: str(v) for k, v in files.items()}, signature=_signature(),
            input_example=(example, {"color_mask": True, "class_pixels": True}),
            pip_requirements=requirements(), registered_model_name=registered_model_name or None,
        )
    return info.model_uri
