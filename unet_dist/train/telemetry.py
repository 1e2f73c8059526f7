"""Prometheus metrics of the training job, for the people who watch the cluster rather than MLflow.

Rank 0 exports the job's series, labelled ``run`` (train.run_name), ``launcher``, ``rank`` and
``node``: under Ray through ``ray.util.metrics`` (Ray's metrics agent serves them on each node's
metrics export port, named with Ray's ``ray_`` prefix), under torchrun through ``prometheus_client``
on ``prometheus.port``. Only rank 0: the ranks step in lockstep, so its step, throughput and step
time are the job's (a straggler shows as step time on every rank), and the number of series stays
the same on 2 GPUs or 64.

Setting a value never waits: both libraries keep values in memory, and the HTTP server (or Ray's
agent) reads them on its own thread when Prometheus scrapes. The loop calls :meth:`Exporter.set`
at log steps and at the end of a checkpoint or an evaluation, never per micro-batch.
"""
from __future__ import annotations

import logging
import socket
import time

log = logging.getLogger("unet_dist.telemetry")

# name -> help text; the Ray names carry Ray's prefix: ray_unet_train_step, ...
SERIES = {
    "unet_train_step": "the last optimiser step taken",
    "unet_train_steps_total": "the optimiser steps the run is configured for",
    "unet_train_images_per_second": "training images per second (global batch), over the last log window",
    "unet_train_step_seconds": "seconds per step (data wait + compute), mean over the last log window",
    "unet_train_data_wait_fraction": "share of step time spent waiting for the next batch, last log window",
    "unet_checkpoint_write_seconds": "seconds the last checkpoint held the training loop (the write itself may run in the background)",
    "unet_evaluation_seconds": "seconds the last evaluation took",
    "unet_job_restarts": "attempts of this job so far, less one (failures and preemptions)",
    "unet_job_preemptions": "attempts of this job that ended preempted (a checkpoint, then a stop)",
    "unet_goodput_fraction": "productive step time over wall time since the job's first launch",
    "unet_tracking_spool_depth": "tracking records waiting to reach MLflow (0 when nothing is spooled)",
}
LABELS = ("run", "launcher", "rank", "node")


class Exporter:
    """What the loop talks to; this base exports nothing (ranks other than 0, metrics off)."""

    def set(self, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class PrometheusExporter(Exporter):
    """``prometheus_client`` gauges in a registry of their own, served by a daemon thread."""

    def __init__(self, port: int, host: str, labels: dict[str, str], linger_s: float = 0.0):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)
                       for name, doc in SERIES.items()}
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.linger_s = linger_s
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def set(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.gauges[name].set(value)

    def close(self) -> None:
        time.sleep(self.linger_s)  # a last scrape sees the final values
        self.server.shutdown()
        self.server.server_close()


class RayExporter(Exporter):
    """``ray.util.metrics`` gauges: the node's Ray metrics agent exports them."""

    def __init__(self, labels: dict[str, str], linger_s: float = 0.0):
        from ray.util.metrics import Gauge

        self.gauges = {name: Gauge(name, description=doc, tag_keys=LABELS) for name, doc in SERIES.items()}
        for gauge in self.gauges.values():
            gauge.set_default_tags(labels)
        self.linger_s = linger_s

    def set(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.gauges[name].set(float(value))

    def close(self) -> None:
        time.sleep(self.linger_s)


_current: list[Exporter] = [Exporter()]


def current() -> Exporter:
    """The exporter of this process: the tracking writer reports its spool depth here with
    ``telemetry.current().set({"unet_tracking_spool_depth": n})``."""
    return _current[0]


def start(launcher: str, rank: int, run_name: str, port: int, host: str = "0.0.0.0",
          linger_s: float = 0.0) -> Exporter:
    """The exporter for this rank: Ray's under Ray, prometheus_client under torchrun (``port`` 0:
    none), nothing on ranks other than 0. A port already taken costs the metrics, never the run."""
    exporter: Exporter = Exporter()
    if rank == 0:
        labels = {"run": run_name, "launcher": launcher, "rank": "0", "node": socket.gethostname()}
        try:
            if launcher == "ray":
                exporter = RayExporter(labels, linger_s)
            elif port:
                exporter = PrometheusExporter(port, host, labels, linger_s)
        except Exception as e:  # noqa: BLE001 - metrics are for watching a run, not a reason to stop it
            log.warning("no Prometheus metrics from this run: %s", e)
    _current[0] = exporter
    return exporter


class Window:
    """Step time and data-wait share between two log steps, from a goodput clock's phase totals."""

    def __init__(self, totals: dict[str, float], step: int):
        self.totals, self.step = totals, step

    def advance(self, totals: dict[str, float], step: int) -> dict[str, float]:
        steps = max(1, step - self.step)
        wait = totals["data_wait"] - self.totals["data_wait"]
        busy = wait + totals["productive"] - self.totals["productive"]
        self.totals, self.step = totals, step
        return {"unet_train_step_seconds": busy / steps,
                "unet_train_data_wait_fraction": wait / busy if busy > 0 else 0.0}
