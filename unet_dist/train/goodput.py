"""Goodput: where a training job's wall time went, by cause, across every attempt of the job.

Paid GPU hours are judged by goodput: the time spent on steps that made it into the model, over
the wall time. The rest is lost time, and this module says to what:

    productive   forward, backward and optimiser update of the steps the final model keeps
    startup      from the launch (or a restarted attempt's start) to its first step
    data_wait    the loop waiting for the next batch from the loader
    checkpoint   writing and publishing checkpoints
    evaluation   scoring the val split
    restarts     between the last sign of life of an attempt that stopped (a failure, a
                 preemption) and the start of the next one: detection, rescheduling, queueing
    recomputed   work an attempt did after its last checkpoint that a failure threw away
                 (its steps are computed again, and counted as productive only then)
    other        everything else in the loop: log lines, tracking calls, the final model upload

**Wall time** runs from the job's first launch (the Ray driver's or the torchrun agent's start),
carried across restarts and relaunches in each checkpoint's meta.json and in ``goodput.json``
beside the checkpoints, to the moment of the report. A :class:`Clock` charges every instant of an
attempt to exactly one phase, so the buckets add up to the wall time by construction; what joins
two attempts (restarts, recomputed) is computed from the ledgers they left (:func:`before_attempt`).

Rank 0's view is the job's: DDP keeps ranks in lockstep, so a rank that waits on data holds every
rank in the next all-reduce, which rank 0 sees as step time.

Pure accounting: no processes, no I/O but :func:`write_beacon` / :func:`read_beacon`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unet_dist import storage

log = logging.getLogger("unet_dist.goodput")

BUCKETS = ("productive", "startup", "data_wait", "checkpoint", "evaluation", "restarts", "recomputed", "other")
LOST = BUCKETS[1:]
# The buckets of an attempt's work after its last checkpoint that a failure throws away.
RECOMPUTABLE = ("productive", "data_wait", "evaluation")
BEACON = "goodput.json"  # in the run directory, beside the checkpoints
LABELS = {"productive": "productive", "startup": "start-up", "data_wait": "data wait", "checkpoint": "checkpoint",
          "evaluation": "evaluation", "restarts": "restarts", "recomputed": "recomputed", "other": "other"}


def _zeros() -> dict[str, float]:
    return {b: 0.0 for b in BUCKETS}


@dataclass
class Ledger:
    """The job's time so far, by bucket: what a checkpoint and the beacon carry to the next attempt."""

    job_started_at: float  # epoch seconds: the job's first launch
    as_of: float  # epoch seconds: when these totals were taken
    step: int = 0
    attempts: int = 1
    preemptions: int = 0
    failures: int = 0
    ended: str | None = None  # how the attempt that wrote it ended (None: it was still running)
    seconds: dict[str, float] = field(default_factory=_zeros)

    @property
    def wall(self) -> float:
        return self.as_of - self.job_started_at

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Ledger | None":
        """None for a missing or unreadable ledger (an older checkpoint has none)."""
        if not isinstance(data, dict):
            return None
        try:
            seconds = {**_zeros(), **{k: float(v) for k, v in (data.get("seconds") or {}).items() if k in BUCKETS}}
            return cls(job_started_at=float(data["job_started_at"]), as_of=float(data["as_of"]),
                       step=int(data.get("step", 0)), attempts=int(data.get("attempts", 1)),
                       preemptions=int(data.get("preemptions", 0)), failures=int(data.get("failures", 0)),
                       ended=data.get("ended"), seconds=seconds)
        except (KeyError, TypeError, ValueError):
            return None


def before_attempt(kept: Ledger | None, last: Ledger | None, launched_at: float, started_at: float) -> Ledger:
    """The job's ledger at the start of an attempt.

    ``kept``: the ledger in the checkpoint this attempt resumes from (what the model keeps);
    ``last``: the newest ledger any earlier attempt left (the beacon), possibly newer than
    ``kept``; ``launched_at``: when this launch started (the driver, the torchrun agent);
    ``started_at``: when this attempt started. Work done after ``kept`` becomes ``recomputed``,
    the gap between ``last`` and this attempt ``restarts``; nothing is counted twice.
    """
    if kept is not None and (last is None or last.job_started_at != kept.job_started_at or last.as_of <= kept.as_of):
        last = kept
    if last is None:  # the job's first attempt: its start-up began at the launch
        t0 = min(launched_at, started_at)
        return Ledger(job_started_at=t0, as_of=started_at, seconds={**_zeros(), "startup": started_at - t0})
    base = kept if kept is not None and kept.job_started_at == last.job_started_at else \
        Ledger(job_started_at=last.job_started_at, as_of=last.job_started_at)
    seconds = dict(base.seconds)
    for b in BUCKETS:
        delta = max(0.0, last.seconds[b] - base.seconds[b])
        seconds["recomputed" if b in RECOMPUTABLE else b] += delta
    seconds["restarts"] += max(0.0, started_at - last.as_of)
    return Ledger(job_started_at=last.job_started_at, as_of=max(started_at, last.as_of), step=base.step,
                  attempts=last.attempts + 1, preemptions=last.preemptions + (last.ended == "preempted"),
                  failures=last.failures + (last.ended is None), seconds=seconds)


class Clock:
    """One attempt's stopwatch: every instant belongs to exactly one phase (``startup`` until the
    first :meth:`switch`). Two monotonic reads per switch: cheap enough for every micro-batch."""

    def __init__(self, started_at: float, launched_at: float | None = None):
        self._epoch0, self._mono0 = time.time(), time.monotonic()
        self.started_at = started_at
        self.base = before_attempt(None, None, launched_at or started_at, started_at)
        self.own = _zeros()  # this attempt's seconds since max(started_at, base.as_of)
        self.own["startup"] = max(0.0, self.now() - started_at)
        self._phase, self._since = "startup", time.monotonic()

    def now(self) -> float:
        """Epoch seconds from a monotonic clock (no jumps when the system clock is set)."""
        return self._epoch0 + time.monotonic() - self._mono0

    def carry(self, kept: Ledger | None, last: Ledger | None, launched_at: float | None = None) -> Ledger:
        """Join the ledgers earlier attempts left (see :func:`before_attempt`); returns the new base."""
        base = before_attempt(kept, last, launched_at or self.started_at, self.started_at)
        # The time between this attempt's start and base.as_of (a beacon from a clock ahead of ours)
        # is already in the base: take it off this attempt's start-up, never below zero.
        overlap = max(0.0, base.as_of - self.started_at)
        self.own["startup"] = max(0.0, self.own["startup"] - overlap)
        self.base = base
        return base

    @property
    def phase(self) -> str:
        return self._phase

    def switch(self, phase: str) -> str:
        """Charge the time since the last switch to the current phase and enter ``phase``; returns
        the phase left, so a caller can go back to it."""
        now = time.monotonic()
        self.own[self._phase] += now - self._since
        previous, self._phase, self._since = self._phase, phase, now
        return previous

    @contextlib.contextmanager
    def timed(self, phase: str):
        """``with clock.timed("evaluation"): ...``: the block's time goes to ``phase``."""
        previous = self.switch(phase)
        try:
            yield
        finally:
            self.switch(previous)

    def totals(self) -> dict[str, float]:
        """This attempt's seconds per phase so far, the current phase included."""
        out = dict(self.own)
        out[self._phase] += time.monotonic() - self._since
        return out

    def snapshot(self, step: int, ended: str | None = None) -> Ledger:
        """The job's ledger now: the carried base plus this attempt."""
        own = self.totals()
        b = self.base
        # = now, unless a beacon from a clock ahead of this node's put the base in the future
        as_of = b.as_of + sum(own.values())
        return Ledger(job_started_at=b.job_started_at, as_of=as_of, step=step, attempts=b.attempts,
                      preemptions=b.preemptions, failures=b.failures, ended=ended,
                      seconds={k: b.seconds[k] + own[k] for k in BUCKETS})


def process_start(parent: bool = False) -> float:
    """When this process (or its parent: torchrun's agent for a rank) started, in epoch seconds.

    On Linux from the process's start in clock ticks since boot and the boot clock: psutil's
    ``create_time`` adds the boot time, which /proc/stat gives in whole seconds, so it can be up to
    1 s early, and a fast restart would then look like no restart at all."""
    import psutil

    me = psutil.Process()
    proc = (me.parent() or me) if parent else me
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, IndexError, ValueError, AttributeError):  # not Linux
        return proc.create_time()


# ------------------------------------------------------------------------------------------ reports
def fractions(ledger: Ledger) -> dict[str, float]:
    wall = max(ledger.wall, 1e-9)
    return {b: ledger.seconds[b] / wall for b in BUCKETS}


def lines(ledger: Ledger, when: str) -> list[str]:
    """The report a person reads: wall time, goodput, and each bucket's seconds and share."""
    share = fractions(ledger)
    head = (f"goodput {when} at step {ledger.step}: {share['productive']:.1%} of {ledger.wall:.1f} s wall time, "
            f"attempt {ledger.attempts} ({ledger.preemptions} preempted, {ledger.failures} failed before)")
    return [head] + [f"  {LABELS[b]:<11} {ledger.seconds[b]:9.1f} s {share[b]:7.1%}" for b in BUCKETS]


def metrics(ledger: Ledger) -> dict[str, float]:
    """The MLflow metrics of a report (seconds and fractions, one name per quantity)."""
    share = fractions(ledger)
    out = {"goodput/wall_s": ledger.wall, "goodput/fraction": share["productive"],
           "goodput/attempts": float(ledger.attempts), "goodput/preemptions": float(ledger.preemptions),
           "goodput/failures": float(ledger.failures)}
    for b in BUCKETS:
        out[f"goodput/{b}_s"] = ledger.seconds[b]
        out[f"goodput/{b}_fraction"] = share[b]
    return out


# ------------------------------------------------------------------------------------------- beacon
def beacon_path(run_dir: str | Path) -> storage.Location:
    return storage.location(run_dir) / BEACON


def write_beacon(run_dir: str | Path, ledger: Ledger) -> None:
    """The newest ledger beside the checkpoints: a failed attempt's last sign of life."""
    beacon_path(run_dir).write_bytes(json.dumps(ledger.to_dict(), indent=1, sort_keys=True).encode())


def read_beacon(run_dir: str | Path | None) -> Ledger | None:
    if run_dir is None:
        return None
    try:
        return Ledger.from_dict(json.loads(beacon_path(run_dir).read_text()))
    except Exception as e:  # noqa: BLE001 - no beacon (or a torn one) is an answer, not an error
        log.debug("no goodput beacon in %s: %s", run_dir, e)
        return None
