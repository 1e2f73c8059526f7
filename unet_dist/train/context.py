"""What a launcher tells the loop about the rank it runs in, so the loop never asks which launcher
started it (:mod:`unet_dist.train.launch` builds one per rank)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from unet_dist.train.plan import JobPlan

if TYPE_CHECKING:
    from unet_dist.train.checkpointer import Write


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # ray | torchrun | single
    run_id: str | None  # MLflow run (rank 0 logs to it); the plan's when there is one
    # All ranks call report(metrics, dir_or_None) at the same steps; rank 0 passes a checkpoint dir and
    # gets back where the launcher published it.
    report: Callable[[dict, Path | None], str | None]
    # The checkpoint directory to resume from, or None; callable as a context manager.
    latest_checkpoint: Callable[[], contextlib.AbstractContextManager]
    # Ray: a reason when the worker group is about to change, else None: a node of this job is being
    # drained (a spot reclaim), or an elastic group below its size has room to grow (Ray restarts it
    # larger at its next check). Every rank calls it at the same steps (Ray's drain query is a
    # barrier); the loop takes rank 0's answer.
    group_change: Callable[[], str | None] | None = None
    # train.checkpoint_async: the same call, but rank 0 passes a checkpointer.Write (a snapshot in host
    # memory) that the launcher writes and publishes in the background, returning at once where it
    # will be published. No rank waits for it here: the loop does, at the next checkpoint and at the
    # end. None: the launcher has no background path, every checkpoint goes through ``report``.
    report_async: Callable[[dict, "Write | None"], str | None] | None = None
    # The job as the driver resolved it; None for in-process callers (tests, benchmarks): the loop
    # then reads the shards manifest itself (plan.from_shards).
    plan: JobPlan | None = None
    # Goodput's clock (train/goodput.py): when this attempt started in this process, and when the job
    # was launched (the Ray driver's or the torchrun agent's start; None: this attempt's start).
    started_at: float = field(default_factory=time.time)
    launched_at: float | None = None
