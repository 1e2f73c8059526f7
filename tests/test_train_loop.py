"""The loop keeps the loss and the non-finite flag on the device and reads them only at check steps
(log, eval, checkpoint, last): the logged losses are the same whatever ``log_every`` is, and a
non-finite loss still stops training before any later checkpoint is written."""
import contextlib
import logging
import re

import pytest

from unet_dist.config import load_config
from unet_dist.train.loop import Context, train
from test_reliability import DIVERGE

TINY = ["model.width=4", "model.depth=3", "train.crop=[32,32]", "train.batch_size=2", "train.loader_workers=0",
        "train.eval_every=0", "mlflow.system_metrics=false", "mlflow.log_model=false", "train.cpus_per_worker=1"]


def run_in_process(shards, tmp_path, *sets: str):
    """One rank in this process; returns (summary, checkpoint steps reported, log text)."""
    cfg = load_config(None, [f"shards.dir={shards}", f"train.checkpoint_dir={tmp_path}", *TINY, *sets])
    saved = []
    ctx = Context(rank=0, world_size=1, local_rank=0, launcher="single", run_id=None,
                  report=lambda metrics, tmp: saved.append(metrics["step"]) if tmp is not None else None,
                  latest_checkpoint=lambda: contextlib.nullcontext(None))
    return train(cfg, ctx), saved


def losses(text: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss (\S+)", text)}


@pytest.mark.slow
def test_logged_loss_is_the_window_mean_of_the_per_step_losses(small_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="unet_dist.train")
    run_in_process(small_shards, tmp_path / "a", "train.steps=8", "train.log_every=1", "train.checkpoint_every=100")
    every = losses(caplog.text)
    caplog.clear()
    run_in_process(small_shards, tmp_path / "b", "train.steps=8", "train.log_every=4", "train.checkpoint_every=100")
    windows = losses(caplog.text)
    assert sorted(every) == list(range(1, 9)) and sorted(windows) == [4, 8]
    for end in (4, 8):  # same seed, same batches: the same steps, only read less often
        assert windows[end] == pytest.approx(sum(every[s] for s in range(end - 3, end + 1)) / 4, abs=2e-4)


@pytest.mark.slow
def test_non_finite_loss_between_log_steps_stops_before_the_next_checkpoint(small_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="unet_dist.train")
    summary, saved = run_in_process(small_shards, tmp_path, "train.steps=30", "train.log_every=5", *DIVERGE,
                                    "train.weight_decay=10000", "model.batch_norm=false")
    bad = int(re.search(r"non-finite loss at step (\d+): stopping", caplog.text).group(1))
    assert summary["status"] == "non_finite_loss" and summary["steps"] == bad - 1
    assert saved and max(saved) < bad  # checkpoints every 2 steps: none at or after the bad step
