"""The one writer between the training loop and MLflow: the loop's calls only enqueue a record; a
thread delivers them in order. While the server does not answer (refused, hung, 5xx), the records go
to the spool (:mod:`unet_dist.tracking.spool`) and delivery is retried with a growing pause; when it
answers again they are sent in order and the spool is emptied. Closing waits at most
``mlflow.flush_timeout_s``; what is still undelivered then stays in the spool for the next resume or
``python -m unet_dist.tracking sync RUN_DIR``. The run's final status is the last record, so a run is
never FINISHED while records before it wait.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from unet_dist import storage
from unet_dist.tracking import records, spool
from unet_dist.tracking.records import Delivery

log = logging.getLogger("unet_dist.tracking")

BATCH_S = 1.0  # records sent together at most this often: one request a second, not one a step
PERSIST_S = 10.0  # at a checkpoint, the longest wait for delivery before the rest is spooled
MAX_PAUSE_S = 30.0  # the longest wait between two attempts while the server is away
SPOOL_TAG = "unet_dist.tracking_spool"


@dataclass(frozen=True)
class Closed:
    """How the writer ended: ``pending`` records left in ``spool`` (0: all delivered)."""
    pending: int
    spool: str
    model_uri: str | None


class Writer:
    def __init__(self, uri: str, run_id: str, spool_dir: storage.Location, *, resumed: bool,
                 on_depth: Callable[[int], None] | None = None):
        self.spool_dir = spool_dir
        self._uri, self._run_id = uri, run_id
        _, earlier = spool.read(spool_dir)
        # An earlier attempt's undelivered records go first; its final status does not: this attempt
        # ends the run itself.
        self._pending: deque[dict] = deque(r for r in earlier if r["kind"] != "end")
        self._spooled = max((r["seq"] for r in earlier), default=-1)  # every seq up to here is in the spool
        self._seq = itertools.count(self._spooled + 1)
        self._spool_left = bool(earlier)  # segments remain that delivered records may empty
        self._delivery = Delivery(uri, run_id, check_history=resumed or bool(earlier))
        self._report_depth = on_depth or (lambda n: None)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._numbering = threading.Lock()
        self._closing = threading.Event()
        self._wake = threading.Event()  # send now: a checkpoint or the close asks
        self._last_seq = self._taken = self._spooled  # the newest record numbered, and taken off the queue
        self._halted = threading.Event()  # set with _stopped
        self._stopped = False  # set by close() when its wait ran out: the thread leaves everything as is
        self._down_since: float | None = None
        if self._pending:
            log.info("tracking: %d records spooled by an earlier attempt go first", len(self._pending))
        self._thread = threading.Thread(target=self._run, name="unet-tracking-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the training thread's side
    def put(self, kind: str, **fields) -> None:
        """Enqueue a record; never waits on the server. The numbering lock keeps the queue in ``seq``
        order when two threads log (the loop and the system-metrics sampler)."""
        with self._numbering:
            self._last_seq = next(self._seq)
            self._queue.put({"seq": self._last_seq, "kind": kind, **fields})

    def persist(self, timeout_s: float = PERSIST_S) -> None:
        """Return once every record logged so far is delivered or in the spool: a checkpoint calls
        this before it is published, so a crash after it (a killed worker, a stopped trial) loses
        none of the records before it. While the server is known to be away it spools at once;
        otherwise it waits up to ``timeout_s`` for delivery, then spools the rest."""
        target = self._last_seq
        deadline = time.monotonic() + (0.0 if self._down_since is not None else timeout_s)
        while True:
            with self._lock:
                if self._taken >= target and (not self._pending or self._pending[0]["seq"] > target
                                              or target <= self._spooled):
                    return
                if time.monotonic() >= deadline:
                    self._take_all()
                    self._spool_new()
                    return
            self._wake.set()
            time.sleep(0.005)

    def close(self, status: str, timeout_s: float) -> Closed:
        """The final status as the last record, then wait up to ``timeout_s`` for delivery; the
        rest is spooled."""
        self.put("end", status=status)
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)
        with self._lock:
            self._stopped = True
            self._halted.set()
            self._take_all()
            left = len(self._pending)
            if left:
                self._spool_new()
        closed = Closed(left, str(self.spool_dir), self._delivery.model_uri)
        if left:
            log.warning("tracking: %d records could not reach %s within %.0f s; they are in %s: they are "
                        "delivered on the next resume, or by python -m unet_dist.tracking sync %s",
                        left, self._uri, timeout_s, self.spool_dir, self.spool_dir.parent)
            if self._down_since is None:  # the server answers but was too slow: say so on the run
                self._tag_pending(left)
        return closed

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        pause = 0.0
        while True:
            if self._down_since is None:
                self._wake.wait(BATCH_S)  # records gather into one request; a checkpoint or close sends at once
                if not self._closing.is_set():
                    self._wake.clear()
            else:
                self._halted.wait(pause)  # the server is away: wait, even while closing
            if self._stopped:
                return
            with self._lock:
                self._take_all()
            if self._pending:
                pause = self._deliver(pause)
            elif self._closing.is_set():
                return

    def _take_all(self) -> None:
        while True:
            try:
                rec = self._queue.get_nowait()
            except queue.Empty:
                return
            self._pending.append(records.prepare(rec))
            self._taken = rec["seq"]

    def _deliver(self, pause: float) -> float:
        """Send what is pending, in order; the pause before the next attempt."""
        try:
            while self._pending and not self._stopped:
                n = self._delivery.send(self._pending)
                with self._lock:
                    if self._stopped:
                        return 0.0
                    done = [self._pending.popleft() for _ in range(n)][-1]["seq"]
                    if self._spool_left:
                        spool.drop_through(self.spool_dir, done)
                        self._spool_left = done < self._spooled
                    self._on_depth(len(self._pending))
            if self._down_since is not None:
                log.warning("tracking: %s answers again after %.0f s; the spooled records are delivered",
                            self._uri, time.monotonic() - self._down_since)
                self._down_since = None
            return 0.0
        except Exception as e:  # noqa: BLE001 - the MLflow client raises many kinds; each is sorted below
            if not records.is_transient(e):
                with self._lock:
                    rec = self._pending.popleft()
                log.error("tracking: %s refused a %s record (seq %d) for run %s and it is dropped: %s",
                          self._uri, rec["kind"], rec["seq"], self._run_id, e)
                return 0.0
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("tracking: %s does not answer (%s); training goes on and the records wait in %s",
                            self._uri, str(e).splitlines()[0][:200], self.spool_dir)
            with self._lock:
                if not self._stopped:
                    self._spool_new()
                self._on_depth(len(self._pending))
            return min(max(2 * pause, 1.0), MAX_PAUSE_S)

    def _on_depth(self, n: int) -> None:
        try:
            self._report_depth(n)
        except Exception as e:  # noqa: BLE001 - a metrics exporter's fault must never drop a record
            log.warning("tracking: the spool depth was not exported: %s", e)

    def _spool_new(self) -> None:
        """Write the pending records that are not in the spool yet (caller holds the lock)."""
        new = [records.spooled(r) for r in self._pending if r["seq"] > self._spooled]
        if not new:
            return
        try:
            spool.write(self.spool_dir, new, self._run_id, self._uri)
        except Exception as e:  # noqa: BLE001 - the records stay in memory and are spooled next time
            log.error("tracking: could not write the spool %s: %s", self.spool_dir, e)
            return
        self._spooled, self._spool_left = new[-1]["seq"], True

    def _tag_pending(self, left: int) -> None:
        """Best effort, a few seconds at most: the run says its records wait in the spool."""
        note = f"{left} records in {self.spool_dir}: python -m unet_dist.tracking sync {self.spool_dir.parent}"

        def tag():
            try:
                self._delivery.client.set_tag(self._run_id, SPOOL_TAG, note)
            except Exception as e:  # noqa: BLE001 - the warning above already says where the records are
                log.warning("tracking: could not tag run %s: %s", self._run_id, e)

        tagger = threading.Thread(target=tag, daemon=True)
        tagger.start()
        tagger.join(5.0)
