"""What the loop tells the outside world about its time: the goodput clock, the Prometheus
series and the goodput beacon, behind one object the loop calls at a few named points.

The loop's hooks (each one line, see unet_dist/train/loop.py, "observer"):

    train       Observer(cfg, ctx, run_dir)            the attempt's clock starts (at ctx.started_at)
    restore     observer.resumed_from(meta)            the ledger the checkpoint carries
    run_steps   observer.steps_begin(tracker, step)    resume report; steps begin (productive)
                observer.steps_end()                   after the last step: "other"
    a batch     with observer.timed("data_wait"):      the wait for the next batch
    eval, save  with observer.timed("evaluation"|"checkpoint"):
    meta.json   observer.ledger(step)                  the ledger a checkpoint carries
    log step    observer.logged(step, images_per_s)    Prometheus; the beacon, in the background
    finish      observer.end(tracker, step, status)    the end report (printed, MLflow), last beacon

Only rank 0 reports and writes; other ranks keep a clock (cheap) and export nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading

from unet_dist.config import Config
from unet_dist.train import goodput, telemetry

log = logging.getLogger("unet_dist.train")


class BeaconWriter:
    """Writes the newest ledger to the run directory on a thread of its own (latest wins), so a
    slow or remote store never holds a step."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._pending: goodput.Ledger | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="goodput-beacon", daemon=True)
        self._thread.start()

    def submit(self, ledger: goodput.Ledger) -> None:
        with self._wake:
            self._pending = ledger
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                ledger, self._pending = self._pending, None
                if ledger is None:
                    return
            self._write(ledger)

    def _write(self, ledger: goodput.Ledger) -> None:
        try:
            goodput.write_beacon(self.run_dir, ledger)
        except Exception as e:  # noqa: BLE001 - a lost beacon costs accuracy, never the run
            log.warning("goodput beacon not written to %s: %s", self.run_dir, e)

    def close(self, last: goodput.Ledger) -> None:
        """Stop the thread, then write ``last`` (the end of an attempt: off the step path)."""
        with self._wake:
            self._closed, self._pending = True, None
            self._wake.notify()
        self._thread.join(timeout=30)
        self._write(last)


class Observer:
    """One rank's clock; on rank 0 also the exporter, the beacon and the reports."""

    def __init__(self, cfg: Config, ctx, run_dir):
        self.cfg, self.rank = cfg, ctx.rank
        self.clock = goodput.Clock(ctx.started_at, ctx.launched_at)
        self._launched_at = ctx.launched_at
        self._kept: goodput.Ledger | None = None
        self.run_dir = run_dir
        self.exporter = telemetry.start(ctx.launcher, ctx.rank, cfg.train.run_name, cfg.prometheus.port,
                                        cfg.prometheus.host, cfg.prometheus.linger_s)
        self.beacon = BeaconWriter(run_dir) if ctx.rank == 0 and run_dir else None
        self.window: telemetry.Window | None = None
        self.resumed = False

    def resumed_from(self, meta: dict) -> None:
        """The resumed checkpoint's meta.json: the ledger it carries (none in older checkpoints)."""
        self.resumed = True
        self._kept = goodput.Ledger.from_dict(meta.get("goodput"))

    def steps_begin(self, tracker, step: int) -> None:
        """Join earlier attempts' ledgers, report them at a resume, and start the step clock."""
        if self.rank == 0:
            last = goodput.read_beacon(self.run_dir)
            if not self.resumed and last is not None and last.ended is not None:
                last = None  # a run that ended left a checkpoint: this beacon is another job's
            if self.resumed or last is not None:
                self.clock.carry(self._kept, last, self._launched_at)
            if self.resumed:
                self._report(tracker, self.clock.snapshot(step), "at resume", metrics=False)
            base = self.clock.base
            self.exporter.set({"unet_train_step": step, "unet_train_steps_total": self.cfg.train.steps,
                               "unet_job_restarts": base.attempts - 1, "unet_job_preemptions": base.preemptions,
                               "unet_tracking_spool_depth": 0})
        self.clock.switch("productive")
        self.window = telemetry.Window(self.clock.totals(), step)

    def steps_end(self) -> None:
        self.clock.switch("other")

    def timed(self, phase: str):
        """``with observer.timed(phase):`` the block's time goes to ``phase``; a checkpoint's or an
        evaluation's duration also becomes its Prometheus series."""
        if phase in self.EXPORTED:
            return self._timed_and_exported(phase)
        return self.clock.timed(phase)  # per micro-batch: nothing more than the clock

    EXPORTED = {"checkpoint": "unet_checkpoint_write_seconds", "evaluation": "unet_evaluation_seconds"}

    @contextlib.contextmanager
    def _timed_and_exported(self, phase: str):
        start = self.clock.totals()[phase]
        with self.clock.timed(phase):
            yield
        self.exporter.set({self.EXPORTED[phase]: self.clock.totals()[phase] - start})

    def ledger(self, step: int) -> dict:
        """The ledger a checkpoint's meta.json carries (plain values)."""
        return self.clock.snapshot(step).to_dict()

    def logged(self, step: int, images_per_s: float) -> None:
        """At a log step: the Prometheus series, and the beacon handed to its thread."""
        if self.rank != 0:
            return
        snap = self.clock.snapshot(step)
        self.exporter.set({"unet_train_step": step, "unet_train_images_per_second": images_per_s,
                           "unet_goodput_fraction": goodput.fractions(snap)["productive"],
                           **self.window.advance(self.clock.totals(), step)})
        if self.beacon:
            self.beacon.submit(snap)

    def end(self, tracker, step: int, status: str) -> dict:
        """Rank 0, after the last step: the end report, printed, logged to MLflow (before the run
        is closed) and left in the beacon; returns it for the run summary."""
        self.clock.switch("other")
        snap = self.clock.snapshot(step, ended=status)
        self.exporter.set({"unet_goodput_fraction": goodput.fractions(snap)["productive"]})
        self._report(tracker, snap, f"at the end ({status})", metrics=True)
        if self.beacon:
            self.beacon.close(snap)
        self.exporter.close()
        return {"wall_s": round(snap.wall, 2), "fraction": round(goodput.fractions(snap)["productive"], 4),
                "seconds": {k: round(v, 2) for k, v in snap.seconds.items()}, "attempts": snap.attempts,
                "preemptions": snap.preemptions, "failures": snap.failures}

    def _report(self, tracker, snap: goodput.Ledger, when: str, metrics: bool) -> None:
        for line in goodput.lines(snap, when):
            log.info("%s", line)
        name = "end" if metrics else "resume"
        tracker.text(json.dumps(snap.to_dict(), indent=1, sort_keys=True),
                     f"goodput/step_{snap.step:07d}_attempt_{snap.attempts}_{name}.json")
        if metrics:
            tracker.metrics(goodput.metrics(snap), snap.step)
