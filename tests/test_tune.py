"""Sweeps (python -m unet_dist.tune): sweep files checked like configs; a real sweep of 3 trials on a
private Ray, logging to a real `mlflow server`; a killed driver resumed; the `ray job submit` path.

The sweep searches the learning rate over a grid, one trial at a time, so ASHA's decisions are
deterministic: lr 1e-2 learns, lr 1e-6 cannot move from its initial score in 4 steps and is cut at
the first rung (4 steps), lr 3e-6 is judged against both.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, clean_env, run
from unet_dist import sweep as sweeps
from unet_dist import tune
from unet_dist.config import Config, load_config
from unet_dist.errors import UnetDistError
from unet_dist import checkpoint

MODEL_NAME = "unet-sweep-test"
SWEEP = {
    "name": "grid", "metric": "val/miou", "mode": "max", "num_samples": 1, "max_concurrent_trials": 1,
    "space": {"train.lr": {"grid": [1.0e-2, 1.0e-6, 3.0e-6]}},
    "asha": {"enabled": True, "grace_period": 4, "reduction_factor": 2},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}
# Enough steps after ASHA's first rungs (4, 8) that its stop reaches a weak trial while it trains:
# with 12, a trial whose steps are fast (the loop never waits on MLflow) could finish first.
STEPS = 24


def write_sweep(path: Path, **changes) -> Path:
    data = json.loads(json.dumps(SWEEP))
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- sweep files (fast)
def test_shipped_sweeps_load_against_their_base_configs():
    for name, base in (("demo.yaml", "demo.yaml"), ("cityscapes.yaml", "cityscapes.yaml")):
        s = sweeps.load_sweep(REPO / "jobs" / "sweeps" / name)
        sweeps.check_against_base(s, load_config(REPO / "jobs" / "configs" / base))
        assert set(sweeps.param_space(s)) == set(s.space)
    cityscapes = sweeps.load_sweep(REPO / "jobs" / "sweeps" / "cityscapes.yaml")
    assert cityscapes.resources.gpus_per_worker == 1 and cityscapes.max_concurrent_trials == 4


@pytest.mark.parametrize("change, message", [
    ({"epochs": 3}, r"unknown key 'epochs'"),
    ({"space": {"train.lrr": {"choice": [1]}}}, r"space 'train\.lrr': not a config key"),
    ({"space": {"train.lr": {"normal": [0, 1]}}}, r"space 'train\.lr': expected one of \{choice\|grid\|uniform\|loguniform"),
    ({"space": {"train.lr": {"loguniform": [0, 1]}}}, r"space 'train\.lr': loguniform expects low > 0"),
    ({"space": {"train.lr": {"uniform": [1, 0.5]}}}, r"space 'train\.lr': uniform expects \[low, high\] with low < high"),
    ({"space": {"model.padding": {"choice": ["same", "full"]}}}, r"'model\.padding' must be one of same\|valid"),
    ({"space": {"train.steps": {"choice": ["many"]}}}, r"key 'train\.steps' expects int"),
    ({"space": {"train.optimizer": {"uniform": [0, 1]}}}, r"uniform needs a numeric key"),
    ({"space": {"train.workers": {"choice": [1, 2]}}}, r"space 'train\.workers': set by the sweep"),
    ({"space": {}}, r"key 'space' must name at least one config key"),
    ({"metric": "val/loss"}, r"key 'metric' must be one of val/miou"),
    ({"resources__workers": 0}, r"key 'resources\.workers' must be >= 1"),
    ({"resources__gpus_per_worker": 2}, r"key 'resources\.gpus_per_worker' must be in \[0, 1\]"),
    ({"resources__cpu": 2}, r"unknown key 'resources\.cpu'"),
    ({"asha__reduction_factor": 1}, r"key 'asha\.reduction_factor' must be > 1"),
])
def test_bad_sweep_file_is_one_error_naming_file_and_key(tmp_path, change, message):
    path = write_sweep(tmp_path / "bad.yaml", **change)
    with pytest.raises(UnetDistError, match=r"bad\.yaml: .*" + message):
        sweeps.load_sweep(path)


def test_bad_sweep_file_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    path = write_sweep(tmp_path / "bad.yaml", space={"train.lrr": {"choice": [1]}})
    proc = subprocess.run([sys.executable, "-m", "unet_dist.tune", "--search", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: space 'train.lrr': not a config key "
                                                "(see `python -m unet_dist.train --help` and docs)"]


def test_impossible_resource_requests_are_refused_naming_the_key(tmp_path):
    s = sweeps.load_sweep(write_sweep(tmp_path / "s.yaml", resources={"workers": 3, "cpus_per_worker": 1}))
    with pytest.raises(UnetDistError, match=r"s\.yaml: key 'resources\.workers' .* asks 3 CPUs per trial; the Ray cluster has 2"):
        sweeps.check_cluster(s, {"CPU": 2.0})
    s = sweeps.load_sweep(write_sweep(tmp_path / "g.yaml", resources={"workers": 1, "gpus_per_worker": 1}))
    with pytest.raises(UnetDistError, match=r"g\.yaml: key 'resources\.gpus_per_worker' asks 1 GPUs .* has 0"):
        sweeps.check_cluster(s, {"CPU": 16.0})
    s = sweeps.load_sweep(write_sweep(tmp_path / "a.yaml", asha__grace_period=500))
    with pytest.raises(UnetDistError, match=r"a\.yaml: key 'asha\.grace_period' \(500\) is more than the trials' train\.steps \(100\)"):
        sweeps.check_against_base(s, load_config(None, ["train.steps=100"]))


def test_a_trial_config_is_the_base_with_its_values_and_the_sweeps_placement(tmp_path):
    s = sweeps.load_sweep(write_sweep(tmp_path / "s.yaml", space={"train.crop": {"grid": [[32, 32]]}}))
    base = load_config(None, ["train.eval_every=5", "train.checkpoint_every=7", "train.workers=8",
                              "mlflow.registered_model=keep"])
    cfg = sweeps.trial_config(base, {"train.crop": [32, 32], "train.lr": 0.5}, s, "abc_00001", "/x/trials")
    assert cfg.train.crop == [32, 32] and cfg.train.lr == 0.5 and cfg.train.workers == 1
    assert (cfg.train.checkpoint_dir, cfg.train.run_name) == ("/x/trials", "abc_00001")
    assert cfg.train.checkpoint_every == 5, "a trial checkpoints (and reports to Tune) at each evaluation"
    assert cfg.mlflow.registered_model == "" and base.mlflow.registered_model == "keep"
    assert isinstance(cfg, Config) and base.train.crop == Config().train.crop != [32, 32]


# ------------------------------------------------------------------------- real sweeps (slow)
def sets(tmp: Path, shards: Path, *extra: str) -> list[str]:
    values = [f"shards.dir={shards}", f"train.checkpoint_dir={tmp / 'ckpt'}", f"train.steps={STEPS}",
              "train.eval_every=4", "train.log_every=1", "train.warmup_steps=2", "train.batch_size=2",
              "train.crop=[32,32]", "train.loader_workers=0", "model.width=4", "model.depth=3",
              "mlflow.experiment=sweeps", f"mlflow.registered_model={MODEL_NAME}", "mlflow.system_metrics=false",
              *extra]
    return [a for v in values for a in ("--set", v)]


def sweep_cmd(tmp: Path, shards: Path, search: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unet_dist.tune", "--search", str(search), "--summary-json",
            str(tmp / "summary.json"), *sets(tmp, shards, *extra)]


def sweep_env(uri: str) -> dict[str, str]:
    return clean_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO))


def children_of(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.fixture(scope="module")
def sweep(small_shards, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    search = write_sweep(tmp / "sweep.yaml")
    proc = run(sweep_cmd(tmp, small_shards, search), cwd=tmp, env=sweep_env(mlflow_server), timeout=480)
    (tmp / "sweep.log").write_text(proc.stdout + proc.stderr)
    return {"tmp": tmp, "out": proc.stdout, "summary": json.loads((tmp / "summary.json").read_text()),
            "client": MlflowClient(mlflow_server), "shards": small_shards}


@pytest.mark.parametrize("errored, reported, step, status", [
    (False, "finished", 8, "finished"),
    (False, "running", 4, "stopped_early"),  # Tune's stop; the child run may already say FAILED
    (False, None, None, "stopped_early"),  # stopped before its first report
    (False, "non_finite_weights", 3, "failed"),  # the loop stopped it
    (True, "running", 4, "error"),
])
def test_a_trials_status_comes_from_tune_and_the_loops_last_report(errored, reported, step, status):
    assert tune.trial_status(errored, reported, step, steps=8) == status


@pytest.mark.slow
def test_asha_stops_a_weak_trial_early_and_it_keeps_its_last_checkpoint(sweep):
    rows = sweep["summary"]["trials"]
    assert len(rows) == 3 and {r["train.lr"] for r in rows} == {1e-2, 1e-6, 3e-6}
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    assert stopped, sweep["out"][-3000:]
    assert all(r["step"] < STEPS for r in stopped) and any(r["train.lr"] == 1e-6 for r in stopped)
    for r in stopped:  # the trial may train on a little while Tune's decision reaches it
        assert r["step"] <= checkpoint.read_meta(Path(r["checkpoint"]))["step"] < STEPS
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(r["step"] == STEPS for r in finished)
    assert sweep["summary"]["best"]["train.lr"] == 1e-2


@pytest.mark.slow
def test_sweep_parent_run_holds_space_results_picture_and_best_config(sweep):
    client, summary = sweep["client"], sweep["summary"]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["unet_dist.sweep"] == "grid"
    assert json.loads(parent.data.params["space.train.lr"]) == {"grid": [1e-2, 1e-6, 3e-6]}
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/search.yaml", "sweep/results.csv", "sweep/metric_vs_hyperparameters.png",
            "sweep/best_config.yaml", "sweep/base_config.yaml"} <= files
    table = client.download_artifacts(parent.info.run_id, "sweep/results.csv", str(sweep["tmp"]))
    lines = Path(table).read_text().splitlines()
    assert lines[0].startswith("trial_id,train.lr,status,step,val/miou") and len(lines) == 4
    assert parent.data.metrics["trials_stopped_early"] >= 1
    assert parent.data.metrics["best/val/miou"] == pytest.approx(summary["best"]["val/miou"])
    assert parent.data.tags["best_run_id"] == summary["best"]["mlflow_run_id"]


@pytest.mark.slow
def test_each_trial_is_a_nested_run_with_the_normal_training_record(sweep):
    client, summary = sweep["client"], sweep["summary"]
    runs = {r.data.tags["tune.trial_id"]: r for r in children_of(client, summary["parent_run_id"])}
    assert set(runs) == {r["trial_id"] for r in summary["trials"]}
    for row in summary["trials"]:
        child = runs[row["trial_id"]]
        assert child.info.run_id == row["mlflow_run_id"]
        assert float(child.data.params["train.lr"]) == row["train.lr"]
        history = [m.step for m in client.get_metric_history(child.info.run_id, "val/miou")]
        assert history == list(range(4, history[-1] + 1, 4)) and history[-1] >= row["step"], "each evaluation once"
        files = {a.path for d in ("", "eval") for a in client.list_artifacts(child.info.run_id, d or None)}
        assert {"config.yaml", "eval/predictions_step_0000004.png", "eval/confusion_step_0000004.png"} <= files
        expected = {"finished": "FINISHED", "stopped_early": "KILLED"}[row["status"]]
        assert child.info.status == expected


@pytest.mark.slow
def test_only_the_best_trials_model_is_registered_and_its_checkpoint_evaluates(sweep):
    best = sweep["summary"]["best"]
    versions = sweep["client"].search_model_versions(f"name='{MODEL_NAME}'")
    assert [v.run_id for v in versions] == [best["mlflow_run_id"]]
    assert f"best checkpoint  {best['checkpoint']}" in sweep["out"]
    proc = run([sys.executable, "-m", "unet_dist.evaluate", "--model", best["checkpoint"], "--shards",
                str(sweep["shards"]), "--json"], cwd=sweep["tmp"], env=clean_env(PYTHONPATH=str(REPO)))
    scores = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert scores["miou"] == pytest.approx(best["val/miou"], abs=1e-4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(small_shards, mlflow_server, tmp_path):
    search = write_sweep(tmp_path / "sweep.yaml", name="resume")
    cmd, env = sweep_cmd(tmp_path, small_shards, search), sweep_env(mlflow_server)
    trials = tmp_path / "ckpt" / "resume" / "trials"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # kill once the second trial has a checkpoint: the first is over, the second mid-way
        deadline = time.monotonic() + 300
        while len([d for d in trials.glob("*") if checkpoint.find_latest(d)]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its private Ray, as if the node died
        proc.wait()
        time.sleep(3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = log.read_text()
    parent = re.search(r"MLflow run (\w{32}) in experiment", first).group(1)
    done_before = {d.name: checkpoint.read_meta(checkpoint.find_latest(d))["step"] for d in trials.iterdir()
                   if checkpoint.find_latest(d)}

    again = run(cmd, cwd=tmp_path, env=env, timeout=420)
    text = again.stdout + again.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parent_run_id"] == parent and f"continuing MLflow run {parent}" in text
    assert "resuming sweep resume" in text
    assert len(summary["trials"]) == 3 and all(r["status"] != "error" for r in summary["trials"])
    # The finished trial was not trained again; a cut one went on from its checkpoint. (The kill can
    # land after ASHA stopped the second trial at its rung: then no trial needs to resume.)
    starts = re.findall(rf"training {STEPS} steps from step (\d+):", text)
    assert starts.count("0") <= 1, text[-4000:]
    for step in (s for s in starts if s != "0"):
        assert re.search(rf"resumed from .*checkpoint_step-\d+ at step {step}", text), text[-4000:]
    client = MlflowClient(mlflow_server)
    children = children_of(client, parent)
    assert len(children) == 3, "one child run per trial, none created twice"
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), f"{child.data.tags['tune.trial_id']}: a step logged twice"
    assert len(done_before) == 2


@pytest.mark.slow
def test_sweep_submitted_with_ray_job_submit_succeeds(ray_head, mlflow_server, small_shards, tmp_path):
    # An absolute sweep file: one the cluster can read (this machine is the cluster).
    search = write_sweep(tmp_path / "sweep.yaml", name="submitted", space={"train.lr": {"grid": [1.0e-2, 1.0e-3]}},
                         asha__enabled=False)
    env = clean_env(RAY_ADDRESS=ray_head["dashboard"], MLFLOW_TRACKING_URI=mlflow_server, SEARCH=str(search))
    values = [a for a in sets(tmp_path, small_shards, "train.steps=4", "mlflow.registered_model=") if a != "--set"]
    proc = run(["bash", str(REPO / "jobs" / "submit_tune.sh"), *values], cwd=tmp_path, env=env, timeout=420)
    out = proc.stdout + proc.stderr
    assert "SUCCEEDED" in out and "sweep submitted: 2 trials, 0 stopped early" in out, out[-4000:]
    best = re.search(r"best checkpoint  (\S+)", out).group(1)
    assert checkpoint.read_meta(Path(best))["step"] == 4
