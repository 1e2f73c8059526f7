"""Where one rank's run stands: the small state that changes as it trains.

A checkpoint keeps ``step`` and ``best_miou`` of it (:meth:`Progress.saved`) and a resume starts from
them (:meth:`Progress.restored`); the rest lives as long as the process: the log window, the
device-side record of the first non-finite loss and how the run is ending. Where the time goes is
the goodput clock's (:mod:`unet_dist.train.observer`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

NO_STEP = 2**62  # "no non-finite loss yet" in the device-side first-bad-step record


@dataclass
class Window:
    """Loss and throughput since the last train log line. The loss sum stays on the device (a
    0-dim tensor once the first step adds to it): it is read only when the line is logged."""

    started: float = field(default_factory=time.perf_counter)
    images: int = 0
    loss_sum: torch.Tensor | float = 0.0
    loss_n: int = 0


@dataclass
class Progress:
    step: int = 0  # the step taken last (after a non-finite loss: the first bad one)
    best_miou: float = float("nan")  # best val mIoU so far
    status: str = "finished"  # how the run is ending: finished | preempted | non_finite_loss | non_finite_weights
    last_scores: dict = field(default_factory=dict)  # the last evaluation's scores
    saved: int = -1  # the step checkpointed last
    change_saved_at: float = float("-inf")  # when a checkpoint was last taken for a coming change of the group (monotonic s)
    resumed_from: str | None = None  # the checkpoint restored
    last_checkpoint: str | None = None  # where the launcher published the last one
    window: Window = field(default_factory=Window)
    first_bad: torch.Tensor | None = None  # the first step with a non-finite loss (NO_STEP: none), on the device
    loop_s: float = 0.0  # the steps' wall time, evaluations and checkpoints included
    global_batch: int = 0  # the global batch of the restored checkpoint (0: none, or one from before it was kept)

    def saved_state(self) -> dict:
        """What a checkpoint keeps of the progress."""
        return {"step": self.step, "best_miou": self.best_miou}

    @classmethod
    def restored(cls, state: dict) -> Progress:
        return cls(step=int(state["step"]), best_miou=float(state["best_miou"]),
                   global_batch=int(state.get("global_batch", 0)))
