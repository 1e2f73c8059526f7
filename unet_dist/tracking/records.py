"""What the training loop logs, as plain records, and how each reaches the MLflow server.

Records are dicts with ``seq`` and ``kind``:

- ``metrics``: ``step``, ``ts`` (ms, when logged), ``values``;
- ``tags``: ``tags``;
- ``file``: an artifact ``path`` with ``text`` or base64 ``b64`` bytes (pictures arrive as a
  ``render`` function and are drawn and encoded by the writer, off the training thread);
- ``model``: the final model, live in memory while the job runs, and the ``checkpoint`` it is read
  back from when the record is replayed from the spool;
- ``end``: the run's final ``status``.

Delivering is idempotent, so a replay after a crash does no harm: a metric is sent only for a step
after the last one the run holds for its key (the resume de-duplication), the server ignores an
identical metric row sent twice, artifacts and tags overwrite themselves, and a model is logged once
(the run's ``unet_dist.model_uri`` tag says it was).
"""
from __future__ import annotations

import base64
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("unet_dist.tracking")

LIVE = "_live"  # a record's in-memory payload: never spooled
MODEL_TAG = "unet_dist.model_uri"
BATCH = 1000  # most metrics in one log_batch (the REST API's limit)


def prepare(rec: dict) -> dict:
    """A queued record made ready to send (by the writer, off the training thread): a picture drawn
    and encoded as PNG."""
    if "render" in rec:
        image = rec.pop("render")()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rec["b64"] = base64.b64encode(buf.getvalue()).decode()
    return rec


def spooled(rec: dict) -> dict:
    """The record as the spool keeps it: plain JSON, the live payload left out."""
    return {k: v for k, v in rec.items() if k != LIVE}


def is_transient(error: BaseException) -> bool:
    """An outage (no answer, a timeout, a 5xx, 408/429) is waited out; a 4xx refusal is not."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        code = error.get_http_status_code()
        return not 400 <= code < 500 or code in (408, 429)
    return isinstance(error, OSError) or type(error).__module__.startswith(("requests", "urllib3"))


@dataclass
class Delivery:
    """Sends records to one run. ``check_history``: the run may already hold some steps (a resume,
    a replayed spool), so each metric key's last step is read once before its first send."""
    uri: str
    run_id: str
    check_history: bool
    last_step: dict[str, int] = field(default_factory=dict)
    model_uri: str | None = None
    _client: object = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def send(self, pending: list[dict]) -> int:
        """Deliver the first record of ``pending`` (and the metrics records right after it, in one
        batch); how many records were consumed. Raises what the client raises."""
        rec = pending[0]
        if rec["kind"] == "metrics":
            run = list(_leading_metrics(pending))
            self._metrics(run)
            return len(run)
        {"tags": self._tags, "file": self._file, "model": self._model, "end": self._end}[rec["kind"]](rec)
        return 1

    def _last(self, key: str) -> int:
        if key not in self.last_step:
            history = self.client.get_metric_history(self.run_id, key) if self.check_history else []
            self.last_step[key] = max((m.step for m in history), default=-1)
        return self.last_step[key]

    def _metrics(self, run: list[dict]) -> None:
        """Each key's steps after the last one the run holds, in order; ``last_step`` moves with each
        request that succeeds, so a retry after a partial failure sends only the rest."""
        from mlflow.entities import Metric

        fresh, newest = [], {}
        for r in run:
            for k, v in r["values"].items():
                if r["step"] > newest.get(k, self._last(k)):
                    fresh.append(Metric(k, v, r["ts"], r["step"]))
                    newest[k] = r["step"]
        for start in range(0, len(fresh), BATCH):
            chunk = fresh[start:start + BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)
            for m in chunk:
                self.last_step[m.key] = m.step

    def _tags(self, rec: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])

    def _file(self, rec: dict) -> None:
        if "text" in rec:
            self.client.log_text(self.run_id, rec["text"], rec["path"])
            return
        folder, _, name = rec["path"].rpartition("/")
        with tempfile.TemporaryDirectory(prefix="unet-track-") as tmp:
            local = Path(tmp) / name
            local.write_bytes(base64.b64decode(rec["b64"]))
            self.client.log_artifact(self.run_id, str(local), artifact_path=folder or None)

    def _model(self, rec: dict) -> None:
        import mlflow

        from unet_dist.serving import loading, model_log

        logged = self.client.get_run(self.run_id).data.tags.get(MODEL_TAG)
        if logged:  # a replay of a model already logged
            self.model_uri = logged
            return
        if rec.get(LIVE) is not None:
            model, cfg = rec[LIVE]
        elif rec.get("checkpoint"):
            model, cfg = loading.load_model(rec["checkpoint"])
        else:
            log.error("tracking: the final model of run %s was not logged: it was spooled with no "
                      "checkpoint to read it back from", self.run_id)
            return
        mlflow.set_tracking_uri(self.uri)
        if mlflow.active_run() is None:  # the fluent API log_model uses, in this thread only
            mlflow.start_run(run_id=self.run_id)
        uri = model_log.log_model(model, cfg, tuple(rec["example_hw"]), rec.get("registered") or None)
        self.client.set_tag(self.run_id, MODEL_TAG, uri)
        self.model_uri = uri

    def _end(self, rec: dict) -> None:
        self.client.set_terminated(self.run_id, rec["status"])


def _leading_metrics(pending: list[dict]):
    n = 0
    for rec in pending:
        if rec["kind"] != "metrics" or n >= BATCH:
            return
        n += len(rec["values"])
        yield rec
