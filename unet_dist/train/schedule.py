"""What the loop does after each step: the one place that decides it.

Every rank computes the same answers from the config alone, so collectives (the first bad step,
the preemption flag, a checkpoint) are entered by all ranks at the same steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from unet_dist.config import TrainConfig


@dataclass(frozen=True)
class Due:
    """After one step: what to do (each true at the last step, except the two checks for stopping early)."""

    log: bool  # mean loss, learning rate, images/s since the last line
    evaluate: bool
    checkpoint: bool
    last: bool
    preempt_check: bool  # ask every rank whether a preemption was requested (not after the last step)
    change_check: bool  # ask the launcher whether the group is about to change: a node drain, room to grow (log steps, not the last)

    @property
    def read_device(self) -> bool:
        """The loop reads the device (its non-finite record, the loss) only at these steps."""
        return self.log or self.evaluate or self.checkpoint


@dataclass(frozen=True)
class Schedule:
    steps: int
    log_every: int
    eval_every: int  # 0: only at the end
    checkpoint_every: int

    @classmethod
    def of(cls, t: TrainConfig) -> Schedule:
        return cls(t.steps, t.log_every, t.eval_every, t.checkpoint_every)

    def at(self, step: int) -> Due:
        last = step == self.steps
        log = step % self.log_every == 0
        return Due(log=log or last,
                   evaluate=bool(self.eval_every and step % self.eval_every == 0) or last,
                   checkpoint=step % self.checkpoint_every == 0 or last,
                   last=last, preempt_check=not last, change_check=log and not last)
