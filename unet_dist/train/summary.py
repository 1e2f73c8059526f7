"""How a training run ended: one typed record, with one name per quantity, from the loop to the
launchers, the sweep (:mod:`unet_dist.tune`) and the ``train`` command (its printed lines and
``--summary-json``).

Names: ``steps`` is the count a run ended with (``step``, in a report or a checkpoint, is one point of
it); ``loop_s`` is the loop's own time (steps, evaluations, checkpoints; the command adds its total as
``wall_s``); a score that was never measured is None.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RunSummary:
    status: str  # finished | preempted | non_finite_loss | non_finite_weights | error
    steps: int | None = None  # the last step whose weights are kept
    best_miou: float | None = None
    val_miou: float | None = None  # the last evaluation's
    loop_s: float | None = None
    world_size: int = 1
    resumed_from: str | None = None  # the checkpoint this run started from
    mlflow_run_id: str | None = None
    model_uri: str | None = None  # the logged model (a finished run that trained)
    checkpoint: str | None = None  # the newest checkpoint when the run ended: the last good one
    rank: int = 0  # the rank that wrote it (torchrun: every rank returns one; rank 0's is the job's)
    error: str | None = None  # status "error": the one line every rank agreed on
    goodput: dict | None = None  # rank 0: where the job's wall time went (train/goodput.py)

    def __getitem__(self, name: str):
        """Read by name too, as the dict it replaced (tests, scripts): ``summary["steps"]``."""
        return getattr(self, name)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def measured(score: float | None) -> float | None:
    """A score, or None when it was never measured (the loop keeps NaN until its first evaluation)."""
    return None if score is None or math.isnan(score) else float(score)
