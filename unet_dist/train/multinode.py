"""Checks for mistakes that only show once a job spans several machines, made before training starts.

On one machine every worker sees the driver's files, so a sqlite MLflow store, a checkpoint folder
on a local disk or a shard folder that exists only where the job was submitted all work. Across
nodes they fail late and confusingly ("Run with id=... not found" three times, or each node
resuming its own checkpoints). Each check here ends the job with one line naming the config key.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from unet_dist import storage
from unet_dist.config import Config
from unet_dist.errors import UnetDistError
from unet_dist.tracking import is_local_store  # noqa: F401  (tested here, where the checks use it)

PROBE = ".unet-dist-probe-"
PLACES = ("shards.dir", "train.checkpoint_dir")


def check_tracking_store(uri: str, nodes: int) -> None:
    if nodes > 1 and is_local_store(uri):
        raise UnetDistError(
            f"mlflow.tracking_uri: {uri} is a file on one machine, but this job's workers span {nodes} nodes; "
            "use an MLflow server every node reaches (mlflow.tracking_uri or MLFLOW_TRACKING_URI=http://HOST:5000)")


def place_of(cfg: Config, key: str) -> str:
    return cfg.shards.dir if key == "shards.dir" else cfg.train.checkpoint_dir


def write_probes(cfg: Config) -> dict[str, str]:
    """A file with a random token in each local place (made if missing); {key: "path token"}.
    A place in an object store is the same bucket from every node: nothing to probe."""
    token = secrets.token_hex(8)
    probes = {}
    for key in PLACES:
        place = storage.location(place_of(cfg, key)).local_path
        if place is None:
            continue
        place.mkdir(parents=True, exist_ok=True)
        path = place / f"{PROBE}{token}"
        path.write_text(token)
        probes[key] = f"{path} {token}"
    return probes


def missing_probes(probes: dict[str, str]) -> list[str]:
    """The keys whose probe this machine cannot read back (run on every node)."""
    missing = []
    for key, entry in probes.items():
        path, token = entry.rsplit(" ", 1)
        try:
            ok = Path(path).read_text() == token
        except OSError:
            ok = False
        if not ok:
            missing.append(key)
    return missing


def remove_probes(probes: dict[str, str]) -> None:
    for entry in probes.values():
        Path(entry.rsplit(" ", 1)[0]).unlink(missing_ok=True)


def unseen_error(cfg: Config, unseen: dict[str, list[str]]) -> UnetDistError:
    """One line for the first key some node cannot see: {key: [node, ...]}."""
    key = next(k for k in PLACES if unseen.get(k))
    return UnetDistError(
        f"{key}: {place_of(cfg, key)} is not the same folder on {', '.join(sorted(unseen[key]))} as where the job "
        "started; expected storage every node sees (a shared filesystem mounted at the same path, or an object store)")


# --------------------------------------------------------------------------------- Ray
def ray_worker_nodes(cfg: Config) -> list[dict]:
    """Alive Ray nodes that can host a training worker (a 0-CPU head cannot)."""
    import ray

    need = "GPU" if cfg.train.use_gpu else "CPU"
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(need, 0) > 0]


def check_ray_cluster(cfg: Config) -> None:
    """Before the trainer starts: the tracking store and both shared places, on every worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = ray_worker_nodes(cfg)
    if cfg.train.workers > 1:
        check_tracking_store(cfg.mlflow.tracking_uri, len(nodes))
    if len(nodes) < 2:
        return
    probes = write_probes(cfg)
    try:
        look = ray.remote(num_cpus=0)(lambda p: (socket.gethostname(), missing_probes(p)))
        answers = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(probes) for n in nodes])
    finally:
        remove_probes(probes)
    unseen: dict[str, list[str]] = {}
    for node, (host, missing) in zip(nodes, answers):
        for key in missing:
            unseen.setdefault(key, []).append(f"{host} ({node['NodeManagerAddress']})")
    if unseen:
        raise unseen_error(cfg, unseen)


# --------------------------------------------------------------------------------- torchrun
def torchrun_nodes() -> int:
    """Nodes in this torchrun job (ranks per node is the same on every node)."""
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    return max(1, world // max(1, local))


def check_torchrun_places(cfg: Config, rank: int, world: int) -> None:
    """After the process group is up, before any step: rank 0's probes read back by every rank."""
    import torch.distributed as dist

    box = [write_probes(cfg) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    answers: list = [None] * world
    dist.all_gather_object(answers, (socket.gethostname(), missing_probes(box[0])))
    dist.barrier()
    if rank == 0:
        remove_probes(box[0])
    unseen: dict[str, list[str]] = {}
    for host, missing in answers:
        for key in missing:
            if host not in unseen.setdefault(key, []):
                unseen[key].append(host)
    if unseen:
        raise unseen_error(cfg, unseen)
