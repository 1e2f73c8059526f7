"""Checkpoints: one directory each, ``checkpoint.pt`` (tensors and plain values only, loaded with
``weights_only=True``) beside ``meta.json`` (step, config, quantizer reference) for humans and tools.

Both launchers keep checkpoints under ``<train.checkpoint_dir>/<train.run_name>/``: Ray Train puts
its reported checkpoints there (``storage_path`` + run name), torchrun writes ``checkpoint_step-N``
itself. :func:`find_latest` reads either. ``checkpoint_dir`` is any :mod:`unet_dist.storage`
location (a local path, ``s3://``, ``gs://``, ``az://``): on a store every file is one whole object
and ``meta.json`` goes last, and a checkpoint counts only when its ``checkpoint.pt`` has the size
``meta.json`` records, so a partial upload (a crash mid-copy, Ray copying file by file) is never
taken as the newest. Functions take a Location, a path or a URL and return Locations.

Below ``train/``: evaluation, prediction and serving load checkpoints without importing training.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from unet_dist import storage
from unet_dist.storage import Location, PathOrUrl
from unet_dist.config import Config, to_dict
from unet_dist.data import shards
from unet_dist.errors import UnetDistError

STATE_FILE = "checkpoint.pt"
META_FILE = "meta.json"


def meta(cfg: Config, *, step: int, best_miou: float, run_id: str | None, world_size: int,
         launcher: str, manifest_sha256: str | None) -> dict:
    """What ``meta.json`` records beside the tensors: where the run stands, the whole config, the
    MLflow run to continue, and the data it was trained on (the manifest's digest, from the job plan,
    and the quantizer's path)."""
    shards_dir = storage.location(cfg.shards.dir)
    return {
        "step": step,
        "steps_total": cfg.train.steps,
        "best_miou": best_miou,
        "config": to_dict(cfg),
        "mlflow_run_id": run_id,
        "world_size": world_size,
        "launcher": launcher,
        "shards_manifest_sha256": manifest_sha256,
        "quantizer": str(shards_dir / shards.QUANTIZER),
    }


def write(directory: Path, state: dict, meta: dict) -> Path:
    """Write a checkpoint into ``directory`` (created). ``state`` holds tensors and plain values."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    # The size lets find_latest tell a complete copy from one cut short (Ray copies file by file).
    meta = {**meta, "state_bytes": (directory / STATE_FILE).stat().st_size}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def step_dir(run_dir: PathOrUrl, step: int) -> Location:
    """Where the checkpoint of ``step`` is published under ``run_dir`` (both launchers)."""
    return storage.location(run_dir) / f"checkpoint_step-{step:08d}"


def publish(tmp_dir: Path, run_dir: PathOrUrl, step: int, keep: int = 2) -> Location:
    """Put the finished checkpoint folder ``tmp_dir`` into ``run_dir`` (locally by one rename, on a
    store with ``meta.json`` uploaded last) and keep only the newest ``keep``."""
    run = storage.location(run_dir)
    final = step_dir(run, step)
    final.upload_tree(tmp_dir, last=META_FILE)
    for old in [n for n in run.listdir() if n.startswith("checkpoint_step-")][:-keep]:
        (run / old).remove_tree()
    return final


def read_meta(directory: PathOrUrl) -> dict:
    try:
        return json.loads((storage.location(directory) / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UnetDistError(f"{directory}: not a readable checkpoint ({META_FILE}: {e})") from None


def find_latest(run_dir: PathOrUrl) -> Location | None:
    """The complete checkpoint with the highest step under ``run_dir`` (any launcher), or None."""
    run = storage.location(run_dir)
    best: tuple[int, str] | None = None
    for name in run.listdir():
        if name.startswith("."):
            continue
        child = run / name
        try:
            meta = json.loads((child / META_FILE).read_text())
            step = int(meta["step"])
            if meta.get("state_bytes", -1) not in (-1, (child / STATE_FILE).size()):
                continue  # a copy cut short by a crash
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a checkpoint, or meta.json without its checkpoint.pt yet
        if best is None or (step, name) > best:
            best = (step, name)
    return run / best[1] if best else None


def check_model(directory: PathOrUrl, model: dict, meta: dict | None = None) -> None:
    """Refuse to resume a checkpoint made for another network (from its meta.json: read here, or
    ``meta`` when the caller has it already)."""
    saved = ((meta if meta is not None else read_meta(directory)).get("config") or {}).get("model") or {}
    diff = [f"model.{k}={saved[k]!r} there, {model.get(k)!r} here" for k in sorted(saved) if saved[k] != model.get(k)]
    if diff:
        raise UnetDistError(f"{directory}: checkpoint was made for another model ({'; '.join(diff)}); "
                            f"resume with the same model.* keys or start a new train.run_name")


def resolve(path: PathOrUrl) -> Location:
    """A checkpoint directory, its ``checkpoint.pt``, or a run directory (its latest checkpoint)."""
    where = storage.location(path)
    if where.name == STATE_FILE and where.exists():
        return where.parent
    if (where / STATE_FILE).exists():
        return where
    latest = find_latest(where)
    if latest is None:
        raise UnetDistError(f"{path}: no checkpoint found (expected a directory with {STATE_FILE} and {META_FILE})")
    return latest


def load_state(directory: PathOrUrl, map_location: str | torch.device = "cpu") -> dict:
    """Load tensors safely: ``weights_only=True`` refuses pickled code objects."""
    path = storage.location(directory) / STATE_FILE
    try:
        source = path.local_path or io.BytesIO(path.read_bytes())
        return torch.load(source, map_location=map_location, weights_only=True)
    except UnetDistError:
        raise
    except Exception as e:  # torch raises UnpicklingError or RuntimeError for unsafe or broken files
        text = str(e).strip()
        if "Weights only load failed" in text:  # torch's first line suggests weights_only=False: not us
            what = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "unsupported content")
            raise UnetDistError(f"{path}: refused to load checkpoint: it holds more than tensors and plain "
                                f"values ({what.rstrip('.')})") from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise UnetDistError(f"{path}: cannot load checkpoint, corrupt or not a checkpoint ({first})") from None


def load_weights(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load a state dict, turning a shape mismatch into one clear line."""
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if name in own and own[name].shape != tensor.shape:
            raise UnetDistError(
                f"{source}: checkpoint was made for another model shape "
                f"({name}: {tuple(tensor.shape)} vs {tuple(own[name].shape)}); check model.* keys"
            )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise UnetDistError(
            f"{source}: checkpoint does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
