"""Checkpoints: one directory each, ``checkpoint.pt`` (tensors and plain values only, loaded with
``weights_only=True``) beside ``meta.json`` (step, config, quantizer reference) for humans and tools.

Both launchers keep checkpoints under ``<train.checkpoint_dir>/<train.run_name>/``: Ray Train puts
its reported checkpoints there (``storage_path`` + run name), torchrun writes ``checkpoint_step-N``
itself. :func:`find_latest` reads either. ``checkpoint_dir`` may be a local path or ``s3://``
(through :mod:`unet_dist.storage`): on S3 every file is one complete PUT and ``meta.json`` goes
last, and a checkpoint counts only when its ``checkpoint.pt`` has the size ``meta.json`` records,
so a partial upload (a crash mid-copy, Ray copying file by file) is never taken as the newest.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from unet_dist import storage
from unet_dist.config import Config, to_dict
from unet_dist.data import shards
from unet_dist.errors import UnetDistError

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
         launcher: str, manifest_sha256: str | None) -> dict:
    """What ``meta.json`` records beside the tensors: where the run stands, the whole config, the
    MLflow run to continue, and the data it was trained on (the manifest's digest, from the job plan,
    and the quantizer's path)."""
    return {
        "step": step,
        "steps_total": cfg.train.steps,
        "best_miou": best_miou,
        "config": to_dict(cfg),
        "mlflow_run_id": run_id,
        "world_size": world_size,
        "launcher": launcher,
        "shards_manifest_sha256": manifest_sha256,
        "quantizer": storage.join(cfg.shards.dir, shards.QUANTIZER),
    }


def write(directory: Path, state: dict, meta: dict) -> Path:
    """Write a checkpoint into ``directory`` (created). ``state`` holds tensors and plain values."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    # The size lets find_latest tell a complete copy from one cut short (Ray copies file by file).
    meta = {**meta, "state_bytes": (directory / STATE_FILE).stat().st_size}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def publish(tmp_dir: Path, run_dir: str | Path, step: int, keep: int = 2) -> str | Path:
    """Put a finished checkpoint into ``run_dir`` (locally by one rename, on S3 with ``meta.json``
    uploaded last) and keep only the newest ``keep``."""
    name = f"checkpoint_step-{step:08d}"
    if storage.is_remote(run_dir):
        final = storage.join(run_dir, name)
        storage.remove_tree(final)  # a half upload of the same step by a killed attempt
        storage.upload_tree(Path(tmp_dir), final, last=META_FILE)
        for old in sorted(n for n in storage.listdir(run_dir) if n.startswith("checkpoint_step-"))[:-keep]:
            storage.remove_tree(storage.join(run_dir, old))
        return final
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / name
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=run_dir))
    shutil.copytree(tmp_dir, staging, dirs_exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in sorted(run_dir.glob("checkpoint_step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(directory: str | Path) -> dict:
    try:
        return json.loads(storage.read_text(storage.join(directory, META_FILE)))
    except (OSError, ValueError) as e:
        raise UnetDistError(f"{directory}: not a readable checkpoint ({META_FILE}: {e})") from None


def _child(run_dir: str | Path, name: str) -> str | Path:
    return storage.join(run_dir, name) if storage.is_remote(run_dir) else Path(run_dir) / name


def find_latest(run_dir: str | Path) -> str | Path | None:
    """The complete checkpoint with the highest step under ``run_dir`` (any launcher), or None."""
    best: tuple[int, str] | None = None
    for name in storage.listdir(run_dir):
        if name.startswith("."):
            continue
        child = storage.join(run_dir, name)
        try:
            meta = json.loads(storage.read_text(storage.join(child, META_FILE)))
            step = int(meta["step"])
            if meta.get("state_bytes", -1) not in (-1, storage.size(storage.join(child, STATE_FILE))):
                continue  # a copy cut short by a crash
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a checkpoint, or meta.json without its checkpoint.pt yet
        if best is None or (step, name) > best:
            best = (step, name)
    return _child(run_dir, best[1]) if best else None


def check_model(directory: str | Path, model: dict, meta: dict | None = None) -> None:
    """Refuse to resume a checkpoint made for another network (from its meta.json: read here, or
    ``meta`` when the caller has it already)."""
    saved = ((meta if meta is not None else read_meta(directory)).get("config") or {}).get("model") or {}
    diff = [f"model.{k}={saved[k]!r} there, {model.get(k)!r} here" for k in sorted(saved) if saved[k] != model.get(k)]
    if diff:
        raise UnetDistError(f"{directory}: checkpoint was made for another model ({'; '.join(diff)}); "
                            f"resume with the same model.* keys or start a new train.run_name")


def resolve(path: str | Path) -> str | Path:
    """A checkpoint directory, its ``checkpoint.pt``, or a run directory (its latest checkpoint)."""
    p = str(path)
    if storage.name(p) == STATE_FILE and storage.exists(p):
        return p[: -len(STATE_FILE) - 1] if storage.is_remote(p) else Path(p).parent
    if storage.exists(storage.join(p, STATE_FILE)):
        return p if storage.is_remote(p) else Path(p)
    latest = find_latest(p)
    if latest is None:
        raise UnetDistError(f"{path}: no checkpoint found (expected a directory with {STATE_FILE} and {META_FILE})")
    return latest


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load tensors safely: ``weights_only=True`` refuses pickled code objects."""
    path = storage.join(directory, STATE_FILE)
    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
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


def rank_state(model: torch.nn.Module) -> dict:
    """What differs between ranks and an exact resume needs: RNG states and the BatchNorm running
    statistics, which each rank updates from its own batches between the steps that average them."""
    return {"rng": rng_state(),
            "buffers": {name: b.detach().cpu().clone() for name, b in model.named_buffers()}}


def gather_rank_states(model: torch.nn.Module, world_size: int) -> list[dict] | None:
    """Every rank's :func:`rank_state`, on rank 0 (None elsewhere). A collective: all ranks call it."""
    mine = rank_state(model)
    if world_size == 1:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(mine, states, dst=0)
    return states


def restore_rank_state(model: torch.nn.Module, state: dict, rank: int, world_size: int) -> bool:
    """Restore this rank's RNG and buffers; False when the checkpoint was made by another world size
    (then rank 0's RNG state is used and the resume is not exact)."""
    ranks = state.get("ranks")
    if not ranks or len(ranks) != world_size:
        set_rng_state(state["rng"])
        return False
    mine = ranks[rank]
    set_rng_state(mine["rng"])
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in mine["buffers"]:
                buf.copy_(mine["buffers"][name].to(buf.device))
    return True
