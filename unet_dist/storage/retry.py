"""Counted retries for object-store requests, and the one-line errors when they run out.

Every request to a store goes through :func:`call`. Transient failures (no connection, a reset or
cut transfer, a timeout, 5xx, throttling) are retried with exponential backoff and jitter (0.2 s
doubling, at most 8 s), up to the attempts :func:`attempts` allows; each retry is logged and
counted (:func:`retry_count`). The SDKs under pyarrow retry as little as they can be told to
(see docs/storage.md: none on S3, one second on GCS; Azure's SDK keeps its own three), so the
count is what happened.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Callable, TypeVar

from unet_dist.errors import UnetDistError

log = logging.getLogger("unet_dist.storage")
T = TypeVar("T")
DEFAULT_ATTEMPTS = 5
_LOCK = threading.Lock()
_RETRIES = 0

# Substrings of the SDKs' error texts (AWS SDK for C++, google-cloud-cpp, Azure SDK for C++, curl)
# that mean "try again": the connection, the transfer or the service's momentary state.
TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "CURL error", "Could not connect", "Couldn't connect",
             "Failed to connect", "Fail to get a new connection", "Could not resolve", "Connection reset",
             "connection was reset", "partial file", "Transferred a partial", "timed out", "Timeout",
             "SLOW_DOWN", "SlowDown", "THROTTLING", "Throttling", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
             "REQUEST_TIMEOUT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "[code 500]",
             "[code 502]", "[code 503]", "[code 504]", " 500 ", " 502 ", " 503 ", " 504 ", "ServerBusy",
             "InternalError", "OperationTimedOut", "Empty reply", "Recv failure", "Send failure")


def retry_count() -> int:
    """Transient object-store errors retried by this process so far."""
    return _RETRIES


def attempts(variables: tuple[str, ...]) -> int:
    """Attempts per request: the first of ``variables`` that is set (``UNET_DIST_MAX_ATTEMPTS``,
    then the scheme's standard one such as ``AWS_MAX_ATTEMPTS``), else 5."""
    for name in variables:
        raw = os.environ.get(name)
        if raw:
            try:
                return max(1, int(raw))
            except ValueError:
                raise UnetDistError(f"{name}: expected an integer, got {raw!r}") from None
    return DEFAULT_ATTEMPTS


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, UnetDistError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = str(e)
    return any(s in text for s in TRANSIENT)


def _backoff(attempt: int) -> float:
    return min(8.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0)


def note_retry(scheme: str, op: str, url: str, e: BaseException, attempt: int, total: int) -> None:
    """Log and count retry ``attempt + 1`` of ``total - 1``, then wait the backoff."""
    global _RETRIES
    delay = _backoff(attempt)
    with _LOCK:
        _RETRIES += 1
        count = _RETRIES
    log.warning("%s %s %s: %s; retry %d of %d in %.2fs (%d retries in this process)",
                scheme, op, url, first_line(e), attempt + 1, total - 1, delay, count)
    time.sleep(delay)


def call(op: str, loc, fn: Callable[[], T], total: int, explain: Callable[[BaseException, int], Exception]) -> T:
    """``fn()`` with up to ``total`` attempts on transient errors. FileNotFoundError passes through
    (the caller decides what a missing object means); other errors become ``explain(e, total)``."""
    for attempt in range(total):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:  # pyarrow raises OSError, ArrowInvalid is a ValueError
            if transient(e) and attempt + 1 < total:
                note_retry(loc.scheme, op, loc.url, e, attempt, total)
                continue
            raise explain(e, total) from None
    raise AssertionError("unreachable")
