"""Reliability: faults survived for real, bad input refused with one line, nothing pickled.

Every fault here is real: a SIGKILL to a Ray Train worker, to a torchrun rank, to a whole driver
and its private Ray; a loss that really diverges; corrupt files on disk; a malicious pickle.
Recovery is judged on the end state: the configured step count, the checkpoint resumed from, and
the MLflow run read back with MlflowClient (one run, every metric step logged once).

Covered elsewhere, not repeated here: preprocess killed mid-way and rerun (byte-identical shards,
no partial shard under its final name) and a truncated JPEG in both ``data.on_bad_input`` modes in
tests/test_preprocess.py; unknown and mistyped config keys in tests/test_config.py; decoding of
truncated, non-image, grayscale and RGBA files in tests/test_sources.py; manifests in tests/test_k8s.py.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import BIN, REPO, assert_only_error, clean_env, patient, run
from unet_dist import preprocess
from unet_dist.config import load_config
from unet_dist.data import shards as sh
from unet_dist.synth import write_dataset
from unet_dist.labels import IGNORE
from unet_dist import checkpoint

TINY = ["model.width=4", "model.depth=3", "train.crop=[32,32]", "train.batch_size=2", "train.loader_workers=0",
        "train.eval_every=0", "train.log_every=1", "train.warmup_steps=0", "mlflow.system_metrics=false",
        "mlflow.log_model=false", "mlflow.registered_model="]
# A real divergence: AdamW's decoupled weight decay multiplies every weight by (1 - lr * wd) per step.
# At lr 1e-3 and wd 1e4 (x -9) without BatchNorm the loss is no longer finite at step 4, after a good
# checkpoint at step 2. With BatchNorm and wd 1e5 (x -99) the loss stays finite for longer, but the
# running statistics overflow first: the check made before each checkpoint stops it at step 4.
DIVERGE = ["train.lr=0.001", "train.warmup_steps=0", "train.schedule=constant", "train.grad_clip=0",
           "train.checkpoint_every=2"]
LOSS_DIVERGES = [*DIVERGE, "train.weight_decay=10000", "model.batch_norm=false"]
WEIGHTS_DIVERGE = [*DIVERGE, "train.weight_decay=100000", "model.batch_norm=true"]


# ------------------------------------------------------------------------------------------ helpers
def sets(tmp: Path, shards: Path, name: str, steps: int, *extra: str) -> list[str]:
    pairs = [f"shards.dir={shards}", f"train.checkpoint_dir={tmp / 'ckpt'}", f"train.run_name={name}",
             f"train.steps={steps}", "train.checkpoint_every=5", "train.workers=2", *TINY, *extra]
    return [a for s in pairs for a in ("--set", s)]


def ray_cmd(tmp, shards, name, steps, *extra) -> list[str]:
    """The driver with no RAY_ADDRESS: it starts a private local Ray in its own process group."""
    return [sys.executable, "-m", "unet_dist.train", *sets(tmp, shards, name, steps, *extra)]


def torchrun_cmd(tmp, shards, name, steps, *extra, restarts: int = 0) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}",
            "-m", "unet_dist.train", *sets(tmp, shards, name, steps, *extra)]


def env_for(tmp: Path) -> dict[str, str]:
    return clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")


def start(cmd: list[str], tmp: Path, log: Path) -> subprocess.Popen:
    """A job in its own session (so its whole process group can be killed), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=tmp, env=env_for(tmp), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=patient(timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"job still running after {timeout} s\n{log.read_text()[-4000:]}")
    return log.read_text()


def wait_until(predicate, *, what: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    deadline = time.monotonic() + patient(timeout)
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}\n{log.read_text()[-4000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-4000:]}")


def latest_step(run_dir: Path) -> int:
    latest = checkpoint.find_latest(run_dir)
    return int(checkpoint.read_meta(latest)["step"]) if latest else 0


def last_logged_step(log: Path, steps: int) -> int:
    found = re.findall(rf"step (\d+)/{steps} loss", log.read_text())
    return int(found[-1]) if found else 0


def past_a_checkpoint(run_dir: Path, log: Path, steps: int, at_least: int = 5) -> tuple[int, int] | None:
    """(checkpoint step, logged step) once a checkpoint exists and rank 0 has logged a later step: a
    kill now loses work and leaves metric steps in MLflow that the resumed job must not log twice.
    The goodput beacon (written in the background after the log line) must be past the checkpoint
    too: work after the last beacon shows up as restart time, not as recomputed work."""
    from unet_dist.train import goodput

    c = latest_step(run_dir)
    logged = last_logged_step(log, steps)
    beacon = goodput.read_beacon(run_dir) if c >= at_least and logged > c else None
    return (c, logged) if beacon is not None and beacon.step > c else None


def resumed_at(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S*checkpoint_step-\d+ at step (\d+)", text)]


def run_id_of(text: str) -> str:
    return re.search(r"MLflow run\s+([0-9a-f]{32})", text).group(1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def ray_worker_pids(text: str) -> dict[int, int]:
    """{world_rank: pid} of the newest worker group, from the controller's 'Started ...' lines."""
    return {int(r): int(p) for p, r in re.findall(r"pid=(\d+)\) world_rank=(\d+)", text)}


def sigkill_ray_worker(pid: int) -> None:
    title = cmdline(pid)
    assert title.startswith("ray::RayTrainWorker"), f"pid {pid} is not a Ray Train worker: {title!r}"
    os.kill(pid, signal.SIGKILL)


def torchrun_rank_pid(agent: int, rank: int) -> int | None:
    """The rank process the torchrun agent started (its children carry RANK in their environment)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent)], capture_output=True, text=True).stdout
    for pid in map(int, out.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def metric_steps(tmp: Path, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_metric_history(run_id, key))


def mlflow_status(tmp: Path, run_id: str) -> str:
    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id).info.status


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_goodput_after_a_failure(run_dir: Path, text: str, resumed_at_step: int) -> None:
    """The resumed attempt reported the carried ledger; the end report (the beacon beside the
    checkpoints) adds up to the wall time within 1%, with the failure's cost in restarts and in
    the work done after the last checkpoint (recomputed)."""
    from unet_dist.train import goodput

    assert f"goodput at resume at step {resumed_at_step}:" in text, text[-4000:]
    led = goodput.read_beacon(run_dir)
    assert led.ended == "finished" and (led.attempts, led.failures, led.preemptions) == (2, 1, 0), led
    assert abs(sum(led.seconds.values()) - led.wall) <= 0.01 * led.wall, led
    assert led.seconds["restarts"] > 0 and led.seconds["recomputed"] > 0, led
    assert led.seconds["productive"] > 0 and led.seconds["startup"] > 0, led


# ------------------------------------------------------------------------- 1. Ray worker SIGKILLed
@pytest.fixture(scope="module")
def ray_worker_killed(tmp_path_factory, small_shards):
    tmp = tmp_path_factory.mktemp("ray_worker_kill")
    run_dir, log, steps = tmp / "ckpt" / "rw", tmp / "job.log", 24
    proc = start(ray_cmd(tmp, small_shards, "rw", steps, "train.max_failures=1"), tmp, log)
    try:
        ckpt_at, logged_at = wait_until(lambda: past_a_checkpoint(run_dir, log, steps),
                                        what="a checkpoint and a later step", proc=proc, log=log)
        rank0 = ray_worker_pids(log.read_text())[0]
        sigkill_ray_worker(rank0)
        wait_until(lambda: not alive(rank0), what="the worker to die", proc=proc, log=log, timeout=30)
        newest = latest_step(run_dir)  # nothing writes checkpoints until the group restarts
        text = finish(proc, log, timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"tmp": tmp, "text": text, "rc": proc.returncode, "newest": newest, "ckpt_at": ckpt_at,
            "logged_at": logged_at, "run_dir": run_dir, "steps": steps}


@pytest.mark.slow
def test_killed_ray_worker_restarts_and_resumes_from_the_last_checkpoint(ray_worker_killed):
    r = ray_worker_killed
    assert r["rc"] == 0, r["text"][-4000:]
    assert "[FailurePolicy] RETRY" in r["text"], "Ray Train restarted the worker group under FailureConfig"
    assert resumed_at(r["text"]) == [r["newest"]], r["text"][-4000:]
    assert 5 <= r["ckpt_at"] <= r["newest"] < r["steps"] and r["logged_at"] > r["ckpt_at"], "killed mid-run"
    assert latest_step(r["run_dir"]) == r["steps"]
    assert re.search(rf"status\s+finished\s+steps\s+{r['steps']}\b", r["text"])
    assert_goodput_after_a_failure(r["run_dir"], r["text"], r["newest"])


@pytest.mark.slow
def test_killed_ray_worker_logs_to_the_same_mlflow_run_once_per_step(ray_worker_killed):
    r = ray_worker_killed
    run_id = run_id_of(r["text"])
    assert run_id_of(r["text"].split("training summary")[-1]) == run_id
    assert checkpoint.read_meta(checkpoint.find_latest(r["run_dir"]))["mlflow_run_id"] == run_id
    assert metric_steps(r["tmp"], run_id) == list(range(1, r["steps"] + 1)), "each step logged exactly once"
    assert metric_steps(r["tmp"], run_id, "train/lr") == list(range(1, r["steps"] + 1))
    assert mlflow_status(r["tmp"], run_id) == "FINISHED"


# ------------------------------------------------------------------- 2. torchrun rank SIGKILLed
@pytest.fixture(scope="module")
def torchrun_rank_killed(tmp_path_factory, small_shards):
    tmp = tmp_path_factory.mktemp("torchrun_kill")
    run_dir, log, steps = tmp / "ckpt" / "tk", tmp / "job.log", 60
    proc = start(torchrun_cmd(tmp, small_shards, "tk", steps, restarts=1), tmp, log)
    try:
        ckpt_at, logged_at = wait_until(lambda: past_a_checkpoint(run_dir, log, steps),
                                        what="a checkpoint and a later step", proc=proc, log=log)
        rank0 = torchrun_rank_pid(proc.pid, 0)
        assert rank0 and "unet_dist.train" in cmdline(rank0)
        os.kill(rank0, signal.SIGKILL)
        wait_until(lambda: "exitcode: -9" in log.read_text(), what="torchrun to notice", proc=proc, log=log)
        newest = latest_step(run_dir)
        text = finish(proc, log, timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"tmp": tmp, "text": text, "rc": proc.returncode, "newest": newest, "ckpt_at": ckpt_at,
            "logged_at": logged_at, "run_dir": run_dir, "steps": steps, "shards": small_shards}


@pytest.mark.slow
def test_killed_torchrun_rank_restarts_the_group_which_resumes_from_the_last_checkpoint(torchrun_rank_killed):
    r = torchrun_rank_killed
    assert r["rc"] == 0, r["text"][-4000:]
    assert resumed_at(r["text"]) == [r["newest"]], r["text"][-4000:]
    assert 5 <= r["ckpt_at"] <= r["newest"] < r["steps"] and r["logged_at"] > r["ckpt_at"], "killed mid-run"
    meta = checkpoint.read_meta(checkpoint.find_latest(r["run_dir"]))
    assert meta["step"] == r["steps"] and meta["world_size"] == 2
    digests = dict(re.findall(r"rank (\d) final weights sha256 (\w+)", r["text"]))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    run_id = run_id_of(r["text"])
    assert f"continuing MLflow run {run_id}" in r["text"] and meta["mlflow_run_id"] == run_id
    assert metric_steps(r["tmp"], run_id) == list(range(1, r["steps"] + 1))
    assert mlflow_status(r["tmp"], run_id) == "FINISHED"
    assert_goodput_after_a_failure(r["run_dir"], r["text"], r["newest"])


# ------------------------------------------------------ 3. whole job SIGKILLed, launched again
@pytest.mark.slow
def test_killed_job_relaunched_with_the_same_run_name_resumes_the_newest_checkpoint(tmp_path, small_shards):
    run_dir, log, steps = tmp_path / "ckpt" / "dk", tmp_path / "first.log", 30
    proc = start(ray_cmd(tmp_path, small_shards, "dk", steps), tmp_path, log)
    workers: dict[int, int] = {}
    try:
        wait_until(lambda: latest_step(run_dir) >= 5, what="a checkpoint", proc=proc, log=log)
        workers = ray_worker_pids(log.read_text())
        assert set(workers) == {0, 1}, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its GCS and raylet: as if the node died
        proc.wait()
        deadline = time.monotonic() + 30  # workers notice their raylet is gone and exit
        while any(alive(p) for p in workers.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers.values():
            if alive(pid) and cmdline(pid).startswith("ray::RayTrainWorker"):
                os.kill(pid, signal.SIGKILL)
    first = log.read_text()
    newest = latest_step(run_dir)
    assert 5 <= newest < steps, first[-3000:]

    again = run(ray_cmd(tmp_path, small_shards, "dk", steps), cwd=tmp_path, env=env_for(tmp_path), timeout=240)
    text = again.stdout + again.stderr
    run_id = run_id_of(first)
    # The newest complete checkpoint on disk, even one Ray's controller had not registered yet.
    assert resumed_at(text) == [newest], text[-4000:]
    assert f"continuing MLflow run {run_id}" in text and run_id_of(again.stdout) == run_id
    assert latest_step(run_dir) == steps
    assert metric_steps(tmp_path, run_id) == list(range(1, steps + 1))
    assert mlflow_status(tmp_path, run_id) == "FINISHED"


# ----------------------------------------------------------------- 5. a loss that is not finite
def assert_stopped_on_non_finite(tmp: Path, text: str, stderr: str, run_dir: Path, what: str = "loss") -> None:
    """Stopped at the first non-finite step with one clear line; the newest checkpoint is older and
    finite, MLflow holds no later step and marks the run FAILED."""
    bad = int(re.search(rf"non-finite {what} at step (\d+): stopping", text).group(1))
    good = latest_step(run_dir)
    assert 0 < good < bad, text[-3000:]
    [line] = error_lines(stderr)
    assert line == f"error: training stopped: non_finite_{what} (last good checkpoint: " \
                   f"{run_dir / f'checkpoint_step-{good:08d}'})"
    state = checkpoint.load_state(checkpoint.find_latest(run_dir))
    assert all(torch.isfinite(t).all() for t in state["model"].values()), "the kept checkpoint is finite"
    run_id = checkpoint.read_meta(checkpoint.find_latest(run_dir))["mlflow_run_id"]
    assert max(metric_steps(tmp, run_id)) == (bad - 1 if what == "loss" else bad)
    assert mlflow_status(tmp, run_id) == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("what", ["loss", "weights"])
def test_non_finite_loss_under_torchrun_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_shards, what):
    extra = LOSS_DIVERGES if what == "loss" else WEIGHTS_DIVERGE
    proc = run(torchrun_cmd(tmp_path, small_shards, "nan", 30, *extra), cwd=tmp_path, env=env_for(tmp_path),
               timeout=180, check=False)
    assert proc.returncode != 0
    assert_stopped_on_non_finite(tmp_path, proc.stdout + proc.stderr, proc.stderr, tmp_path / "ckpt" / "nan", what)


@pytest.mark.slow
def test_non_finite_loss_under_ray_stops_at_once_without_burning_retries(tmp_path, small_shards):
    proc = run(ray_cmd(tmp_path, small_shards, "nan", 30, *LOSS_DIVERGES), cwd=tmp_path, env=env_for(tmp_path),
               timeout=240, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "FailurePolicy" not in text and text.count("training 30 steps from step 0") == 1, "one attempt only"
    assert_stopped_on_non_finite(tmp_path, text, proc.stderr, tmp_path / "ckpt" / "nan")


# ------------------------------------------------------------------- 5. bad input at train time
def test_missing_shards_directory_is_one_line_before_anything_starts(tmp_path):
    proc = run(ray_cmd(tmp_path, tmp_path / "no-shards", "x", 5), cwd=tmp_path, env=env_for(tmp_path), check=False)
    assert_only_error(proc, f"{tmp_path / 'no-shards'}: shards directory not found")
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for a job that cannot start"


@pytest.mark.slow
def test_corrupt_shard_at_train_time_is_refused_naming_the_shard(tmp_path, small_shards):
    shards = Path(shutil.copytree(small_shards, tmp_path / "shards"))
    bad = shards / "train-000001.tar"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    bad.write_bytes(bytes(data))
    proc = run(ray_cmd(tmp_path, shards, "corrupt", 5), cwd=tmp_path, env=env_for(tmp_path), timeout=240,
               check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "FailurePolicy" not in text, "bad input is not retried: every attempt would end the same way"
    [line] = error_lines(proc.stderr)
    assert re.fullmatch(rf"error: {re.escape(str(bad))}: sha256 \w+\.\.\. does not match the manifest's "
                        rf"\w+\.\.\.; the shard is corrupt or stale, rerun preprocess", line), line
    assert mlflow_status(tmp_path, run_id_of(proc.stderr)) == "FAILED", "no run left RUNNING"
    assert not (tmp_path / "ckpt" / "corrupt").exists() or latest_step(tmp_path / "ckpt" / "corrupt") == 0


@pytest.mark.slow
def test_resume_with_another_model_width_is_one_line_before_anything_starts(torchrun_rank_killed, tmp_path):
    r = torchrun_rank_killed
    ckpt_root = r["run_dir"].parent
    cmd = [sys.executable, "-m", "unet_dist.train", *sets(r["tmp"], r["shards"], "tk", r["steps"] + 5),
           "--set", "model.width=8"]
    before = metric_steps(r["tmp"], run_id_of(r["text"]))
    proc = run(cmd, cwd=tmp_path, env=env_for(r["tmp"]), check=False)
    assert_only_error(proc, str(checkpoint.find_latest(ckpt_root / "tk")), "model.width=4 there, 8 here",
                      "train.run_name")
    assert metric_steps(r["tmp"], run_id_of(r["text"])) == before
    assert mlflow_status(r["tmp"], run_id_of(r["text"])) == "FINISHED", "the finished run is left alone"


@pytest.mark.slow
def test_checkpoint_copy_cut_short_is_never_resumed(torchrun_rank_killed, tmp_path):
    run_dir = Path(shutil.copytree(torchrun_rank_killed["run_dir"], tmp_path / "run"))
    good = checkpoint.find_latest(run_dir)
    cut = Path(shutil.copytree(good.local_path, run_dir / "checkpoint_step-00000999"))  # as a crash mid-copy leaves it
    meta = json.loads((cut / "meta.json").read_text())
    (cut / "meta.json").write_text(json.dumps({**meta, "step": 999}))
    (cut / "checkpoint.pt").write_bytes((cut / "checkpoint.pt").read_bytes()[:-100])
    assert checkpoint.find_latest(run_dir) == good
    (cut / "checkpoint.pt").unlink()
    assert checkpoint.find_latest(run_dir) == good


@pytest.mark.slow
def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused_by_predict(torchrun_rank_killed, tmp_path):
    src = checkpoint.find_latest(torchrun_rank_killed["run_dir"]).local_path
    ckpt = Path(shutil.copytree(src, tmp_path / "ckpt"))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"]["width"] = 8  # meta.json says width 8, the tensors are width 4
    (ckpt / "meta.json").write_text(json.dumps(meta))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (128, 64, 128)).save(photos / "a.png")
    proc = run([sys.executable, "-m", "unet_dist.predict", "--model", str(ckpt), "--input", str(photos),
                "--out", str(tmp_path / "out")], cwd=tmp_path, check=False)
    assert_only_error(proc, f"{ckpt}: checkpoint was made for another model shape", "(4, 3, 3, 3) vs (8, 3, 3, 3)")


# ------------------------------------------------------------- 5. bad input at preprocess time
@pytest.fixture(scope="module")
def cityscapes_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cs_raw") / "cs"
    write_dataset(root, "cityscapes", 7, 3, seed=0, size=(64, 128), processes=1)
    return root


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(None, [f"data.root={root}", f"shards.dir={out}", "data.layout=cityscapes", "data.resize=null",
                              "quantize.sample_pixels=20000", "shards.samples_per_shard=4", "shards.processes=1",
                              *extra])


def test_bad_files_are_skipped_recorded_and_counted_in_the_manifest(cityscapes_raw, tmp_path):
    root = Path(shutil.copytree(cityscapes_raw, tmp_path / "cs"))
    photos = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    truncated, not_image, gray, rgba = photos[:4]
    truncated.write_bytes(truncated.read_bytes()[:300])
    not_image.write_bytes(b"%PDF-1.4 this is not a picture\n")
    Image.open(gray).convert("L").save(gray)
    Image.open(rgba).convert("RGBA").save(rgba)
    (truncated.parent / "notes.txt").write_text("stray file")  # not a sample: ignored
    (truncated.parent / ".DS_Store").write_bytes(b"\0\1\2")
    val_mask = sorted((root / "gtFine" / "val").glob("*/*_gtFine_color.png"))[0]
    mask = np.asarray(Image.open(val_mask).convert("RGB")).copy()
    mask[10:30, 20:50] = (0, 255, 0)  # pure green: far from every Cityscapes colour and every cluster
    Image.fromarray(mask).save(val_mask)

    out = tmp_path / "out"
    summary = preprocess.run(_cfg(root, out, "data.on_bad_input=skip"))
    m = sh.load_manifest(out)
    rel = lambda p: p.relative_to(root).as_posix()
    assert [(s["path"], s["split"]) for s in m["skipped"]] == [(rel(truncated), "train"), (rel(not_image), "train")]
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons[rel(truncated)].startswith("cannot decode photo") and "truncated" in reasons[rel(truncated)]
    assert reasons[rel(not_image)] == "cannot decode photo: not an image file; expected a readable image"
    assert m["splits"]["train"]["samples"] == 5 and m["splits"]["val"]["samples"] == 3
    assert summary["skipped"] == 2 and summary["converted"] == 2  # grayscale and RGBA photos kept as RGB
    q = json.loads((out / "quantizer.json").read_text())
    centroids, far = np.asarray(q["centroids"]), q["max_distance"]

    def far_pixels(split: str) -> int:  # brute force: nearest KMeans centre farther than max_distance
        n = 0
        for f in sorted((root / "gtFine" / split).glob("*/*_gtFine_color.png")):
            px = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64).reshape(-1, 1, 3)
            n += int((np.sqrt(((px - centroids) ** 2).sum(-1)).min(1) > far).sum())
        return n

    assert m["unmatched_pixels"]["val"] == far_pixels("val") >= 20 * 30
    import webdataset as wds

    first_val = next(iter(wds.WebDataset(sh.shard_paths(out, m, "val"), shardshuffle=False)))
    label = np.asarray(Image.open(io.BytesIO(first_val["label.png"])))
    assert (label[10:30, 20:50] == IGNORE).all(), "far colours are stored as ignore"


def test_truncated_png_under_fail_is_one_error_line_naming_the_file(cityscapes_raw, tmp_path):
    root = Path(shutil.copytree(cityscapes_raw, tmp_path / "cs"))
    bad = sorted((root / "gtFine" / "train").glob("*/*_gtFine_color.png"))[2]
    bad.write_bytes(bad.read_bytes()[:200])
    proc = run([sys.executable, "-m", "unet_dist.preprocess", "--set", f"data.root={root}", "--set",
                f"shards.dir={tmp_path / 'out'}", "--set", "data.layout=cityscapes", "--set", "data.resize=null", "--set",
                "quantize.sample_pixels=5000", "--set", "shards.processes=1"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert line == proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {bad}: cannot decode colour mask") and line.endswith("expected a readable image")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_input_directory_is_one_line(tmp_path):
    proc = run([sys.executable, "-m", "unet_dist.preprocess", "--set", f"data.root={tmp_path / 'nothing'}",
                "--set", f"shards.dir={tmp_path / 'out'}"], cwd=tmp_path, check=False)
    assert_only_error(proc, f"{tmp_path / 'nothing'}: data.root not found")


# ------------------------------------------------------------------------------------ 6. security
def test_malicious_checkpoint_is_refused_and_never_runs_its_payload(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __init__(self, target: Path):
            self.target = target

        def __reduce__(self):
            return os.system, (f"touch {self.target}",)

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model": Payload(marker), "step": 1}, bad / "checkpoint.pt")
    (bad / "meta.json").write_text(json.dumps({"step": 1, "config": {}}))
    # the model is loaded before any shard is read: no shards needed to show the refusal
    proc = run([sys.executable, "-m", "unet_dist.evaluate", "--model", str(bad), "--shards", str(tmp_path)],
               cwd=tmp_path, check=False)
    assert_only_error(proc, f"{bad / 'checkpoint.pt'}: refused to load checkpoint", "GLOBAL posix.system")
    assert not marker.exists(), "weights_only=True never ran the pickled os.system call"

    torch.load(bad / "checkpoint.pt", weights_only=False)  # without weights_only the payload does run
    assert marker.exists()


def test_yaml_python_tags_are_refused_with_one_line(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    proc = run([sys.executable, "-m", "unet_dist.train", "--config", str(cfg)], cwd=tmp_path, check=False)
    assert_only_error(proc, f"{cfg}: line 1, column 8: not valid YAML", "python/object/apply:os.system")
    assert not marker.exists()


def test_package_writes_no_pickles_and_loads_only_with_weights_only():
    sources = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted((REPO / "unet_dist").rglob("*.py"))}
    forbidden = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|cloudpickle|dill|joblib|shelve|marshal)\b|"
                           r"allow_pickle\s*=\s*True|\.to_pickle\(|yaml\.(load|unsafe_load|full_load)\(|"
                           r"yaml\.(Unsafe|Full)?Loader\b", re.M)
    # strict_yaml.py is the one yaml.load: its loader is a SafeLoader that also refuses duplicate keys
    from unet_dist import strict_yaml

    assert issubclass(strict_yaml._Loader, yaml.SafeLoader) and "Loader=_Loader)" in sources["unet_dist/strict_yaml.py"]
    sources["unet_dist/strict_yaml.py"] = sources["unet_dist/strict_yaml.py"].replace("yaml.load(text, Loader=_Loader)", "")
    assert {f: forbidden.findall(s) for f, s in sources.items() if forbidden.search(s)} == {}
    loads = [(f, call) for f, s in sources.items() for call in re.findall(r"torch\.load\(([^)]*)\)", s)]
    assert loads and all("weights_only=True" in call for _, call in loads), loads
    savers = {f for f, s in sources.items() if "torch.save(" in s}
    assert savers == {"unet_dist/checkpoint/files.py", "unet_dist/serving/model_log.py"}, "torch.save only for state dicts"
    log_model = [(f, call) for f, s in sources.items()
                 for call in re.findall(r"mlflow\.\w+\.log_model\((.*?)\n\s*\)", s, re.S)]
    # The served model is "models from code": MLflow keeps a source file, never a pickled object.
    assert log_model and all('python_model=str(Path(__file__).with_name("logged_code.py"))' in call
                             for _, call in log_model), log_model


@pytest.mark.slow
def test_checkpoint_holds_only_tensors_and_plain_values(torchrun_rank_killed):
    directory = checkpoint.find_latest(torchrun_rank_killed["run_dir"]).local_path
    state = torch.load(directory / "checkpoint.pt", weights_only=True)

    def plain(x) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (bool, int, float, str, torch.Tensor))

    assert plain(state)
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.pt", "meta.json"]
    json.loads((directory / "meta.json").read_text())
