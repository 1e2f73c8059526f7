"""Preemption: a real SIGTERM to a torchrun agent, a Ray Train worker and a Ray driver mid-run.

Each signalled job must stop within one step with a complete checkpoint, exit with the preemption
code and leave its MLflow run resumable (KILLED, tagged preempted); the same command run again must
reach the configured step with the same final weights as a job that was never stopped, in the same
MLflow run, each step logged once. A second SIGTERM while the checkpoint is written must leave no
half checkpoint that a resume would take.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run
from test_reliability import (alive, env_for, finish, last_logged_step, latest_step, metric_steps, mlflow_status,
                              ray_cmd, ray_worker_pids, resumed_at, run_id_of, sets, wait_until)
from unet_dist import checkpoint
from unet_dist.train import goodput, preemption

pytestmark = pytest.mark.slow
STEPS = 16
SIGNALLED_LINE = r"SIGTERM during step (\d+): checkpoint at the next step"  # the signalled process's own line
EXACT = ["train.loader_workers=1", "train.checkpoint_every=5"]  # a worker process feeds each rank


def torchrun_job(tmp: Path, shards: Path, name: str, *extra: str) -> list[str]:
    """The torchrun launch script: it turns a preempted torchrun into exit code 75."""
    return ["bash", str(REPO / "jobs" / "torchrun_single.sh"), *sets(tmp, shards, name, STEPS, *EXACT, *extra)]


def job_env(tmp: Path) -> dict[str, str]:
    return {**env_for(tmp), "NPROC": "2", "MAX_RESTARTS": "0", "CONFIG": str(REPO / "jobs" / "configs" / "demo.yaml")}


def digests(text: str) -> set[str]:
    return set(re.findall(r"rank \d final weights sha256 (\w+)", text))


def signalled_during(text: str) -> int:
    """The earliest step a signalled process was computing when its SIGTERM came (its own line)."""
    return min(int(s) for s in re.findall(SIGNALLED_LINE, text))


def child_pid(parent: int, needle: str) -> int | None:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(parent)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, args = line.strip().split(" ", 1)
        if needle in args:
            return int(pid)
    return None


def run_tags(tmp: Path, run_id: str) -> dict[str, str]:
    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id).data.tags


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_shards) -> str:
    """The final weights digest of a job that is never stopped (torchrun, 2 ranks)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = run(torchrun_job(tmp, small_shards, "ref"), cwd=tmp, env=job_env(tmp), timeout=300)
    [digest] = digests(proc.stdout + proc.stderr)
    return digest


def preempt_and_resume(tmp: Path, cmd: list[str], env: dict, signal_target, name: str) -> dict:
    """Start ``cmd``, SIGTERM ``signal_target(proc, log)`` after step 7, then run ``cmd`` again."""
    log = tmp / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: last_logged_step(log, STEPS) >= 7, what="step 7", proc=proc, log=log)
        target = signal_target(proc, log)
        signalled_at = last_logged_step(log, STEPS)
        os.kill(target, signal.SIGTERM)
        first = finish(proc, log, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run_dir = tmp / "ckpt" / name
    meta = checkpoint.read_meta(checkpoint.find_latest(run_dir))
    run_id = run_id_of(first)
    after_stop = {"status": mlflow_status(tmp, run_id), "tags": run_tags(tmp, run_id)}
    again = run(cmd, cwd=tmp, env=env, timeout=300)
    return {"rc": proc.returncode, "first": first, "signalled_at": signalled_at, "meta": meta,
            "run_id": run_id, "after_stop": after_stop, "text": again.stdout + again.stderr, "tmp": tmp,
            "run_dir": run_dir}


def assert_preempted_then_resumed_exactly(r: dict, reference: str) -> None:
    # stopped within one step of the signal, with a complete checkpoint saying so
    step = r["meta"]["step"]
    assert r["rc"] == preemption.EXIT_CODE, r["first"][-4000:]
    assert r["signalled_at"] <= step, "the signal came after the logged step"
    if re.search(SIGNALLED_LINE, r["first"]):  # not when only the Ray driver was signalled
        during = signalled_during(r["first"])
        assert during <= step <= during + 1, (during, step)
    if step % 5:  # off the schedule: a checkpoint of its own (on a periodic step, that one serves)
        assert r["meta"]["status"] == "preempted", r["meta"]
    assert f"preemption checkpoint at step {step} published" in r["first"]
    assert r["after_stop"]["status"] == "KILLED", "resumable: not FAILED"
    assert r["after_stop"]["tags"]["unet_dist.status"] == "preempted"
    assert r["after_stop"]["tags"]["unet_dist.preempted_at_step"] == str(step)
    # the same command continues: the configured step, the same weights, the same MLflow run
    assert resumed_at(r["text"]) == [step], r["text"][-4000:]
    assert latest_step(r["run_dir"]) == STEPS
    assert digests(r["text"]) == {reference}, "the weights of a run that never stopped"
    assert run_id_of(r["text"]) == r["run_id"]
    assert metric_steps(r["tmp"], r["run_id"]) == list(range(1, STEPS + 1)), "each step logged once"
    assert mlflow_status(r["tmp"], r["run_id"]) == "FINISHED"
    assert_goodput_after_a_preemption(r, step)


def assert_goodput_after_a_preemption(r: dict, step: int) -> None:
    """Both attempts report goodput; the end report adds up to the wall time from the first
    launch within 1%; the preemption costs restarts (the time the job was down) and no recomputed
    work (the checkpoint was taken where it stopped)."""
    assert f"goodput at the end (preempted) at step {step}:" in r["first"]
    assert f"goodput at resume at step {step}:" in r["text"] and "goodput at the end (finished)" in r["text"]
    led = goodput.read_beacon(r["run_dir"])
    assert led.ended == "finished" and (led.attempts, led.preemptions, led.failures) == (2, 1, 0), led
    assert abs(sum(led.seconds.values()) - led.wall) <= 0.01 * led.wall, led
    assert led.seconds["restarts"] > 0 and led.seconds["recomputed"] < 0.01 * led.wall, led
    assert led.seconds["checkpoint"] > 0 and led.seconds["productive"] > 0, led


def test_sigterm_to_the_torchrun_agent_checkpoints_and_resumes_exactly(tmp_path, small_shards, uninterrupted):
    def agent(proc, log):
        pid = child_pid(proc.pid, "bin/torchrun")
        assert pid, "the launch script runs torchrun as its child"
        return pid

    r = preempt_and_resume(tmp_path, torchrun_job(tmp_path, small_shards, "tp"), job_env(tmp_path), agent, "tp")
    assert_preempted_then_resumed_exactly(r, uninterrupted)


def test_sigterm_to_one_ray_worker_checkpoints_every_rank_and_resumes_exactly(tmp_path, small_shards, uninterrupted):
    def worker(proc, log):
        pid = ray_worker_pids(log.read_text())[1]  # rank 1: rank 0 learns of it through the all-reduce
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker")
        return pid

    cmd = ray_cmd(tmp_path, small_shards, "rp", STEPS, *EXACT, "train.max_failures=0")
    r = preempt_and_resume(tmp_path, cmd, env_for(tmp_path), worker, "rp")
    assert "[FailurePolicy] RETRY" not in r["first"], "a preemption is not a failure"
    assert_preempted_then_resumed_exactly(r, uninterrupted)


def test_sigterm_to_the_ray_driver_makes_the_workers_checkpoint(tmp_path, small_shards, uninterrupted):
    cmd = ray_cmd(tmp_path, small_shards, "dp", STEPS, *EXACT, "train.max_failures=0")
    r = preempt_and_resume(tmp_path, cmd, env_for(tmp_path), lambda proc, log: proc.pid, "dp")
    assert "driver preempted (SIGTERM" in r["first"]
    assert not re.search(SIGNALLED_LINE, r["first"]), "no worker was signalled itself"
    assert_preempted_then_resumed_exactly(r, uninterrupted)


def test_second_sigterm_during_the_checkpoint_write_leaves_no_half_checkpoint(tmp_path, small_shards):
    """A width-32 model: its checkpoint (model and AdamW state, ~90 MB, written twice: a temporary
    folder, then the published copy) takes long enough to write that a second SIGTERM, sent when
    rank 0 starts writing, usually lands in the middle of it."""
    cmd = torchrun_job(tmp_path, small_shards, "twice", "model.width=32", "model.depth=5")
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=job_env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    run_dir = tmp_path / "ckpt" / "twice"
    try:
        wait_until(lambda: latest_step(run_dir) >= 5 and last_logged_step(log, STEPS) >= 6,
                   what="a checkpoint and a later step", proc=proc, log=log, timeout=240)
        agent = child_pid(proc.pid, "bin/torchrun")
        rank0 = next(p for p in map(int, subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent)],
                                                        capture_output=True, text=True).stdout.split())
                     if b"RANK=0" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"))
        os.kill(agent, signal.SIGTERM)
        wait_until(lambda: "preempted (" in log.read_text(), what="the preemption checkpoint to start",
                   proc=proc, log=log, timeout=60)
        os.kill(rank0, signal.SIGTERM)  # the second one: stop now
        finish(proc, log, timeout=120)
        deadline = time.monotonic() + 30
        while alive(rank0) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode not in (0, preemption.EXIT_CODE), text[-3000:]
    visible = sorted(p.name for p in run_dir.glob("checkpoint_*"))  # beside them: goodput.json
    if "published" not in text.split("preempted (")[-1]:  # the usual case: the write was cut short
        assert visible == ["checkpoint_step-00000005"], "nothing half-written under a checkpoint name"
    else:  # on a loaded machine the write can win the race; then it must be whole
        assert visible[0] == "checkpoint_step-00000005" and len(visible) == 2, visible
    for name in visible:  # whatever is visible loads: complete
        state = checkpoint.load_state(run_dir / name)
        assert isinstance(state["optimizer"]["state"], dict)
    assert checkpoint.read_meta(checkpoint.find_latest(run_dir))["step"] == int(visible[-1].rsplit("-", 1)[1])
