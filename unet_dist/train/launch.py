"""The two launchers of the one loop: Ray Train (``TorchTrainer``) and torchrun.

Each builds a :class:`~unet_dist.train.loop.Context` for its ranks: how to publish a checkpoint and
where to find the newest one. Checkpoints of both live in ``<checkpoint_dir>/<run_name>/`` as
``checkpoint_step-N``, so either launcher can resume the other's run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

from unet_dist.config import Config, from_dict, to_dict
from unet_dist.data import shards
from unet_dist.distributed import init_torchrun_group, pin_interface
from unet_dist.errors import UnetDistError
from unet_dist.train import checkpoint, multinode
from unet_dist.train.loop import AllRanksError, Context, train

log = logging.getLogger("unet_dist.launch")

def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.checkpoint_dir).resolve() / cfg.train.run_name


def absolute_paths(cfg: Config) -> Config:
    """Paths made absolute and the tracking URI pinned, so every worker sees the same places."""
    from unet_dist.tracking import resolve_tracking_uri

    cfg = dataclasses.replace(cfg)
    cfg.shards = dataclasses.replace(cfg.shards, dir=str(Path(cfg.shards.dir).resolve()))
    cfg.train = dataclasses.replace(cfg.train, checkpoint_dir=str(Path(cfg.train.checkpoint_dir).resolve()))
    cfg.mlflow = dataclasses.replace(cfg.mlflow, tracking_uri=resolve_tracking_uri(cfg))
    return cfg


def preflight(cfg: Config, world: int) -> None:
    """Cheap checks before anything starts (a Ray cluster, process groups, an MLflow run): the shards
    manifest exists with a shard per data stream, and the checkpoint this job would resume was made
    for this model."""
    multinode.check_shard_count(cfg, shards.load_manifest(cfg.shards.dir), world)
    latest = checkpoint.find_latest(run_dir(cfg))
    if latest is not None:
        checkpoint.check_model(latest, to_dict(cfg)["model"])


def open_run(cfg: Config, launcher: str, world: int) -> tuple[str, str | None]:
    """The MLflow run for this job: the one recorded in the newest checkpoint, or a new one."""
    from unet_dist.tracking import start_run

    latest = checkpoint.find_latest(run_dir(cfg))
    resume_id = checkpoint.read_meta(latest).get("mlflow_run_id") if latest else None
    run_id = start_run(cfg, resume_run_id=resume_id, tags={
        "launcher": launcher, "unet_dist.run_name": cfg.train.run_name, "world_size": str(world)})
    return run_id, str(latest) if latest else None


def _mark_failed(cfg: Config, run_id: str | None) -> None:
    """A job that ends in an error leaves its MLflow run FAILED, not RUNNING for ever."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(cfg.mlflow.tracking_uri).set_terminated(run_id, "FAILED")
    except Exception:  # the tracking server is unreachable: the job's own error matters more
        log.warning("could not mark MLflow run %s FAILED", run_id)


@contextlib.contextmanager
def _latest_on_disk(directory: Path):
    yield checkpoint.find_latest(directory)


# ----------------------------------------------------------------------------------------- torchrun
def run_torchrun(cfg: Config) -> dict | None:
    """Called in every rank that torchrun starts; returns the summary on rank 0."""
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    cfg = absolute_paths(cfg)
    preflight(cfg, int(os.environ["WORLD_SIZE"]))  # every rank: the same answer, before any collective
    multinode.check_tracking_store(cfg.mlflow.tracking_uri, multinode.torchrun_nodes())
    rank, world = init_torchrun_group("nccl" if cfg.train.use_gpu else "gloo")
    directory = run_dir(cfg)
    try:
        if multinode.torchrun_nodes() > 1:
            multinode.check_torchrun_places(cfg, rank, world)
        run_id = open_run(cfg, "torchrun", world)[0] if rank == 0 else None

        def report(metrics: dict, tmp: Path | None) -> None:
            if tmp is not None:
                final = checkpoint.publish(tmp, directory, int(metrics["step"]))
                log.info("checkpoint %s", final)
            dist.barrier()

        ctx = Context(rank=rank, world_size=world, local_rank=local_rank, launcher="torchrun", run_id=run_id,
                      report=report, latest_checkpoint=lambda: _latest_on_disk(directory))
        try:
            summary = train(cfg, ctx)
        except Exception:
            _mark_failed(cfg, run_id)  # rank 0 holds the run id
            raise
        latest = checkpoint.find_latest(directory)
        summary["checkpoint"] = str(latest) if latest else None
        return summary if rank == 0 else None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- Ray Train
def _ray_worker(loop_config: dict) -> dict:
    """The function Ray Train runs in each worker; rank 0's summary becomes ``Result.return_value``."""
    import ray.train

    cfg = from_dict(loop_config["config"], "loop config")
    rc = ray.train.get_context()
    directory = Path(loop_config["run_dir"])

    def report(metrics: dict, tmp: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(tmp)) if tmp is not None else None
        name = f"checkpoint_step-{int(metrics['step']):08d}" if tmp is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    @contextlib.contextmanager
    def latest():
        # Ray's controller registers reports lazily: after a crash the shared storage can hold
        # newer complete checkpoints than the one it hands back, so take the newer of the two.
        on_disk = checkpoint.find_latest(directory)
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield on_disk
            return
        with ckpt.as_directory() as d:
            newer = on_disk is not None and checkpoint.read_meta(on_disk)["step"] > checkpoint.read_meta(Path(d))["step"]
            yield on_disk if newer else Path(d)

    ctx = Context(rank=rc.get_world_rank(), world_size=rc.get_world_size(), local_rank=rc.get_local_rank(),
                  launcher="ray", run_id=loop_config["run_id"], report=report, latest_checkpoint=latest)
    try:
        return train(cfg, ctx)  # a non-finite loss returns too: retrying from the same checkpoint repeats it
    except AllRanksError as e:  # bad input every rank agreed on: end the run instead of retrying it
        return {"status": "error", "error": str(e)}


def _pin_ray_worker_interface() -> str:
    import ray

    ip = ray.util.get_node_ip_address()
    return f"{ip} {pin_interface(ip, towards=False, why='Ray node address')}"


def _torch_config():
    """Ray's TorchConfig, pinning each worker's gloo/NCCL interface to its Ray node address before
    the process group forms (the address a host name resolves to may be another network)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            for line in sorted(set(worker_group.execute(_pin_ray_worker_interface))):
                log.info("Ray worker at %s: network interface %s for collectives", *line.split(" ", 1))
            super().on_start(worker_group, backend_config)

    class PinnedTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return Backend

    return PinnedTorchConfig


def run_ray(cfg: Config) -> dict:
    """Start a TorchTrainer on ``$RAY_ADDRESS`` (or a local Ray) and wait for it."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg)
    t = cfg.train
    preflight(cfg, t.workers)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local" always starts a private cluster for this job (never a stale one from /tmp/ray).
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address="local", log_to_driver=True)
    multinode.check_ray_cluster(cfg)
    run_id, resumed = open_run(cfg, "ray", t.workers)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": to_dict(cfg), "run_id": run_id, "run_dir": str(run_dir(cfg))},
        torch_config=_torch_config()(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(
            name=t.run_name, storage_path=t.checkpoint_dir,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        _mark_failed(cfg, run_id)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UnetDistError):
            raise cause from None
        raise UnetDistError(f"Ray Train run '{t.run_name}' failed: {str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__}") from None
    metrics = result.metrics or {}
    returned = getattr(result, "return_value", None) or {}
    if returned.get("status") == "error":
        _mark_failed(cfg, run_id)
        raise UnetDistError(returned["error"])
    if returned.get("status"):
        metrics = {**metrics, "status": returned["status"], "step": returned.get("steps")}
    latest = checkpoint.find_latest(run_dir(cfg))
    return {"status": metrics.get("status", "finished"), "steps": metrics.get("step"),
            "best_miou": metrics.get("best_miou"), "val_miou": metrics.get("val_miou"),
            "world_size": t.workers, "resumed_from": resumed, "mlflow_run_id": run_id,
            "checkpoint": str(latest) if latest else None}
