"""Preemption: a SIGTERM becomes a checkpoint and a clean stop, not lost work.

Spot reclaims and pod evictions send SIGTERM, then SIGKILL after a grace period. The handler only
sets a flag. At each step boundary the loop calls :func:`agreed`, one tiny all-reduce (MAX) of the
flag, so every rank stops after the same step even when only one of them was signalled. Rank 0
then writes a checkpoint through the normal publish path, the MLflow run is marked KILLED and
tagged ``preempted``, and the process ends with :data:`EXIT_CODE`.

A second SIGTERM restores the default action and ends the process at once: a checkpoint being
written is abandoned, never half-published (publishing is atomic, see checkpoint.py).

Other sources of the same request (the Ray driver's flag, a Ray node drain) are registered with
:func:`add_source` and polled at most every :data:`POLL_S` seconds.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

STATUS = "preempted"
# EX_TEMPFAIL from sysexits.h: "temporary failure, try again". Distinct from 143 (killed by SIGTERM
# without a checkpoint) and 137 (SIGKILL), so Kubernetes' podFailurePolicy can tell them apart.
EXIT_CODE = 75
POLL_S = 0.5

_requested = threading.Event()
_done = threading.Event()
_reason: list[str] = []
_requested_at: list[float] = []
_step: list[int | None] = [None]  # the step this process computes (set by the loop; None: a driver)
_signals = 0
_sources: list[Callable[[], str | None]] = []
_last_poll = 0.0


def at_step(step: int) -> None:
    """The loop starts computing ``step``."""
    _step[0] = step


def steps_done() -> None:
    """The loop has no step left: a SIGTERM from now on (Ray ending its workers, a late eviction)
    has no checkpoint to wait for and takes its default action."""
    _done.set()


def request(reason: str) -> None:
    """Ask for a checkpoint and a stop at the next step boundary."""
    if not _requested.is_set():
        _reason.append(reason + _during())
        _requested_at.append(time.monotonic())
        _requested.set()


def _during() -> str:
    return "" if _step[0] is None else f" during step {_step[0]}"


def wait(timeout: float | None = None) -> bool:
    """Block until a preemption is requested in this process (True) or ``timeout`` passes."""
    return _requested.wait(timeout)


def reason() -> str:
    return _reason[0] if _reason else ""


def seconds_since_request() -> float:
    return time.monotonic() - _requested_at[0] if _requested_at else float("nan")


def _on_sigterm(signum, frame) -> None:
    global _signals
    _signals += 1
    if _signals > 1 or _done.is_set():  # asked twice, or nothing left to save: as without a handler
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    request("SIGTERM")
    # os.write, not logging: a handler may interrupt code that holds the logging lock.
    os.write(2, f"[pid {os.getpid()}] SIGTERM{_during()}: checkpoint at the next step boundary, then stop\n".encode())


def install() -> bool:
    """Install the SIGTERM handler; only possible in the main thread (False elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def add_source(poll: Callable[[], str | None]) -> None:
    """``poll()`` returns a reason when a preemption was requested elsewhere, else None."""
    _sources.append(poll)


def reset() -> None:
    """Forget requests and sources (a new attempt in the same process)."""
    global _signals, _last_poll
    _requested.clear()
    _done.clear()
    _reason.clear()
    _requested_at.clear()
    _sources.clear()
    _signals, _last_poll = 0, 0.0
    _step[0] = None


def requested() -> bool:
    """This process's view: a signal, or a registered source (polled at most every POLL_S)."""
    global _last_poll
    if _requested.is_set():
        return True
    now = time.monotonic()
    if _sources and now - _last_poll >= POLL_S:
        _last_poll = now
        for poll in _sources:
            try:
                why = poll()
            except Exception:  # a source that cannot be reached must not stop training
                why = None
            if why:
                request(why)
                return True
    return False


def agreed(world_size: int, group=None) -> bool:
    """Every rank's answer to "did any rank get a preemption request?" (a collective: all call it)."""
    mine = requested()
    if world_size == 1:
        return mine
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if mine else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() > 0 and not mine:
        request("another rank")
    return flag.item() > 0


def cpu_group():
    """A gloo group for the flag, so checking it never waits on a GPU stream (None: use the default
    group, which already is gloo on CPU)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")
