"""Load a trained U-Net for inference from a checkpoint path, ``runs:/...`` or ``models:/...``.

Logged MLflow models (the serving pyfunc, see :mod:`unet_dist.serving.pyfunc`) carry our tensor-only weights
and config as artifacts, so they rebuild the same :class:`UNet` as a checkpoint does and run at any
image size (overlap-tile in 'valid' mode). Models logged before the pyfunc kept the same two files
under ``extra_files/``; they still load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from unet_dist.config import Config, from_dict
from unet_dist.errors import UnetDistError
from unet_dist.model import UNet
from unet_dist import checkpoint

WEIGHTS, CONFIG = "weights.pt", "unet_config.json"


def from_files(weights: Path, config: Path, source: str) -> tuple[UNet, Config]:
    """The model (eval mode, CPU) from a tensor-only state dict and the config JSON it was trained with."""
    cfg = from_dict(json.loads(Path(config).read_text()), f"{source} {CONFIG}")
    model = UNet.from_config(cfg.model)
    checkpoint.load_weights(model, torch.load(weights, map_location="cpu", weights_only=True), source)
    return model.eval(), cfg


def _from_mlflow(uri: str) -> tuple[UNet, Config]:
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as e:
        raise UnetDistError(f"{uri}: cannot fetch model from MLflow ({str(e).splitlines()[0]})") from None
    for folder in (local / "artifacts", local / "extra_files"):
        if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
            return from_files(folder / WEIGHTS, folder / CONFIG, uri)
    raise UnetDistError(f"{uri}: not a unet_dist model (expected artifacts/{CONFIG} and {WEIGHTS})")


def load_model(spec: str, device: str | torch.device = "cpu") -> tuple[UNet, Config]:
    """The model in eval mode and the config it was trained with; an ``.onnx`` file gives an
    :class:`~unet_dist.onnx_model.OnnxUNet` (onnxruntime, CPU), which predicts through the same path."""
    if spec.endswith(".onnx"):
        from unet_dist.onnx_model import OnnxUNet

        onnx_model = OnnxUNet(spec)
        return onnx_model.to(device), onnx_model.config
    if spec.startswith(("runs:/", "models:/")):
        model, cfg = _from_mlflow(spec)
    else:
        directory = checkpoint.resolve(spec)
        cfg = from_dict(checkpoint.read_meta(directory)["config"], f"{directory}/meta.json")
        model = UNet.from_config(cfg.model)
        checkpoint.load_weights(model, checkpoint.load_state(directory)["model"], str(directory))
    return model.to(device).eval(), cfg
