"""Checkpoints: one directory each, ``checkpoint.pt`` (tensors and plain values only, loaded with
``weights_only=True``) beside ``meta.json`` (step, config, quantizer reference) for humans and tools.

Both launchers keep checkpoints under ``<train.checkpoint_dir>/<train.run_name>/``: Ray Train puts
its reported checkpoints there (``storage_path`` + run name), torchrun writes ``checkpoint_step-N``
itself. :func:`find_latest` reads either.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from unet_dist.config import Config, to_dict
from unet_dist.data import shards
from unet_dist.errors import UnetDistError
from unet_dist.files import sha256_file

STATE_FILE = "checkpoint.pt"
META_FILE = "meta.json"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def meta(cfg: Config, *, step: int, best_miou: float, run_id: str | None, world_size: int,
         launcher: str) -> dict:
    """What ``meta.json`` records beside the tensors: where the run stands, the whole config, the
    MLflow run to continue, and the data it was trained on (manifest digest, quantizer path)."""
    manifest = Path(cfg.shards.dir) / shards.MANIFEST
    return {
        "step": step,
        "steps_total": cfg.train.steps,
        "best_miou": best_miou,
        "config": to_dict(cfg),
        "mlflow_run_id": run_id,
        "world_size": world_size,
        "launcher": launcher,
        "shards_manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
        "quantizer": str(Path(cfg.shards.dir) / shards.QUANTIZER),
    }


def write(directory: Path, state: dict, meta: dict) -> Path:
    """Write a checkpoint into ``directory`` (created). ``state`` holds tensors and plain values."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    # The size lets find_latest tell a complete copy from one cut short (Ray copies file by file).
    meta = {**meta, "state_bytes": (directory / STATE_FILE).stat().st_size}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def publish(tmp_dir: Path, run_dir: Path, step: int, keep: int = 2) -> Path:
    """Move a finished checkpoint into ``run_dir`` atomically and keep only the newest ``keep``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint_step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=run_dir))
    shutil.copytree(tmp_dir, staging, dirs_exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in sorted(run_dir.glob("checkpoint_step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(directory: Path) -> dict:
    try:
        return json.loads((Path(directory) / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UnetDistError(f"{directory}: not a readable checkpoint ({META_FILE}: {e})") from None


def find_latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``run_dir`` (any launcher), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best: tuple[int, str] | None = None
    for child in run_dir.iterdir():
        if child.name.startswith(".") or not (child / STATE_FILE).is_file() or not (child / META_FILE).is_file():
            continue
        try:
            meta = json.loads((child / META_FILE).read_text())
            step = int(meta["step"])
            if meta.get("state_bytes", -1) not in (-1, (child / STATE_FILE).stat().st_size):
                continue  # a copy cut short by a crash
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if best is None or (step, child.name) > best:
            best = (step, child.name)
    return run_dir / best[1] if best else None


def check_model(directory: Path, model: dict) -> None:
    """Refuse to resume a checkpoint made for another network (reads meta.json only, so it is cheap)."""
    saved = (read_meta(directory).get("config") or {}).get("model") or {}
    diff = [f"model.{k}={saved[k]!r} there, {model.get(k)!r} here" for k in sorted(saved) if saved[k] != model.get(k)]
    if diff:
        raise UnetDistError(f"{directory}: checkpoint was made for another model ({'; '.join(diff)}); "
                            f"resume with the same model.* keys or start a new train.run_name")


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, its ``checkpoint.pt``, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if p.is_file() and p.name == STATE_FILE:
        return p.parent
    if (p / STATE_FILE).is_file():
        return p
    latest = find_latest(p)
    if latest is None:
        raise UnetDistError(f"{path}: no checkpoint found (expected a directory with {STATE_FILE} and {META_FILE})")
    return latest


def load_state(directory: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load tensors safely: ``weights_only=True`` refuses pickled code objects."""
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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
