"""Load a trained U-Net for inference from a checkpoint path, ``runs:/...`` or ``models:/...``.

Logged MLflow models carry our weights and config as extra files, so they rebuild the same
:class:`UNet` as a checkpoint does and run at any image size (overlap-tile in 'valid' mode).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from unet_dist.config import Config, from_dict
from unet_dist.errors import UnetDistError
from unet_dist.model import UNet
from unet_dist.train import checkpoint


def _from_mlflow(uri: str) -> tuple[dict, Config]:
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as e:
        raise UnetDistError(f"{uri}: cannot fetch model from MLflow ({str(e).splitlines()[0]})") from None
    extra = local / "extra_files"
    cfg_file, weights = extra / "unet_config.json", extra / "weights.pt"
    if not cfg_file.is_file() or not weights.is_file():
        raise UnetDistError(f"{uri}: not a unet_dist model (expected extra_files/unet_config.json and weights.pt)")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return state, from_dict(json.loads(cfg_file.read_text()), f"{uri} unet_config.json")


def load_model(spec: str, device: str | torch.device = "cpu") -> tuple[UNet, Config]:
    """The model in eval mode and the config it was trained with."""
    if spec.startswith(("runs:/", "models:/")):
        state, cfg = _from_mlflow(spec)
        source = spec
    else:
        directory = checkpoint.resolve(spec)
        cfg = from_dict(checkpoint.read_meta(directory)["config"], f"{directory}/meta.json")
        state = checkpoint.load_state(directory)["model"]
        source = str(directory)
    model = UNet.from_config(cfg.model)
    checkpoint.load_weights(model, state, source)
    return model.to(device).eval(), cfg
