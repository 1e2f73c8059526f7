"""MLflow: one run per training job, created once, logged to by rank 0 only.

The run id is created by whoever starts the job (the Ray driver, or torchrun's rank 0), written into
every checkpoint, and read back on resume, so a restarted or relaunched job continues the same run.
Steps already in the run's history are not logged again after a resume. The tracking URI comes pinned
in the config by the job plan (``unet_dist.train.plan.locate``); a training job resolves it nowhere else.

Training's MLflow calls all live here: the server check, the run (:func:`start_run`,
:func:`mark_failed`) and :class:`RunLogger`, the one writer the loop logs through. MLflow is also
called by :mod:`unet_dist.serving` (the model format: logging the pyfunc, loading ``runs:/`` and
``models:/``) and by :mod:`unet_dist.tune` (a sweep's parent run, its results table and pictures,
registering the best trial's model).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from unet_dist import labels, storage, tracking_store, viz
from unet_dist.config import Config, dump_yaml, flatten
from unet_dist.data import shards
from unet_dist.errors import UnetDistError
from unet_dist.scoring import format_table
from unet_dist.serving import model_log

log = logging.getLogger("unet_dist.tracking")


def resolve_tracking_uri(cfg: Config) -> str:
    """Config, then ``$MLFLOW_TRACKING_URI``, then a sqlite store in ./runs/mlflow (absolute path,
    so Ray workers in other directories write to the same store; the job plan pins it once):
    :mod:`unet_dist.tracking_store`."""
    return tracking_store.resolve(cfg.mlflow.tracking_uri)


def is_local_store(uri: str) -> bool:
    """A tracking URI that names a file of the machine it is read on (sqlite:, file:, a bare path).
    Tracking URIs are MLflow's grammar, not storage locations: they are read here, in tracking."""
    if uri.startswith(("sqlite:", "file:")):
        return True
    return "://" not in uri and not uri.startswith("databricks")


def check_access(uri: str) -> None:
    """Fail fast, before any training, when an MLflow server refuses our login.

    A server with authentication (``mlflow server --app-name basic-auth``) answers 401/403 on the
    first call; without this check the job would train for its first steps and only then fail,
    deep in a worker, with a REST traceback. Local stores (sqlite, files) need no login.
    """
    if not uri.startswith(("http://", "https://")):
        return
    _check_reachable(uri, REACH_S)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        status = e.get_http_status_code()
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if status == 401 and not user:
            raise UnetDistError(f"MLFLOW_TRACKING_USERNAME: the MLflow server at {uri} requires a login: "
                                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        if status == 401:
            raise UnetDistError(f"MLFLOW_TRACKING_PASSWORD: the MLflow server at {uri} refused user '{user}' "
                                "(wrong username or password)") from None
        if status == 403:
            raise UnetDistError(f"MLFLOW_TRACKING_USERNAME: user '{user}' may not read experiments on the "
                                f"MLflow server at {uri}") from None
        raise


REACH_S = 30.0  # how long a server that does not answer (yet: DNS and Services at pod start) is retried


def _check_reachable(uri: str, budget_s: float) -> None:
    """One line, within ``budget_s``, for a server that cannot be resolved or connected to; MLflow's
    own client would retry for minutes and end in a traceback."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline, pause = time.monotonic() + budget_s, 0.5
    while True:
        try:
            socket.create_connection((parts.hostname, port), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() + pause > deadline:
                why = "cannot resolve its host name" if isinstance(e, socket.gaierror) else f"no answer on port {port} ({e.strerror or e})"
                raise UnetDistError(
                    f"mlflow.tracking_uri: {uri}: {why} (tried for {budget_s:.0f} s); expected an MLflow server "
                    "this machine reaches (set mlflow.tracking_uri or MLFLOW_TRACKING_URI)") from None
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def _artifact_location(uri: str) -> str | None:
    # A sqlite store would otherwise put artifacts in ./mlruns of whichever process logs first.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def pinned_uri(cfg: Config) -> str:
    """The tracking URI a located config carries (a config nothing located is resolved here)."""
    return cfg.mlflow.tracking_uri or resolve_tracking_uri(cfg)


def start_run(cfg: Config, *, resume_run_id: str | None, tags: dict[str, str]) -> str:
    """Return the run id to log to: ``resume_run_id`` when it still exists, else a new run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = pinned_uri(cfg)
    tracking_store.prepare(uri)  # the first write to the store: its folder is made only now
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if resume_run_id:
        try:
            client.get_run(resume_run_id)
            client.set_terminated(resume_run_id, "RUNNING")
            log.info("continuing MLflow run %s", resume_run_id)
            return resume_run_id
        except Exception:  # the store was reset: start a fresh run rather than fail the job
            log.warning("MLflow run %s not found in %s; starting a new run", resume_run_id, uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.mlflow.experiment, artifact_location=_artifact_location(uri))
    run = client.create_run(exp_id, run_name=cfg.mlflow.run_name or cfg.train.run_name, tags=tags)
    params = [(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flatten(cfg).items()]
    from mlflow.entities import Param
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params])
    log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, cfg.mlflow.experiment, uri)
    return run.info.run_id


def mark_failed(tracking_uri: str, run_id: str | None) -> None:
    """A job that ends in an error leaves its MLflow run FAILED, not RUNNING for ever."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).set_terminated(run_id, "FAILED")
    except Exception:  # the tracking server is unreachable: the job's own error matters more
        log.warning("could not mark MLflow run %s FAILED", run_id)


class RunLogger:
    """Rank 0's handle on the job's MLflow run. Other ranks get :class:`NullLogger`.

    Its public methods (``metrics``, ``tags``, ``image``, ``artifact``, ``text``, ``run_inputs``,
    ``evaluation``, ``model``, ``close``) are all the loop calls: the writer behind them is this
    class's own business."""

    def __init__(self, cfg: Config, run_id: str, resumed: bool):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(pinned_uri(cfg))
        if cfg.mlflow.system_metrics:
            mlflow.set_system_metrics_sampling_interval(cfg.mlflow.system_metrics_interval)
            mlflow.set_system_metrics_samples_before_logging(1)
        self.run = mlflow.start_run(run_id=run_id, log_system_metrics=cfg.mlflow.system_metrics)
        self.run_id = run_id
        self._resumed = resumed
        self._last_step: dict[str, int] = {}

    def _already_logged(self, key: str) -> int:
        if key not in self._last_step:
            history = self.mlflow.tracking.MlflowClient().get_metric_history(self.run_id, key) if self._resumed else []
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    def metrics(self, values: dict[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in values.items()
                 if np.isfinite(v) and step > self._already_logged(k)}
        if fresh:
            self.mlflow.log_metrics(fresh, step=step)
            for k in fresh:
                self._last_step[k] = step

    def tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def image(self, image, artifact_file: str) -> None:
        self.mlflow.log_image(image, artifact_file=artifact_file)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        self.mlflow.log_text(text, artifact_file)

    def run_inputs(self, cfg: Config, tags: dict[str, Any], manifest: str, manifest_sha256: str) -> None:
        """What a new run starts from: tags, the shards manifest (its text and digest, as the job plan
        read them) and quantizer (with a picture of its clusters) and the config, so the run can be
        repeated from MLflow alone."""
        self.tags({**tags, "git_commit": git_commit() or "none", "shards_manifest_sha256": manifest_sha256})
        shards_dir = storage.location(cfg.shards.dir)
        self.metrics({"global_batch": tags["global_batch"]}, step=0)
        self.text(manifest, f"data/{shards.MANIFEST}")
        quantizer = shards_dir / shards.QUANTIZER
        if quantizer.exists():
            text = quantizer.read_text()
            self.text(text, f"data/{shards.QUANTIZER}")
            self.image(viz.quantizer_picture(json.loads(text)), "data/kmeans_clusters.png")
        self.text(dump_yaml(cfg), "config.yaml")

    def evaluation(self, result: dict, step: int) -> None:
        """Val scores at ``step`` and the pictures that explain them: example predictions, confusion."""
        s = result["scores"]
        self.metrics({"val/miou": s["miou"], "val/pixel_acc": s["pixel_acc"], "val/mean_acc": s["mean_acc"],
                      **{f"val_iou/{n}": v for n, v in zip(labels.CLASS_NAMES, s["iou"])}}, step)
        tag = f"step_{step:07d}"
        ex = result["examples"]
        if ex:
            self.image(viz.prediction_grid(ex["images"], ex["labels"], ex["preds"]), f"eval/predictions_{tag}.png")
        self.image(viz.confusion_heatmap(result["confusion"], labels.CLASS_NAMES), f"eval/confusion_{tag}.png")

    def model(self, model, cfg: Config, example_hw: tuple[int, int]) -> str | None:
        """Log and register the serving pyfunc (photos in, masks out); ``example_hw`` sizes its input example."""
        return model_log.log_model(model.eval().cpu(), cfg, example_hw, cfg.mlflow.registered_model or None)

    def close(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


class NullLogger:
    """What ranks other than 0 hold: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def log_to_run(tracking_uri: str, run_id: str, result: dict, split: str, step: int) -> None:
    """Log an evaluation to an existing run (scores, table, confusion heatmap), leaving its status."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    s = result["scores"]
    values = {f"eval/{split}_miou": s["miou"], f"eval/{split}_pixel_acc": s["pixel_acc"],
              **{f"eval_iou/{n}": v for n, v in zip(labels.CLASS_NAMES, s["iou"]) if not np.isnan(v)}}
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
    client.log_text(run_id, format_table(result), f"eval/{split}_table.txt")
    client.log_image(run_id, viz.confusion_heatmap(result["confusion"], labels.CLASS_NAMES),
                     f"eval/{split}_confusion.png")
