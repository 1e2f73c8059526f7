"""The job, resolved once: where everything is and what is already there, in one frozen
:class:`JobPlan` that preflight checks and the trainer, the workers (as plain data in their loop
config), ``RunLogger`` and the checkpoint metadata read. None of them looks these facts up again.

Who builds it:

- Ray Train: the driver (``launch.run_ray``, or a sweep's trial in ``tune.run_trial``), once.
- torchrun: every rank, identically, in its preflight, before the process group forms: a wrong
  setting is then one line on every rank, never a rank left waiting in a collective, and the reads
  are the ones the preflight makes anyway (the manifest, one listing of the run directory), cheaper
  than a broadcast that needs the process group (and, on NCCL, each rank's GPU chosen first). Rank 0,
  the one rank that logs, adds the MLflow run it opens.
- In-process callers of the loop (tests, benchmarks) that bring no plan: :func:`from_shards`.

The one later lookup is legitimate: a worker restarted within the job (Ray's FailureConfig, torchrun's
``--max-restarts``) after the job wrote a checkpoint looks for the newest checkpoint again, since it is
newer than the plan's (``launch._ray_latest``; torchrun's restarted ranks rerun the launcher, and so
plan again).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

from unet_dist import checkpoint, storage, tracking
from unet_dist.config import Config, from_dict, to_dict
from unet_dist.data import shards


@dataclass(frozen=True)
class JobPlan:
    cfg: Config  # absolute shards.dir and train.checkpoint_dir, pinned mlflow.tracking_uri
    run_dir: str  # <checkpoint_dir>/<run_name>: both launchers' checkpoints
    manifest_text: str  # the shards manifest as stored
    manifest_sha256: str  # its digest: names the data in checkpoints and the MLflow run
    latest: str | None = None  # the newest complete checkpoint when the job was planned
    latest_meta: dict | None = None  # its meta.json
    run_id: str | None = None  # the MLflow run (launch.open_run)

    @cached_property
    def manifest(self) -> dict:
        return json.loads(self.manifest_text)

    @property
    def tracking_uri(self) -> str:
        return self.cfg.mlflow.tracking_uri

    def to_dict(self) -> dict:
        """Plain data (a Ray loop config)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"cfg": to_dict(self.cfg)}

    @classmethod
    def from_dict(cls, data: dict) -> JobPlan:
        return cls(**{**data, "cfg": from_dict(data["cfg"], "job plan")})


def run_dir(cfg: Config) -> str:
    """``<checkpoint_dir>/<run_name>``."""
    return str(storage.location(cfg.train.checkpoint_dir) / cfg.train.run_name)


def locate(cfg: Config) -> Config:
    """Paths made absolute and the tracking URI pinned, so every worker sees the same places."""
    cfg = dataclasses.replace(cfg)
    cfg.shards = dataclasses.replace(cfg.shards, dir=str(storage.location(cfg.shards.dir)))
    cfg.train = dataclasses.replace(cfg.train, checkpoint_dir=str(storage.location(cfg.train.checkpoint_dir)))
    cfg.mlflow = dataclasses.replace(cfg.mlflow, tracking_uri=tracking.resolve_tracking_uri(cfg))
    return cfg


def read(cfg: Config) -> JobPlan:
    """The facts of a located config (:func:`locate`), each read once: the checkpoint store reachable,
    the shards manifest (checked) and its digest, the newest complete checkpoint and its meta."""
    storage.location(cfg.train.checkpoint_dir).check()
    plan = from_shards(cfg)
    latest = checkpoint.find_latest(plan.run_dir)
    if latest is None:
        return plan
    return dataclasses.replace(plan, latest=str(latest), latest_meta=checkpoint.read_meta(latest))


def resolve(cfg: Config) -> JobPlan:
    return read(locate(cfg))


def from_shards(cfg: Config, run_id: str | None = None) -> JobPlan:
    """A plan of the shards alone: the config as given, the manifest read once, no checkpoint looked
    up (what the loop needs when its caller brings no plan, and the first half of :func:`read`)."""
    _, text = shards.read_manifest(cfg.shards.dir)
    return JobPlan(cfg, run_dir(cfg), text, hashlib.sha256(text.encode()).hexdigest(), run_id=run_id)
