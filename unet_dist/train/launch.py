"""The two launchers of the one loop: Ray Train (``TorchTrainer``) and torchrun.

Each resolves the job once (:mod:`unet_dist.train.plan`: the preflight's reads make the plan) and
builds a :class:`~unet_dist.train.context.Context` for its ranks: how to publish a checkpoint and
where to resume from. Checkpoints of both live in ``<checkpoint_dir>/<run_name>/`` as
``checkpoint_step-N``, so either launcher can resume the other's run.

The path of ``cfg`` through :func:`run_torchrun` is drawn in docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

from unet_dist import devices, ray_address, storage, tracking
from unet_dist.config import Config, to_dict, validate
from unet_dist.data import shards
from unet_dist.distributed import init_torchrun_group, pin_interface
from unet_dist.errors import UnetDistError
from unet_dist import checkpoint
from unet_dist.train import goodput, multinode, preemption
from unet_dist.train import plan as job_plan
from unet_dist.train.agree import AllRanksError
from unet_dist.train.checkpointer import Write
from unet_dist.train.context import Context
from unet_dist.train.loop import train
from unet_dist.train.plan import JobPlan
from unet_dist.train.summary import RunSummary, measured

log = logging.getLogger("unet_dist.launch")


def preflight(cfg: Config) -> JobPlan:
    """Cheap checks before anything starts (a Ray cluster, process groups, an MLflow run), made on the
    facts they read, which become the job plan: the config's own values first, then both locations
    are reachable (on S3: endpoint, credentials, bucket), the shards manifest exists and lists shards
    that are there with their sizes, the MLflow server accepts our login, and the checkpoint this job
    would resume was made for this model. (Shard hashes are checked by rank 0 before the first step.)"""
    validate(cfg)  # the config's own checks first, for callers that built it in code
    plan = job_plan.resolve(cfg)
    for split in ("train", "val"):
        shards.check_listed(plan.cfg.shards.dir, plan.manifest, split)
    tracking.check_access(plan.tracking_uri)
    if plan.latest is not None:
        checkpoint.check_model(plan.latest, to_dict(plan.cfg)["model"], plan.latest_meta)
    return plan


def open_run(plan: JobPlan, launcher: str, world: int, tags: dict[str, str] | None = None) -> JobPlan:
    """The plan with the job's MLflow run: the one its newest checkpoint records, or a new one."""
    resume_id = (plan.latest_meta or {}).get("mlflow_run_id")
    run_id = tracking.start_run(plan.cfg, resume_run_id=resume_id, tags={
        "launcher": launcher, "unet_dist.run_name": plan.cfg.train.run_name, "world_size": str(world), **(tags or {})})
    return dataclasses.replace(plan, run_id=run_id)


# ----------------------------------------------------------------------------------------- torchrun
def run_torchrun(cfg: Config) -> RunSummary:
    """Called in every rank that torchrun starts (again after a torchrun restart, which so plans
    again); every rank returns its summary, rank 0's is the job's."""
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    preemption.install()  # the agent forwards its SIGTERM to every rank
    plan = preflight(cfg)  # every rank: the same answer, before any collective (plan.py says why)
    nodes = multinode.torchrun_nodes()
    multinode.check_tracking_store(plan.tracking_uri, nodes)
    rank, world = init_torchrun_group("nccl" if plan.cfg.train.use_gpu else "gloo")
    try:
        if nodes > 1:
            multinode.check_torchrun_places(plan.cfg, rank, world)
        if rank == 0:  # the one rank that logs: it opens the MLflow run (the others' plans have none)
            plan = open_run(plan, "torchrun", world)
        ctx = Context(rank=rank, world_size=world, local_rank=local_rank, launcher="torchrun", run_id=plan.run_id,
                      report=_publish_then_wait(plan.run_dir), report_async=_publish_in_background(plan.run_dir),
                      latest_checkpoint=lambda: contextlib.nullcontext(plan.latest), plan=plan,
                      # goodput: this rank's start; the torchrun agent's start is the job's launch
                      started_at=goodput.process_start(), launched_at=goodput.process_start(parent=True))
        try:
            summary = train(plan.cfg, ctx)
        except Exception:
            tracking.mark_failed(plan.tracking_uri, plan.run_id)  # rank 0 holds the run id
            raise
        if summary.status == preemption.STATUS and os.environ.get("UNET_DIST_PREEMPTED_FILE"):
            # jobs/lib.sh's run_torchrun turns torchrun's exit code 1 into EXIT_CODE when this is set
            Path(os.environ["UNET_DIST_PREEMPTED_FILE"]).write_text(f"{summary.steps}\n")
        return summary
    finally:
        dist.destroy_process_group()


def _publish_then_wait(run_dir: str):
    """torchrun's ``report``: rank 0 publishes the checkpoint into the run directory, then every
    rank waits for it at a barrier; rank 0 gets back where it went."""
    import torch.distributed as dist

    def report(metrics: dict, tmp: Path | None) -> str | None:
        final = None
        if tmp is not None:
            final = str(checkpoint.publish(tmp, run_dir, int(metrics["step"])))
            log.info("checkpoint %s", final)
        dist.barrier()
        return final

    return report


def _publish_in_background(run_dir: str):
    """torchrun's ``report_async``: rank 0 writes and publishes the snapshot in a thread of its own;
    no rank waits here (the loop waits at the next checkpoint and at the end: Checkpointer.flush)."""
    def report(metrics: dict, write: Write | None) -> str | None:
        if write is None:
            return None
        final = checkpoint.step_dir(run_dir, write.step)
        write.start(lambda tmp: checkpoint.publish(tmp, run_dir, write.step))
        return str(final)

    return report


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


def _checkpointed_key(plan: JobPlan) -> str:
    """A flag rank 0 sets before the job reports its first checkpoint (fit_ray clears it): from then
    on, a worker group that Ray restarts cannot take the plan's newest checkpoint as the newest."""
    return f"{_preempt_key(plan.cfg, plan.run_id)}/checkpointed"


def _ray_worker(loop_config: dict) -> RunSummary:
    """The function Ray Train runs in each worker; rank 0's summary becomes ``Result.return_value``."""
    import ray.train
    from ray.experimental import internal_kv

    started_at = time.time()  # goodput: this attempt's start in this worker
    plan = JobPlan.from_dict(loop_config["plan"])
    rc = ray.train.get_context()
    _watch_preemption(loop_config.get("preempt_key"))
    # Read before any collective, so before any rank of this attempt can report a checkpoint.
    checkpointed = [internal_kv._internal_kv_exists(_checkpointed_key(plan), namespace=PREEMPT_NAMESPACE)]

    def note_checkpointed() -> None:
        if not checkpointed[0]:
            internal_kv._internal_kv_put(_checkpointed_key(plan), b"1", overwrite=True, namespace=PREEMPT_NAMESPACE)
            checkpointed[0] = True

    def report(metrics: dict, tmp: Path | None) -> str | None:
        if tmp is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=None)
            return None
        final = checkpoint.step_dir(plan.run_dir, int(metrics["step"]))  # Ray keeps it under <storage_path>/<name>/
        note_checkpointed()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=final.name)
        return str(final)

    def report_async(metrics: dict, write: Write | None) -> str | None:
        """Ray's own asynchronous mode: its upload thread runs ``write`` (torch.save, then our
        upload with meta.json last) and registers the checkpoint once published; Ray waits for it
        when the training function returns. The folder handed to Ray is empty until then."""
        from ray.train import CheckpointUploadMode

        if write is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
            return None
        final = checkpoint.step_dir(plan.run_dir, write.step)
        note_checkpointed()
        ray_storage = rc.get_storage()

        def upload(ckpt, dir_name: str):
            write.run(Path(ckpt.path), lambda tmp: final.upload_tree(tmp, last=checkpoint.META_FILE))
            return ray.train.Checkpoint(path=f"{ray_storage.experiment_fs_path}/{dir_name}",
                                        filesystem=ray_storage.storage_filesystem)

        tmp = tempfile.mkdtemp(prefix="unet-ckpt-")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=final.name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=upload)
        return str(final)

    ctx = Context(rank=rc.get_world_rank(), world_size=rc.get_world_size(), local_rank=rc.get_local_rank(),
                  launcher="ray", run_id=plan.run_id, report=report, report_async=report_async,
                  group_change=lambda: _ray_node_drain() or (  # the loop takes rank 0's answer
                      _room_to_grow(plan.cfg, rc.get_world_size()) if rc.get_world_rank() == 0 else None),
                  plan=plan,
                  latest_checkpoint=lambda: _ray_latest(plan, restarted_after_a_checkpoint=checkpointed[0]),
                  started_at=started_at, launched_at=loop_config.get("launched_at"))  # goodput's clock
    try:
        return train(plan.cfg, ctx)  # a non-finite loss returns too: retrying from the same checkpoint repeats it
    except AllRanksError as e:  # bad input every rank agreed on: end the run instead of retrying it
        return RunSummary(status="error", error=str(e), world_size=ctx.world_size, mlflow_run_id=plan.run_id)


@contextlib.contextmanager
def _ray_latest(plan: JobPlan, restarted_after_a_checkpoint: bool):
    """Where a Ray worker resumes from: the plan's newest checkpoint, unless Ray restarted the worker
    group (FailureConfig) after this job wrote one. Then the run directory is listed again (the one
    lookup after the plan): the newest complete checkpoint there is at least as new as Ray's record
    (registered lazily: after a crash it can lag behind), and is read in place, under its own name,
    rather than downloaded first. Ray's record serves only when the directory has none."""
    import ray.train

    latest = checkpoint.find_latest(plan.run_dir) if restarted_after_a_checkpoint else plan.latest
    ckpt = ray.train.get_checkpoint() if latest is None else None
    if ckpt is None:
        yield latest
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def _ray_node_drain() -> str | None:
    import ray.train

    try:
        info = ray.train.get_preemption_info()
    except Exception as e:  # noqa: BLE001 - an alpha API: never let it stop training
        log.debug("no preemption info from Ray: %s", e)
        return None
    return f"Ray node drain ({len(info.preempted_node_ids)} node(s) of this job)" if info else None


def _room_to_grow(cfg: Config, world: int) -> str | None:
    """Elastic (train.min_workers), asked by rank 0: does the cluster have room for another worker
    while the group is below train.workers? Ray Train's controller grows the group at its next check
    (train.elastic_check_s) by restarting it from the latest checkpoint: one taken now loses only the
    steps until then."""
    import ray

    t = cfg.train
    if not t.min_workers or world >= t.workers:
        return None
    free = ray.available_resources()
    if free.get("CPU", 0) >= t.cpus_per_worker and (not t.use_gpu or free.get("GPU", 0) >= 1):
        return f"room for another worker (elastic, {world} of {t.workers})"
    return None


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
        ray_address.check(address)  # seconds, instead of minutes of GCS connection warnings
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as e:
            raise UnetDistError(f"RAY_ADDRESS={address}: {str(e).strip().splitlines()[0]}") from None
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", log_to_driver=True)


def ray_trainer(plan: JobPlan, callbacks: tuple = (), gpus_per_worker: float = 1.0,
                launched_at: float | None = None):
    """The TorchTrainer over :func:`_ray_worker` for the job ``plan`` (its MLflow run opened). One
    builder for a plain training job and for each trial of a sweep (unet_dist.tune).
    ``launched_at``: when the job was launched (epoch s), where its goodput's wall time starts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = plan.cfg.train
    filesystem, storage_path = storage.location(t.checkpoint_dir).ray_storage()  # a store: same endpoint as ours
    # Elastic: Ray Train V2 starts with as many workers as fit, down to min_workers, and resizes
    # the group (a restart from the latest checkpoint) as nodes go and come.
    elastic = 0 < t.min_workers < t.workers
    return TorchTrainer(
        _ray_worker,
        train_loop_config={"plan": plan.to_dict(), "preempt_key": _preempt_key(plan.cfg, plan.run_id),
                           "launched_at": launched_at},
        torch_config=_torch_config()(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.workers) if elastic else t.workers,
                                     use_gpu=t.use_gpu, elastic_resize_monitor_interval_s=t.elastic_check_s,
                                     resources_per_worker={"CPU": t.cpus_per_worker,
                                                           **({"GPU": gpus_per_worker} if t.use_gpu else {})}),
        run_config=RunConfig(
            name=t.run_name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def fit_ray(plan: JobPlan, trainer) -> RunSummary:
    """Run ``trainer`` to the end; a failure becomes one UnetDistError and a FAILED MLflow run."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_checkpointed_key(plan), namespace=PREEMPT_NAMESPACE)  # a new job: the plan holds
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        tracking.mark_failed(plan.tracking_uri, plan.run_id)
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UnetDistError):
            raise cause from None
        raise UnetDistError(f"Ray Train run '{plan.cfg.train.run_name}' failed: {str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__}") from None
    last = result.metrics or {}  # the last report
    done = getattr(result, "return_value", None) or RunSummary(  # rank 0's summary (its world: an elastic group's last)
        status=last.get("status", "finished"), steps=last.get("step"), checkpoint=plan.latest,
        world_size=plan.cfg.train.workers)
    if done.status == "error":
        tracking.mark_failed(plan.tracking_uri, plan.run_id)
        raise UnetDistError(done.error)
    # The scores as of the last report (what Ray's Result and Tune saw); the job's own facts from the plan.
    return dataclasses.replace(done, best_miou=measured(last.get("best_miou")), val_miou=measured(last.get("val_miou")),
                               resumed_from=plan.latest, mlflow_run_id=plan.run_id)


def run_ray(cfg: Config, launched_at: float | None = None) -> RunSummary:
    """Start a TorchTrainer on ``$RAY_ADDRESS`` (or a local Ray) and wait for it. ``launched_at``
    (epoch s): where the run's goodput wall time starts; by default this process's start."""
    plan = preflight(cfg)
    init_ray()
    import ray

    devices.check_ray_gpus(plan.cfg.train.use_gpu, plan.cfg.train.min_workers or plan.cfg.train.workers,
                           ray.cluster_resources())
    multinode.check_ray_cluster(plan.cfg)  # before the run exists: a store or folder one node lacks
    plan = open_run(plan, "ray", plan.cfg.train.workers)
    _forward_driver_preemption(_preempt_key(plan.cfg, plan.run_id))
    launched_at = launched_at or goodput.process_start()  # goodput: the driver's start
    return fit_ray(plan, ray_trainer(plan, launched_at=launched_at))
