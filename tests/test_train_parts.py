"""The parts of the training loop, one at a time, and a few real steps in-process (world size 1)."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from unet_dist import labels, preprocess
from unet_dist.config import load_config
from unet_dist.data import shards
from unet_dist.data.augment import Augment, to_device
from unet_dist.data.stream import train_stream
from unet_dist.synth import write_dataset
from unet_dist import checkpoint
from unet_dist.train.loop import Context, train
from unet_dist.train.parts import lr_lambda, make_optimizer


def cfg_with(*overrides: str):
    return load_config(overrides=list(overrides))


@pytest.mark.parametrize("schedule,end", [("cosine", 0.0), ("poly", 0.0), ("constant", 1.0)])
def test_lr_warms_up_linearly_then_follows_the_schedule(schedule, end):
    f = lr_lambda(cfg_with("train.steps=110", "train.warmup_steps=10", f"train.schedule={schedule}"))
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(110) == pytest.approx(end, abs=1e-12) and f(500) == pytest.approx(end, abs=1e-12)
    halfway = {"cosine": 0.5, "poly": 0.5 ** 0.9, "constant": 1.0}[schedule]
    assert f(60) == pytest.approx(halfway)


def test_make_optimizer_builds_sgd_with_momentum_or_adamw():
    model = torch.nn.Linear(2, 2)
    sgd = make_optimizer(cfg_with("train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.8",
                                  "train.weight_decay=0.01"), model)
    assert type(sgd) is torch.optim.SGD
    assert {k: sgd.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")} == \
        {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.01}
    adamw = make_optimizer(cfg_with("train.lr=0.002"), model)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["lr"] == 0.002


def test_publish_moves_a_checkpoint_in_whole_and_keeps_the_newest_two(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3, 3):
        tmp = tmp_path / f"tmp{step}"
        checkpoint.write(tmp, {"step": step}, {"step": step})
        final = checkpoint.publish(tmp, run_dir, step)
        assert final.local_path == run_dir / f"checkpoint_step-{step:08d}"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_step-00000002", "checkpoint_step-00000003"]
    assert checkpoint.find_latest(run_dir).local_path == run_dir / "checkpoint_step-00000003"
    assert checkpoint.load_state(run_dir / "checkpoint_step-00000003") == {"step": 3}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """8 train / 4 val pairs at 32x32, written in-process (no subprocesses)."""
    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root / "raw", "pairs", 8, 4, seed=0, processes=1)
    preprocess.run(cfg_with(f"data.root={root / 'raw'}", f"shards.dir={root / 'shards'}", "data.resize=[32,32]",
                            "shards.samples_per_shard=4", "shards.processes=1", "quantize.sample_pixels=5000"))
    return root / "shards"


def test_train_stream_yields_endless_uint8_batches_that_to_device_normalises_with_train_ids(tiny_shards):
    urls = shards.shard_paths(tiny_shards, shards.load_manifest(tiny_shards), "train")
    aug = Augment(crop=(16, 24), scale=(1.0, 1.0), flip=True)
    stream = iter(train_stream(urls, aug, 3, rank=0, world=1, seed=1, start=0, workers=0, pin_memory=False))
    raw = [next(stream) for _ in range(5)]  # 15 samples from 8: the stream runs on into the next epoch
    for photos, labels_, plans in raw:  # the loader ships uint8 source regions and the plans
        assert len(photos) == len(labels_) == 3 and plans.shape == (3, 5)
        assert all(p.dtype == torch.uint8 and p.shape[2] == 3 for p in photos)
        assert all(y.dtype == torch.uint8 and y.shape == p.shape[:2] for p, y in zip(photos, labels_))
    batches = [to_device(b, aug, torch.device("cpu")) for b in raw]  # to_device augments and normalises
    for images, target in batches:
        assert images.shape == (3, 3, 16, 24) and images.dtype == torch.float32
        assert target.shape == (3, 16, 24) and target.dtype == torch.int64
        assert set(target.unique().tolist()) <= set(range(labels.NUM_CLASSES)) | {labels.IGNORE}
    assert abs(float(torch.cat([b[0] for b in batches]).mean())) < 1.5  # ImageNet-standardised


def local_context(run_dir: Path, reports: list) -> Context:
    """What the torchrun launcher gives a world of one, without a process group or MLflow."""
    def report(metrics: dict, tmp: Path | None) -> None:
        reports.append(metrics)
        if tmp is not None:
            checkpoint.publish(tmp, run_dir, int(metrics["step"]))

    return Context(rank=0, world_size=1, local_rank=0, launcher="single", run_id=None, report=report,
                   latest_checkpoint=lambda: contextlib.nullcontext(checkpoint.find_latest(run_dir)))


def tiny_run(shards_dir: Path, steps: int, *extra: str):
    return cfg_with(f"shards.dir={shards_dir}", f"train.steps={steps}", "model.width=4", "model.depth=2",
                    "train.crop=[16,16]", "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=0",
                    "train.checkpoint_every=2", "train.loader_workers=0", "train.log_every=1", *extra)


def test_sgd_with_class_weights_trains_checkpoints_and_evaluates(tiny_shards, tmp_path):
    reports: list = []
    cfg = tiny_run(tiny_shards, 3, "train.optimizer=sgd", "train.class_weights=true")
    summary = train(cfg, local_context(tmp_path, reports))
    assert summary["status"] == "finished" and summary["steps"] == 3 and summary["resumed_from"] is None
    assert [r["step"] for r in reports] == [2, 3] and reports[-1]["status"] == "finished"
    assert 0.0 <= summary["val_miou"] <= 1.0 and summary["best_miou"] == summary["val_miou"]
    latest = checkpoint.find_latest(tmp_path)
    meta, state = checkpoint.read_meta(latest), checkpoint.load_state(latest)
    assert meta["step"] == 3 and meta["config"]["train"]["optimizer"] == "sgd" and meta["launcher"] == "single"
    assert meta["shards_manifest_sha256"] and meta["quantizer"].endswith(shards.QUANTIZER)
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert all(math.isfinite(float(t.float().sum())) for t in state["model"].values())


def test_a_second_call_resumes_from_the_checkpoint_and_continues_the_step_count(tiny_shards, tmp_path):
    train(tiny_run(tiny_shards, 2), local_context(tmp_path, []))
    reports: list = []
    ctx = local_context(tmp_path, reports)
    summary = train(tiny_run(tiny_shards, 4), ctx)
    assert summary["resumed_from"] == str(tmp_path / "checkpoint_step-00000002")
    assert summary["steps"] == 4 and [r["step"] for r in reports] == [4]
    assert torch.load(tmp_path / "checkpoint_step-00000004" / checkpoint.STATE_FILE,
                      weights_only=True)["scheduler"]["last_epoch"] == 4


def logged_losses(text: str) -> dict[int, float]:
    import re

    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss (\S+)", text)}


def test_logged_loss_is_the_window_mean_of_the_per_step_losses(tiny_shards, tmp_path, caplog):
    """The loss is summed on the device and read at log steps only: reading it less often changes
    no value (same seed, same batches)."""
    import logging

    caplog.set_level(logging.INFO, logger="unet_dist.train")
    train(tiny_run(tiny_shards, 8, "train.checkpoint_every=100"), local_context(tmp_path / "a", []))
    every = logged_losses(caplog.text)
    caplog.clear()
    train(tiny_run(tiny_shards, 8, "train.checkpoint_every=100", "train.log_every=4"),
          local_context(tmp_path / "b", []))
    windows = logged_losses(caplog.text)
    assert sorted(every) == list(range(1, 9)) and sorted(windows) == [4, 8]
    for end in (4, 8):
        assert windows[end] == pytest.approx(sum(every[s] for s in range(end - 3, end + 1)) / 4, abs=2e-4)


def test_non_finite_loss_between_log_steps_stops_before_any_later_checkpoint(tiny_shards, tmp_path, caplog):
    """Diverging on purpose (AdamW weight decay x -9 per step, no BatchNorm), logging every 5 steps and
    checkpointing every 2: found at a check step, reported as the first bad step, nothing saved after."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="unet_dist.train")
    reports: list = []
    summary = train(tiny_run(tiny_shards, 30, "train.log_every=5", "train.lr=0.001", "train.warmup_steps=0",
                             "train.schedule=constant", "train.grad_clip=0", "train.weight_decay=10000",
                             "model.batch_norm=false"), local_context(tmp_path, reports))
    bad = int(re.search(r"non-finite loss at step (\d+): stopping", caplog.text).group(1))
    saved = [r["step"] for r in reports if r.get("status") == "running"]
    assert summary["status"] == "non_finite_loss" and summary["steps"] == bad - 1
    assert saved and max(saved) < bad
    latest = checkpoint.load_state(checkpoint.find_latest(tmp_path))
    assert all(torch.isfinite(t).all() for t in latest["model"].values())
