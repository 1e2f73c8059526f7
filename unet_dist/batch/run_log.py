"""The MLflow inference run of a batch prediction: what ran on what, counts and throughput.

It never stops the prediction: the first call that fails (store down, no permission) is reported
once on the console and the run goes on without MLflow; the counts are printed either way.
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger(__name__)
EXPERIMENT = "unet-batch-predict"


class InferenceRun:
    def __init__(self, tracking_uri: str, experiment: str, params: dict, tags: dict):
        self.uri, self.run_id, self.client = tracking_uri, None, None
        self._guard("start", lambda: self._start(experiment, params, tags))

    def _start(self, experiment: str, params: dict, tags: dict) -> None:
        from mlflow.tracking import MlflowClient

        from unet_dist import tracking_store
        from unet_dist.tracking import bounded_requests, experiment_id, log_params

        bounded_requests()
        tracking_store.prepare(self.uri)
        client = MlflowClient(self.uri)
        run = client.create_run(experiment_id(client, experiment, self.uri),
                                tags={"unet_dist.kind": "batch_predict", **tags})
        log_params(client, run.info.run_id, params)
        self.client, self.run_id = client, run.info.run_id
        log.info("MLflow inference run %s in experiment %s (%s)", self.run_id, experiment, self.uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._guard("metrics", lambda: self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()]))

    def finish(self, values: dict[str, float], step: int, failures: list[str]) -> None:
        self.metrics(values, step)
        if failures:
            self._guard("failures", lambda: self.client.log_text(self.run_id, json.dumps(failures, indent=1),
                                                                 "failed_inputs.json"))
        self._guard("end", lambda: self.client.set_terminated(self.run_id, "FAILED" if failures else "FINISHED"))

    def _guard(self, what: str, fn) -> None:
        if what != "start" and self.client is None:
            return
        try:
            fn()
        except Exception as e:  # the store is an observer: prediction goes on without it
            log.warning("MLflow %s at %s failed (%s); going on without MLflow", what, self.uri,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.client = None
