"""Checkpoints written in the background (train.checkpoint_async): the same files as a synchronous
write, a snapshot later steps cannot change, at most one write in flight (a due checkpoint waits, or
is skipped with train.checkpoint_when_busy: skip),
the tracking records persisted before the checkpoint is published, a failed write stopping the run;
and, for real, a torchrun job killed during a slow background upload to the moto S3 server resuming
from the previous complete checkpoint with the weights of a run that never stopped.
"""
from __future__ import annotations

import contextlib
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from conftest import kill_tree, run
from test_train_parts import cfg_with, tiny_run, tiny_shards  # noqa: F401 - the fixture
from unet_dist import checkpoint
from unet_dist.train.checkpointer import Checkpointer, Snapshot, Write, to_host
from unet_dist.train.loop import Context, train


def background_context(run_dir: Path, reports: list, publish=None) -> Context:
    """A world of one whose launcher publishes in the background, as torchrun's does."""
    publish = publish or (lambda tmp, step: checkpoint.publish(tmp, run_dir, step))

    def report(metrics: dict, tmp: Path | None) -> str | None:
        reports.append(("sync", metrics))
        return str(checkpoint.publish(tmp, run_dir, int(metrics["step"]))) if tmp is not None else None

    def report_async(metrics: dict, write: Write | None) -> str | None:
        reports.append(("async", metrics))
        if write is None:
            return None
        write.start(lambda tmp: publish(tmp, write.step))
        return str(checkpoint.step_dir(run_dir, write.step))

    return Context(rank=0, world_size=1, local_rank=0, launcher="single", run_id=None, report=report,
                   report_async=report_async,
                   latest_checkpoint=lambda: contextlib.nullcontext(checkpoint.find_latest(run_dir)))


def states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # nan == nan here


def test_a_snapshot_keeps_the_step_it_was_taken_at_while_training_goes_on():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step():
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    live = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    snap = to_host(live)
    frozen = {k: {n: t.clone() for n, t in v.items()} for k, v in [("model", live["model"])]}
    exp_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    step()  # in place: the live state dicts change, the snapshot does not
    assert not torch.equal(live["model"]["0.weight"], frozen["model"]["0.weight"])
    assert states_equal(snap["model"], frozen["model"])
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert snap["optimizer"]["param_groups"] is not live["optimizer"]["param_groups"]
    again = to_host(live, reuse=snap)  # the next snapshot goes into the last one's memory
    assert again["model"]["0.weight"] is snap["model"]["0.weight"]
    assert torch.equal(again["model"]["0.weight"], live["model"]["0.weight"])


def test_background_checkpoints_hold_exactly_what_synchronous_ones_hold(tiny_shards, tmp_path):  # noqa: F811
    sync_reports: list = []
    sync = train(tiny_run(tiny_shards, 5, "train.checkpoint_async=false"),
                 background_context(tmp_path / "sync", sync_reports))
    async_reports: list = []
    done = train(tiny_run(tiny_shards, 5), background_context(tmp_path / "async", async_reports))
    assert {kind for kind, _ in sync_reports} == {"sync"} and {kind for kind, _ in async_reports} == {"async"}
    assert [m["step"] for _, m in async_reports] == [m["step"] for _, m in sync_reports] == [2, 4, 5]
    assert done["checkpoint"] == str(tmp_path / "async" / "checkpoint_step-00000005") and done["steps"] == sync["steps"]
    for step in (4, 5):  # publish keeps the newest two
        name = f"checkpoint_step-{step:08d}"
        a, b = checkpoint.load_state(tmp_path / "async" / name), checkpoint.load_state(tmp_path / "sync" / name)
        assert states_equal(a, b), f"{name} differs"
        meta, same = (checkpoint.read_meta(tmp_path / run / name) for run in ("async", "sync"))
        assert meta["step"] == step and meta["state_bytes"] == (tmp_path / "async" / name / checkpoint.STATE_FILE).stat().st_size
        keys = ("status", "data_position", "world_size", "launcher", "shards_manifest_sha256", "quantizer")
        assert [meta[k] for k in keys] == [same[k] for k in keys] and meta["config"]["train"]["checkpoint_async"]


class GatedContext:
    """A launcher whose background publish waits until the test opens its gate."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.gate, self.started, self.order = run_dir, threading.Event(), [], []

    def publish(self, tmp: Path, step: int):
        self.order.append(f"publish {step}")
        self.gate.wait(30)
        return checkpoint.publish(tmp, self.run_dir, step)

    def context(self) -> Context:
        def report_async(metrics, write):
            self.started.append(write.step)
            write.start(lambda tmp: self.publish(tmp, write.step))
            return str(checkpoint.step_dir(self.run_dir, write.step))

        return Context(rank=0, world_size=1, local_rank=0, launcher="single", run_id=None,
                       report=lambda m, d: None, report_async=report_async,
                       latest_checkpoint=lambda: contextlib.nullcontext(None))


def test_a_checkpoint_due_while_one_is_in_flight_waits_for_it_and_records_persist_first(tmp_path):
    gated = GatedContext(tmp_path)
    saver = Checkpointer(gated.context(), background=True, persist=lambda: gated.order.append("persist"))
    snap = lambda step: Snapshot(step, {"w": torch.ones(2) * step}, {"step": step})  # noqa: E731
    assert saver.save({"step": 1}, snap(1)) == str(tmp_path / "checkpoint_step-00000001")
    second = threading.Thread(target=lambda: (saver.wait(), saver.save({"step": 2}, snap(2))))
    second.start()
    second.join(0.5)
    assert second.is_alive() and gated.started == [1], "the second waits while the first is in flight"
    assert checkpoint.find_latest(tmp_path) is None, "nothing published before the write is done"
    gated.gate.set()
    second.join(10)
    saver.flush()
    assert gated.started == [1, 2] and gated.order == ["persist", "publish 1", "persist", "publish 2"]
    assert checkpoint.read_meta(checkpoint.find_latest(tmp_path))["step"] == 2


@pytest.mark.parametrize("when_busy", ["wait", "skip"])
def test_a_slow_store_makes_the_loop_wait_or_skip_checkpoints_by_the_configured_rule(tiny_shards, tmp_path, when_busy):  # noqa: F811
    """Step 1's write takes a second, far longer than a step: ``wait`` keeps every scheduled
    checkpoint, ``skip`` drops the ones due meanwhile and still waits for the last step's."""
    published: list[int] = []

    def slow(tmp: Path, step: int):
        if step == 1:
            threading.Event().wait(1.0)
        published.append(step)
        return checkpoint.publish(tmp, tmp_path, step)

    cfg = tiny_run(tiny_shards, 6, "train.checkpoint_every=1", f"train.checkpoint_when_busy={when_busy}")
    summary = train(cfg, background_context(tmp_path, [], publish=slow))
    assert summary["status"] == "finished" and summary["steps"] == 6
    if when_busy == "wait":
        assert published == [1, 2, 3, 4, 5, 6]
    else:
        assert published[0] == 1 and published[-1] == 6 and 2 not in published, published
    assert checkpoint.read_meta(checkpoint.find_latest(tmp_path))["step"] == 6


def test_a_failed_background_write_stops_the_run_with_its_error(tiny_shards, tmp_path):  # noqa: F811
    def broken(tmp: Path, step: int):
        if step == 2:
            raise OSError(f"store refused checkpoint_step-{step:08d}")
        return checkpoint.publish(tmp, tmp_path, step)

    with pytest.raises(OSError, match="store refused checkpoint_step-00000002"):
        train(tiny_run(tiny_shards, 6), background_context(tmp_path, [], publish=broken))
    assert checkpoint.find_latest(tmp_path) is None


# ---------------------------------------------------------------------- a job killed mid-upload
@pytest.mark.slow
def test_job_killed_during_a_background_upload_resumes_from_the_previous_checkpoint(tmp_path, small_shards, s3_env):
    """torchrun, 2 ranks, checkpoints every 5 steps to S3 through a link that delays every byte by
    0.5 s each way: the job is SIGKILLed while the step-10 checkpoint is on its way; the same
    command then resumes from step 5 and ends with the weights of a run that never stopped."""
    from slow_link import SlowLink
    from test_preemption import STEPS, digests, job_env, torchrun_job
    from test_reliability import latest_step, metric_steps, resumed_at, run_id_of, wait_until

    ckpt = f"s3://{s3_env.bucket('async')}/ckpt"
    direct = {**job_env(tmp_path), **s3_env.env}

    def job(name: str) -> list[str]:
        return torchrun_job(tmp_path, small_shards, name) + ["--set", f"train.checkpoint_dir={ckpt}"]

    reference = run(job("ref"), cwd=tmp_path, env=direct, timeout=300)
    [uninterrupted] = digests(reference.stdout + reference.stderr)

    link = SlowLink(int(s3_env.endpoint.rsplit(":", 1)[1]), latency_s=0.5)
    log, run_dir = tmp_path / "first.log", f"{ckpt}/killed"
    with open(log, "w") as out:
        proc = subprocess.Popen(job("killed"), cwd=tmp_path, env={**direct, "AWS_ENDPOINT_URL": link.endpoint},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "checkpoint at step 10: the loop was held" in log.read_text(),
                   what="the step-10 checkpoint to start", proc=proc, log=log, timeout=240)
        assert latest_step(run_dir) == 5, "the step-10 upload is still on its way"
        kill_tree(proc.pid)  # the agent and both ranks (their own sessions), the upload thread with them
        proc.wait()
    finally:
        kill_tree(proc.pid)
        link.close()
    first = log.read_text()
    assert "checkpoint of step 10 published" not in first, first[-3000:]
    assert latest_step(run_dir) == 5, "an incomplete upload is never the newest"

    again = run(job("killed"), cwd=tmp_path, env=direct, timeout=300)
    text = again.stdout + again.stderr
    assert resumed_at(text) == [5], text[-4000:]
    assert digests(text) == {uninterrupted}, "the weights of a run that never stopped"
    assert latest_step(run_dir) == STEPS
    run_id = run_id_of(first)
    assert run_id_of(text) == run_id and metric_steps(tmp_path, run_id) == list(range(1, STEPS + 1))
