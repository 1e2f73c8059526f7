"""MLflow: one run per training job, created once, logged to by rank 0 only.

The run id is created by whoever starts the job (the Ray driver, or torchrun's rank 0), written into
every checkpoint, and read back on resume, so a restarted or relaunched job continues the same run.
Steps already in the run's history are not logged again after a resume. The tracking URI comes pinned
in the config by the job plan (``unet_dist.train.plan.locate``); a training job resolves it nowhere else.

Training's MLflow calls all live here: the server check, the run (:func:`start_run`,
:func:`mark_failed`) and :class:`RunLogger`, which the loop logs through and which never waits on the
server (:mod:`.writer`, :mod:`.spool`, :mod:`.records`; ``python -m unet_dist.tracking sync``
delivers what a job left spooled: :mod:`.sync`). MLflow is also
called by :mod:`unet_dist.serving` (the model format: logging the pyfunc, loading ``runs:/`` and
``models:/``) and by :mod:`unet_dist.tune` (a sweep's parent run, its results table and pictures,
registering the best trial's model).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from unet_dist import labels, storage, tracking_store, viz
from unet_dist.config import Config, dump_yaml, flatten
from unet_dist.data import shards
from unet_dist.errors import UnetDistError
from unet_dist.scoring import format_table

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


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``, created when missing (a sqlite store's
    artifacts beside its database file)."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name, artifact_location=_artifact_location(uri))


def log_params(client, run_id: str, params: dict) -> None:
    """Every param in one request, each value cut to MLflow's 6000-character limit."""
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


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
    run = client.create_run(experiment_id(client, cfg.mlflow.experiment, uri),
                            run_name=cfg.mlflow.run_name or cfg.train.run_name, tags=tags)
    log_params(client, run.info.run_id,
               {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(cfg).items()})
    log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, cfg.mlflow.experiment, uri)
    return run.info.run_id


def mark_failed(tracking_uri: str, run_id: str | None) -> None:
    """A job that ends in an error leaves its MLflow run FAILED, not RUNNING for ever."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    bounded_requests()  # a server that is down costs the failing job 30 s, not 4 minutes
    try:
        MlflowClient(tracking_uri).set_terminated(run_id, "FAILED")
    except Exception:  # the tracking server is unreachable: the job's own error matters more
        log.warning("could not mark MLflow run %s FAILED", run_id)


def bounded_requests() -> None:
    """MLflow's client retries a call that gets no answer for about 4 minutes (7 retries, 120 s
    timeouts). A training process sends through :class:`~unet_dist.tracking.writer.Writer`, which waits
    out an outage itself, so each call here gets one try of at most 30 s. Values set in the
    environment are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class RunLogger:
    """Rank 0's handle on the job's MLflow run. Other ranks get :class:`NullLogger`.

    Its public methods (``metrics``, ``tags``, ``image``, ``artifact``, ``text``, ``run_inputs``,
    ``evaluation``, ``model``, ``persist``, ``close``) are all the loop calls, and none of them
    waits on an absent server: each hands a record to the writer thread
    (:mod:`unet_dist.tracking.writer`), which delivers them in order and spools them under
    ``spool_dir`` while the server is away. ``persist`` (at a checkpoint) waits for delivery while
    the server answers, or spools; ``close`` waits for at most ``mlflow.flush_timeout_s``."""

    def __init__(self, cfg: Config, run_id: str, resumed: bool, spool_dir: str,
                 on_depth: Callable[[int], None] | None = None):
        from unet_dist.tracking.spool import FOLDER
        from unet_dist.tracking.writer import Writer

        bounded_requests()
        uri = pinned_uri(cfg)
        self.run_id = run_id
        self._cfg = cfg
        self._writer = Writer(uri, run_id, storage.location(spool_dir) / FOLDER, resumed=resumed, on_depth=on_depth)
        self._step = 0
        self._sampler = SystemSampler(self, cfg.mlflow.system_metrics_interval) if cfg.mlflow.system_metrics else None

    def metrics(self, values: dict[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in values.items() if np.isfinite(v)}
        if fresh:
            self._writer.put("metrics", step=step, ts=int(time.time() * 1000), values=fresh)
        self._step = max(self._step, step)

    def tags(self, tags: dict[str, Any]) -> None:
        self._writer.put("tags", tags={k: str(v) for k, v in tags.items()})

    def image(self, image, artifact_file: str) -> None:
        """A picture (PIL image), or a function that draws one: drawn and encoded by the writer."""
        self._writer.put("file", path=artifact_file, render=image if callable(image) else lambda: image)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        data = base64.b64encode(Path(path).read_bytes()).decode()  # read now: the file may be temporary
        self._writer.put("file", path="/".join(p for p in (artifact_path, Path(path).name) if p), b64=data)

    def text(self, text: str, artifact_file: str) -> None:
        self._writer.put("file", path=artifact_file, text=text)

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
            self.image(lambda: viz.quantizer_picture(json.loads(text)), "data/kmeans_clusters.png")
        self.text(dump_yaml(cfg), "config.yaml")

    def evaluation(self, result: dict, step: int) -> None:
        """Val scores at ``step`` and the pictures that explain them (example predictions, confusion),
        drawn by the writer."""
        s = result["scores"]
        self.metrics({"val/miou": s["miou"], "val/pixel_acc": s["pixel_acc"], "val/mean_acc": s["mean_acc"],
                      **{f"val_iou/{n}": v for n, v in zip(labels.CLASS_NAMES, s["iou"])}}, step)
        tag = f"step_{step:07d}"
        ex, confusion = result["examples"], result["confusion"]
        if ex:
            self.image(lambda: viz.prediction_grid(ex["images"], ex["labels"], ex["preds"]), f"eval/predictions_{tag}.png")
        self.image(lambda: viz.confusion_heatmap(confusion, labels.CLASS_NAMES), f"eval/confusion_{tag}.png")

    def model(self, model, cfg: Config, example_hw: tuple[int, int], checkpoint: str | None = None) -> None:
        """Log and register the serving pyfunc (photos in, masks out) when the writer reaches it;
        ``example_hw`` sizes its input example, ``checkpoint`` holds the same weights for a replay
        from the spool. Its URI is in :meth:`close`'s result."""
        from unet_dist.tracking.records import LIVE

        self._writer.put("model", checkpoint=checkpoint, example_hw=list(example_hw),
                         registered=cfg.mlflow.registered_model or None, **{LIVE: (model.eval().cpu(), cfg)})

    def persist(self) -> None:
        """Every record so far delivered or spooled (the loop calls it before a checkpoint is
        published: what a checkpoint covers is never lost with the process)."""
        self._writer.persist()

    def close(self, status: str = "FINISHED"):
        """The final status, after every record before it; waits at most ``mlflow.flush_timeout_s``
        and returns :class:`~unet_dist.tracking.writer.Closed` (undelivered records stay spooled)."""
        if self._sampler is not None:
            self._sampler.stop()
        return self._writer.close(status, self._cfg.mlflow.flush_timeout_s)


class SystemSampler:
    """CPU, memory, disk, network (and GPU) samples every ``interval`` s, through the same writer, so
    an outage loses none either. The samples come from MLflow's own collectors; each is logged at
    the training step it was taken at (``system/...`` keys)."""

    def __init__(self, logger: RunLogger, interval: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(logger.run_id, sampling_interval=interval, tracking_uri="")
        self._logger, self._interval = logger, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unet-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._monitor.collect_metrics()
                values = self._monitor.aggregate_metrics()
                for collector in self._monitor.monitors:
                    collector.clear_metrics()
            except Exception as e:  # noqa: BLE001 - a sensor that fails ends the sampling, never the run
                log.warning("system metrics: sampling stopped: %s", e)
                return
            self._logger.metrics({f"system/{k}": v for k, v in values.items()}, self._logger._step)

    def stop(self) -> None:
        self._stop.set()


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
