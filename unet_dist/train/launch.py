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
import time
from pathlib import Path

from unet_dist import losses, storage, tracking
from unet_dist.config import Config, from_dict, to_dict
from unet_dist.data import shards
from unet_dist.distributed import init_torchrun_group, pin_interface
from unet_dist.errors import UnetDistError
from unet_dist.train import checkpoint, goodput, multinode, preemption
from unet_dist.train.loop import AllRanksError, Context, train

log = logging.getLogger("unet_dist.launch")

def run_dir(cfg: Config) -> str | Path:
    """``<checkpoint_dir>/<run_name>``: a local Path, or an ``s3://`` URL."""
    base = storage.absolute(cfg.train.checkpoint_dir)
    return storage.join(base, cfg.train.run_name) if storage.is_remote(base) else Path(base) / cfg.train.run_name


def absolute_paths(cfg: Config) -> Config:
    """Paths made absolute and the tracking URI pinned, so every worker sees the same places."""
    cfg = dataclasses.replace(cfg)
    cfg.shards = dataclasses.replace(cfg.shards, dir=storage.absolute(cfg.shards.dir))
    cfg.train = dataclasses.replace(cfg.train, checkpoint_dir=storage.absolute(cfg.train.checkpoint_dir))
    cfg.mlflow = dataclasses.replace(cfg.mlflow, tracking_uri=tracking.resolve_tracking_uri(cfg))
    return cfg


def preflight(cfg: Config) -> None:
    """Cheap checks before anything starts (a Ray cluster, process groups, an MLflow run): both
    locations are reachable (on S3: endpoint, credentials, bucket), the shards manifest exists and
    lists shards that are there with their sizes, and the checkpoint this job would resume was made
    for this model, and the MLflow server accepts our login. (Shard hashes are checked by rank 0
    before the first step.)"""
    losses.check_dice(cfg.train.dice)
    storage.check(cfg.train.checkpoint_dir)
    manifest = shards.load_manifest(cfg.shards.dir)
    for split in ("train", "val"):
        shards.check_listed(cfg.shards.dir, manifest, split)
    tracking.check_access(cfg.mlflow.tracking_uri)
    latest = checkpoint.find_latest(run_dir(cfg))
    if latest is not None:
        checkpoint.check_model(latest, to_dict(cfg)["model"])


def open_run(cfg: Config, launcher: str, world: int, tags: dict[str, str] | None = None) -> tuple[str, str | None]:
    """The MLflow run for this job: the one recorded in the newest checkpoint, or a new one."""
    latest = checkpoint.find_latest(run_dir(cfg))
    resume_id = checkpoint.read_meta(latest).get("mlflow_run_id") if latest else None
    run_id = tracking.start_run(cfg, resume_run_id=resume_id, tags={
        "launcher": launcher, "unet_dist.run_name": cfg.train.run_name, "world_size": str(world), **(tags or {})})
    return run_id, str(latest) if latest else None


@contextlib.contextmanager
def _latest_on_disk(directory: str | Path):
    yield checkpoint.find_latest(directory)


# ----------------------------------------------------------------------------------------- torchrun
def run_torchrun(cfg: Config) -> dict | None:
    """Called in every rank that torchrun starts; returns the summary on rank 0."""
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    preemption.install()  # the agent forwards its SIGTERM to every rank
    cfg = absolute_paths(cfg)
    preflight(cfg)  # every rank: the same answer, before any collective
    nodes = multinode.torchrun_nodes()
    multinode.check_tracking_store(cfg.mlflow.tracking_uri, nodes)
    rank, world = init_torchrun_group("nccl" if cfg.train.use_gpu else "gloo")
    directory = run_dir(cfg)
    try:
        if nodes > 1:
            multinode.check_torchrun_places(cfg, rank, world)
        run_id = open_run(cfg, "torchrun", world)[0] if rank == 0 else None

        def report(metrics: dict, tmp: Path | None) -> None:
            if tmp is not None:
                final = checkpoint.publish(tmp, directory, int(metrics["step"]))
                log.info("checkpoint %s", final)
            dist.barrier()

        ctx = Context(rank=rank, world_size=world, local_rank=local_rank, launcher="torchrun", run_id=run_id,
                      report=report, latest_checkpoint=lambda: _latest_on_disk(directory),
                      # goodput (issue 26): this rank's start; the torchrun agent's start is the launch
                      started_at=goodput.process_start(), launched_at=goodput.process_start(parent=True),
                      run_dir=directory)
        try:
            summary = train(cfg, ctx)
        except Exception:
            tracking.mark_failed(cfg, run_id)  # rank 0 holds the run id
            raise
        latest = checkpoint.find_latest(directory)
        summary["checkpoint"] = str(latest) if latest else None
        if summary["status"] == preemption.STATUS and os.environ.get("UNET_DIST_PREEMPTED_FILE"):
            # jobs/lib.sh's run_torchrun turns torchrun's exit code 1 into EXIT_CODE when this is set
            Path(os.environ["UNET_DIST_PREEMPTED_FILE"]).write_text(f"{summary['steps']}\n")
        if rank != 0 and summary["status"] == preemption.STATUS:
            return {"status": summary["status"], "rank": rank}  # every rank exits with EXIT_CODE
        return summary if rank == 0 else None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- Ray Train
PREEMPT_NAMESPACE = "unet_dist_preempt"


def _preempt_key(cfg: Config, run_id: str) -> str:
    """The flag the driver sets on SIGTERM (run_ray) and the workers poll (ray_trainer)."""
    return f"{cfg.train.run_name}/{run_id}"


def _watch_preemption(key: str | None) -> None:
    """In a Ray Train worker: a SIGTERM to this process and the driver's flag (it got SIGTERM) become
    a preemption request. The handler must be installed by the worker actor's main thread (the loop
    runs in another thread), so it is sent there as an actor task; it replaces Ray's handler, which
    would end the worker at once."""
    import ray
    from ray.experimental import internal_kv

    preemption.reset()
    actor = ray.get_runtime_context().current_actor
    if not ray.get(actor.execute.remote(preemption.install)):
        log.warning("no SIGTERM handler in this Ray worker: a SIGTERM to it ends it without a checkpoint")
    if key:
        preemption.add_source(lambda: "driver got SIGTERM" if internal_kv._internal_kv_get(
            key, namespace=PREEMPT_NAMESPACE) else None)


def _forward_driver_preemption(key: str) -> None:
    """On the driver: SIGTERM sets the flag the workers poll (they may run on other nodes)."""
    import threading

    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=PREEMPT_NAMESPACE)
    preemption.reset()
    preemption.install()  # after ray.init, which installs its own SIGTERM handler

    def forward() -> None:
        preemption.wait()
        log.warning("driver preempted (%s): asking the workers for a checkpoint", preemption.reason())
        internal_kv._internal_kv_put(key, b"1", overwrite=True, namespace=PREEMPT_NAMESPACE)

    threading.Thread(target=forward, name="preemption-forward", daemon=True).start()


def _ray_worker(loop_config: dict) -> dict:
    """The function Ray Train runs in each worker; rank 0's summary becomes ``Result.return_value``."""
    import ray.train

    started_at = time.time()  # goodput (issue 26): this attempt's start in this worker
    cfg = from_dict(loop_config["config"], "loop config")
    rc = ray.train.get_context()
    _watch_preemption(loop_config.get("preempt_key"))
    directory = loop_config["run_dir"]

    def report(metrics: dict, tmp: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(tmp)) if tmp is not None else None
        name = f"checkpoint_step-{int(metrics['step']):08d}" if tmp is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    @contextlib.contextmanager
    def latest():
        # Ray writes its checkpoints into the run directory, so the newest complete one there is at
        # least as new as Ray's record (registered lazily: after a crash it can lag behind), and is
        # read in place, under its own name, rather than downloaded to a temporary folder first.
        on_disk = checkpoint.find_latest(directory)
        ckpt = ray.train.get_checkpoint() if on_disk is None else None
        if ckpt is None:
            yield on_disk
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def node_drain() -> str | None:
        try:
            info = ray.train.get_preemption_info()
        except Exception as e:  # noqa: BLE001 - an alpha API: never let it stop training
            log.debug("no preemption info from Ray: %s", e)
            return None
        return f"Ray node drain ({len(info.preempted_node_ids)} node(s) of this job)" if info else None

    ctx = Context(rank=rc.get_world_rank(), world_size=rc.get_world_size(), local_rank=rc.get_local_rank(),
                  launcher="ray", run_id=loop_config["run_id"], report=report, latest_checkpoint=latest,
                  node_drain=node_drain, started_at=started_at, launched_at=loop_config.get("launched_at"),
                  run_dir=directory)  # goodput (issue 26)
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


def init_ray() -> None:
    """Join ``$RAY_ADDRESS``, or start a private local Ray for this job (never a stale one from /tmp/ray)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", log_to_driver=True)


def ray_trainer(cfg: Config, run_id: str, callbacks: tuple = (), gpus_per_worker: float = 1.0,
                launched_at: float | None = None):
    """The TorchTrainer over :func:`_ray_worker` for ``cfg`` (absolute paths), logging to ``run_id``.
    One builder for a plain training job and for each trial of a sweep (unet_dist.tune).
    ``launched_at``: when the job was launched (epoch s), where its goodput's wall time starts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    filesystem, storage_path = storage.pyarrow_filesystem(t.checkpoint_dir)  # S3: same endpoint as boto3
    return TorchTrainer(
        _ray_worker,
        train_loop_config={"config": to_dict(cfg), "run_id": run_id, "run_dir": str(run_dir(cfg)),
                           "preempt_key": _preempt_key(cfg, run_id), "launched_at": launched_at},
        torch_config=_torch_config()(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker,
                                                           **({"GPU": gpus_per_worker} if t.use_gpu else {})}),
        run_config=RunConfig(
            name=t.run_name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def fit_ray(cfg: Config, trainer, run_id: str, resumed: str | None) -> dict:
    """Run ``trainer`` to the end; a failure becomes one UnetDistError and a FAILED MLflow run."""
    t = cfg.train
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        tracking.mark_failed(cfg, run_id)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UnetDistError):
            raise cause from None
        raise UnetDistError(f"Ray Train run '{t.run_name}' failed: {str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__}") from None
    metrics = result.metrics or {}
    returned = getattr(result, "return_value", None) or {}
    if returned.get("status") == "error":
        tracking.mark_failed(cfg, run_id)
        raise UnetDistError(returned["error"])
    if returned.get("status"):
        metrics = {**metrics, "status": returned["status"], "step": returned.get("steps")}
    latest = checkpoint.find_latest(run_dir(cfg))
    return {"status": metrics.get("status", "finished"), "steps": metrics.get("step"),
            "best_miou": metrics.get("best_miou"), "val_miou": metrics.get("val_miou"),
            "world_size": t.workers, "resumed_from": resumed, "mlflow_run_id": run_id,
            "model_uri": returned.get("model_uri"), "loop_s": returned.get("wall_s"), "checkpoint": str(latest) if latest else None,
            "goodput": returned.get("goodput")}


def run_ray(cfg: Config, launched_at: float | None = None) -> dict:
    """Start a TorchTrainer on ``$RAY_ADDRESS`` (or a local Ray) and wait for it. ``launched_at``
    (epoch s): where the run's goodput wall time starts; by default this process's start."""
    cfg = absolute_paths(cfg)
    preflight(cfg)
    init_ray()
    multinode.check_ray_cluster(cfg)  # before the run exists: a store or folder one node lacks
    run_id, resumed = open_run(cfg, "ray", cfg.train.workers)
    _forward_driver_preemption(_preempt_key(cfg, run_id))
    launched_at = launched_at or goodput.process_start()  # goodput (issue 26): the driver's start
    return fit_ray(cfg, ray_trainer(cfg, run_id, launched_at=launched_at), run_id, resumed)
