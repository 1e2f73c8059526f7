"""The loop's one schedule, on its own (no model, no processes)."""
from __future__ import annotations

from unet_dist.config import load_config
from unet_dist.train.schedule import Schedule


def steps_where(schedule: Schedule, what: str) -> list[int]:
    return [s for s in range(1, schedule.steps + 1) if getattr(schedule.at(s), what)]


def test_log_evaluate_and_checkpoint_fall_on_their_multiples_and_all_on_the_last_step():
    s = Schedule(steps=10, log_every=3, eval_every=4, checkpoint_every=5)
    assert steps_where(s, "log") == [3, 6, 9, 10]
    assert steps_where(s, "evaluate") == [4, 8, 10]
    assert steps_where(s, "checkpoint") == [5, 10]
    assert steps_where(s, "last") == [10]


def test_the_device_is_read_only_where_something_is_logged_evaluated_or_saved():
    s = Schedule(steps=10, log_every=3, eval_every=4, checkpoint_every=5)
    assert steps_where(s, "read_device") == [3, 4, 5, 6, 8, 9, 10]


def test_eval_every_zero_evaluates_only_at_the_end():
    s = Schedule(steps=7, log_every=100, eval_every=0, checkpoint_every=100)
    assert steps_where(s, "evaluate") == [7] and steps_where(s, "read_device") == [7]


def test_stopping_checks_come_before_the_last_step_only():
    """A preemption is checked after every step but the last; a node drain at log steps but the last."""
    s = Schedule(steps=8, log_every=2, eval_every=0, checkpoint_every=100)
    assert steps_where(s, "preempt_check") == list(range(1, 8))
    assert steps_where(s, "change_check") == [2, 4, 6]


def test_schedule_of_a_config_takes_its_train_keys():
    cfg = load_config(overrides=["train.steps=12", "train.warmup_steps=0", "train.log_every=5", "train.eval_every=6", "train.checkpoint_every=4"])
    assert Schedule.of(cfg.train) == Schedule(steps=12, log_every=5, eval_every=6, checkpoint_every=4)
