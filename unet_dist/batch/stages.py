"""The three Ray Data stages of a batch prediction; each takes and returns a batch of columns.

Rows carry ``source`` and ``stem`` (see :mod:`.inputs`) and ``error``: a photo that cannot be read
is not dropped, it travels on with its one-line reason, and the driver reports it at the end.
"""
from __future__ import annotations

import os

import numpy as np

from unet_dist.errors import UnetDistError

NO_PHOTO = np.zeros((1, 1, 3), np.uint8)  # stands in for a photo that could not be read


def decode(batch: dict, pairs: bool = False) -> dict:
    """CPU: read each photo (a local file or an object) and decode it to (H, W, 3) uint8."""
    from unet_dist import storage
    from unet_dist.photo_files import photo_rgb

    photos, errors = [], []
    for source in batch["source"]:
        try:
            loc = storage.location(str(source))
            photos.append(photo_rgb(loc.read_bytes(), loc.url, pairs))
            errors.append("")
        except FileNotFoundError:
            photos.append(NO_PHOTO)
            errors.append(f"{source}: not found (removed after it was listed?)")
        except UnetDistError as e:
            photos.append(NO_PHOTO)
            errors.append(str(e))
    return {"source": batch["source"], "stem": batch["stem"], "photo": _column(photos), "error": np.array(errors)}


class Predictor:
    """One model per actor, loaded once; ``device`` is this actor's (cuda when it was given a GPU)."""

    def __init__(self, model: str, device: str, tracking_uri: str = ""):
        from unet_dist.serving.loading import load_model

        if tracking_uri:  # an MLflow model: the driver's store, wherever this actor runs
            os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
        self.device = device
        self.model, _ = load_model(model, device)
        print(f"batch_predict: predictor ready on {device} (pid {os.getpid()})", flush=True)

    def __call__(self, batch: dict) -> dict:
        from unet_dist.segment import segment

        ok = [i for i, e in enumerate(batch["error"]) if not e]
        masks = [NO_PHOTO[..., 0]] * len(batch["error"])
        for i, ids in zip(ok, segment(self.model, [batch["photo"][i] for i in ok], device=self.device)):
            masks[i] = ids
        return {"source": batch["source"], "stem": batch["stem"], "ids": _column(masks), "error": batch["error"]}


def write(batch: dict, out: str, formats: tuple[str, ...]) -> dict:
    """CPU: encode each mask in every format and write it whole under ``out``; the files of one input
    are written in a fixed order, and it counts as done only when all are there (:func:`.inputs.pending`)."""
    from unet_dist import mask_files, storage

    root = storage.location(out)
    for stem, ids, error in zip(batch["stem"], batch["ids"], batch["error"]):
        if error:
            continue
        for fmt in formats:
            (root / mask_files.output_name(str(stem), fmt)).write_bytes(mask_files.encode(ids, fmt))
    return {"source": batch["source"], "stem": batch["stem"], "error": batch["error"]}


def _column(arrays: list[np.ndarray]):
    """A batch column of images: one array when they share a shape, else a list (Ray stores it as a
    variable-shaped tensor column)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    return arrays
