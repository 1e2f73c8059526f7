"""Deliver a run's tracking spool after the job is over: the records a job that ended during a
tracking outage left beside its checkpoints (:mod:`unet_dist.tracking.spool`). A resume of the run
delivers them too; this is for a run that will not be resumed, or to see the run whole now.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from unet_dist import storage
from unet_dist.errors import UnetDistError
from unet_dist.tracking import records, spool
from unet_dist.tracking.records import Delivery

log = logging.getLogger("unet_dist.tracking")


@dataclass(frozen=True)
class Synced:
    run_id: str
    tracking_uri: str
    delivered: int  # records sent (metrics a run already held are skipped, so sending twice is harmless)
    dropped: int  # records the server refused (each logged with why)


def sync(run_dir: str, tracking_uri: str | None = None, wait_s: float = 60.0) -> Synced | None:
    """Send every spooled record of ``run_dir`` in order and empty the spool; None when there is
    nothing spooled. A server that does not answer within ``wait_s`` leaves the spool as it is."""
    from unet_dist.tracking import bounded_requests, check_access

    folder = storage.location(run_dir) / spool.FOLDER
    if not folder.parent.is_dir():
        raise UnetDistError(f"{folder.parent}: no such run folder; expected a run's checkpoint folder "
                            "(train.checkpoint_dir/train.run_name)")
    header, pending = spool.read(folder)
    if not pending:
        return None
    uri, run_id = tracking_uri or header["tracking_uri"], header["run_id"]
    bounded_requests()
    check_access(uri)
    delivery, queue, sent, dropped = Delivery(uri, run_id, check_history=True), deque(pending), 0, 0
    deadline, pause = time.monotonic() + wait_s, 1.0
    while queue:
        try:
            n = delivery.send(queue)
        except Exception as e:  # noqa: BLE001 - sorted by records.is_transient
            if records.is_transient(e):
                if time.monotonic() + pause > deadline:
                    raise UnetDistError(f"{folder}: the MLflow server at {uri} did not answer for {wait_s:.0f} s "
                                        f"({str(e).splitlines()[0][:160]}); {len(queue)} records stay spooled") from None
                time.sleep(pause)
                pause = min(2 * pause, 10.0)
                continue
            rec, n = queue[0], 1
            log.error("%s: the server refused a %s record (seq %d): %s; dropped", folder, rec["kind"], rec["seq"], e)
            dropped += 1
        else:
            sent += n
        done = [queue.popleft() for _ in range(n)][-1]["seq"]
        spool.drop_through(folder, done)
    spool.drop_through(folder, max(r["seq"] for r in pending))
    _untag(delivery, run_id)
    return Synced(run_id, uri, sent, dropped)


def _untag(delivery: Delivery, run_id: str) -> None:
    from unet_dist.tracking.writer import SPOOL_TAG

    if SPOOL_TAG in delivery.client.get_run(run_id).data.tags:
        delivery.client.delete_tag(run_id, SPOOL_TAG)
