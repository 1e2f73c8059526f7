"""What a launcher tells the loop about the rank it runs in, so the loop never asks which launcher
started it (:mod:`unet_dist.train.launch` builds one per rank)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from unet_dist.train.plan import JobPlan


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
    # Ray: a reason when a node of this job is being drained (a spot reclaim), else None. Every rank
    # calls it at the same steps (it is a barrier across the workers).
    node_drain: Callable[[], str | None] | None = None
    # The job as the driver resolved it; None for in-process callers (tests, benchmarks): the loop
    # then reads the shards manifest itself (plan.from_shards).
    plan: JobPlan | None = None
