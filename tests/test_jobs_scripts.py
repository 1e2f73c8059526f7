"""The launch scripts and job configs in jobs/: help, syntax, the commands they build, real configs.

The scripts run for real with DRY_RUN=1, which prints the exact command (shell-quoted) instead of
starting torchrun or a Ray job; submitting to a live Ray head is covered by the Ray tests.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unet_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
SCRIPTS = sorted(p.name for p in JOBS.glob("*.sh") if p.name != "lib.sh")
CONFIGS = sorted(p.name for p in (JOBS / "configs").glob("*.yaml"))


def script(name: str, *args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "NNODES", "NODE_RANK", "MASTER_"))}
    base.update({"PYTHON": sys.executable, "HOME": str(cwd)})
    base.update(env or {})
    return subprocess.run(["bash", str(JOBS / name), *args], capture_output=True, text=True, env=base, cwd=cwd, timeout=60)


def dry(name: str, *args: str, **env: str) -> list[str]:
    proc = script(name, *args, env={"DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", SCRIPTS + ["lib.sh"])
def test_every_script_passes_a_bash_syntax_check_and_is_strict(name):
    proc = subprocess.run(["bash", "-n", str(JOBS / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if name != "lib.sh":
        text = (JOBS / name).read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
        assert os.access(JOBS / name, os.X_OK), f"jobs/{name} is not executable"


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_script_has_help_that_exits_zero(name, flag):
    proc = script(name, flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:") and f"jobs/{name}" in proc.stdout.splitlines()[0]
    assert "DRY_RUN" in proc.stdout or "jobs/submit_ray.sh" in proc.stdout  # knobs listed, or where they are


@pytest.mark.parametrize("name", CONFIGS)
def test_every_job_config_loads_with_the_real_config_loader(name):
    cfg = load_config(JOBS / "configs" / name)
    assert cfg.model.num_classes == 19


def test_cityscapes_config_is_the_8_gpu_recipe():
    cfg = load_config(JOBS / "configs" / "cityscapes.yaml")
    assert (cfg.data.layout, cfg.data.label_source) == ("cityscapes", "labelIds")
    assert cfg.train.crop == [512, 1024]
    assert (cfg.model.width, cfg.model.depth, cfg.model.padding, cfg.model.batch_norm) == (64, 5, "same", True)
    assert (cfg.train.precision, cfg.train.channels_last) == ("bf16", True)
    assert (cfg.train.workers, cfg.train.use_gpu, cfg.train.loader_workers) == (8, True, 3)
    assert cfg.train.cpus_per_worker > cfg.train.loader_workers
    for path in (cfg.data.root, cfg.shards.dir, cfg.train.checkpoint_dir):
        assert path.startswith("/mnt/shared/")


def test_pairs_config_quantizes_mask_colours_with_kmeans():
    cfg = load_config(JOBS / "configs" / "pairs.yaml")
    assert (cfg.data.layout, cfg.data.label_source, cfg.data.resize) == ("pairs", "color", None)
    assert cfg.quantize.k >= 29  # at least as many clusters as palette colours


def test_key_value_arguments_become_set_overrides():
    cmd = dry("preprocess.sh", "train.steps=5", "--set", "data.resize=[64, 64]", "shards.dir=/tmp/x")
    assert cmd == [sys.executable, "-m", "unet_dist.preprocess", "--config", "jobs/configs/pairs.yaml",
                   "--set", "train.steps=5", "--set", "data.resize=[64, 64]", "--set", "shards.dir=/tmp/x"]


def test_a_missing_config_is_one_line_error_with_exit_2(tmp_path):
    proc = script("preprocess.sh", env={"CONFIG": str(tmp_path / "nope.yaml"), "DRY_RUN": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: CONFIG=") and proc.stderr.count("\n") == 1


def test_torchrun_single_runs_one_standalone_node_with_restarts():
    cmd = dry("torchrun_single.sh", "train.steps=10", NPROC="2", MAX_RESTARTS="1")
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    assert cmd[4:] == ["-m", "unet_dist.train", "--config", "jobs/configs/pairs.yaml", "--set", "train.steps=10"]
    assert dry("torchrun_single.sh")[2:4] == ["--nproc-per-node=auto", "--max-restarts=3"]


def test_torchrun_multi_uses_a_c10d_rendezvous_on_the_master():
    cmd = dry("torchrun_multi.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", RUN_ID="r7")
    assert cmd[0] == "torchrun"
    flags = cmd[1:cmd.index("-m")]
    assert {"--nnodes=2", "--node-rank=1", "--nproc-per-node=auto", "--rdzv-backend=c10d",
            "--rdzv-endpoint=node0:29500", "--rdzv-id=r7", "--max-restarts=3", "--rdzv-conf=is_host=false"} == set(flags)
    assert cmd[cmd.index("-m"):] == ["-m", "unet_dist.train", "--config", "jobs/configs/cityscapes.yaml"]


def test_torchrun_multi_hosts_the_rendezvous_on_node_rank_0_whatever_its_host_name_resolves_to():
    """torchrun guesses is_host from the host name, which fails on hosts with several NICs."""
    first = dry("torchrun_multi.sh", NNODES="2", NODE_RANK="0", MASTER_ADDR="10.0.0.5")
    assert "--rdzv-conf=is_host=true" in first and "--local-addr=10.0.0.5" in first
    assert "--rdzv-conf=is_host=false" in dry("torchrun_multi.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.5")


@pytest.mark.parametrize("missing", ["NNODES", "NODE_RANK", "MASTER_ADDR"])
def test_torchrun_multi_refuses_to_start_without_its_rendezvous_settings(missing):
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0", "DRY_RUN": "1"}
    del env[missing]
    proc = script("torchrun_multi.sh", env=env)
    assert proc.returncode == 2 and f"{missing} is not set" in proc.stderr and not proc.stdout


def _submit_parts(cmd: list[str]) -> tuple[dict, list[str], dict]:
    head, entry = cmd[:cmd.index("--")], cmd[cmd.index("--") + 1:]
    opts = {}
    i = 3
    while i < len(head):
        if i + 1 < len(head) and not head[i + 1].startswith("--"):
            opts[head[i]] = head[i + 1]
            i += 2
        else:
            opts[head[i]] = True
            i += 1
    return opts, entry, json.loads(opts["--runtime-env-json"])


def test_submit_ray_uploads_the_repo_and_runs_the_train_entry_point(tmp_path):
    cmd = dry("submit_ray.sh", "--submission-id", "job-1", "train.steps=3",
              RAY_ADDRESS="http://head:8265", MLFLOW_TRACKING_URI="http://mlflow.example:5000")
    assert cmd[:3] == ["ray", "job", "submit"]
    opts, entry, runtime_env = _submit_parts(cmd)
    assert opts["--address"] == "http://head:8265" and opts["--submission-id"] == "job-1"
    assert opts["--working-dir"] == str(REPO) and "--no-wait" not in opts
    assert entry == ["python", "-m", "unet_dist.train", "--config", "jobs/configs/pairs.yaml", "--set", "train.steps=3"]
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert not {"pip", "conda", "uv"} & set(runtime_env)


def test_submit_preprocess_ray_reserves_a_cpu_and_can_return_at_once():
    cmd = dry("submit_preprocess_ray.sh", "--no-wait", CONFIG="jobs/configs/cityscapes.yaml")
    opts, entry, _ = _submit_parts(cmd)
    assert opts["--no-wait"] is True and opts["--entrypoint-num-cpus"] == "1"
    assert opts["--address"] == "http://127.0.0.1:8265"
    assert opts["--submission-id"].startswith("unet-preprocess-")
    assert entry == ["python", "-m", "unet_dist.preprocess", "--config", "jobs/configs/cityscapes.yaml"]


def test_submit_ray_rejects_a_config_that_would_not_be_uploaded():
    proc = script("submit_ray.sh", env={"CONFIG": "elsewhere/x.yaml", "DRY_RUN": "1"})
    assert proc.returncode == 2 and "CONFIG=elsewhere/x.yaml" in proc.stderr


def test_runtime_env_keeps_its_defaults_without_a_forwarded_uri():
    runtime_env = json.loads(subprocess.run(
        [sys.executable, str(JOBS / "ray" / "job_tool.py"), "runtime-env", str(JOBS / "ray" / "runtime_env.yaml")],
        capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}).stdout)
    base = yaml.safe_load((JOBS / "ray" / "runtime_env.yaml").read_text())
    assert runtime_env == base
    assert base["working_dir"] == "." and "/data" in base["excludes"] and "data" not in base["excludes"]
    assert all(isinstance(v, str) for v in base["env_vars"].values())


@pytest.mark.parametrize("secret", ["AWS_SECRET_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_KEY"])
def test_runtime_env_refuses_to_forward_credentials(secret):
    proc = subprocess.run(
        [sys.executable, str(JOBS / "ray" / "job_tool.py"), "runtime-env", str(JOBS / "ray" / "runtime_env.yaml")],
        capture_output=True, text=True, env={**os.environ, "FORWARD_ENV": f"MLFLOW_TRACKING_URI {secret}"})
    assert proc.returncode == 2 and secret in proc.stderr and not proc.stdout


# Each script's variables, wrong in every way a tired hand types them: one line naming the variable,
# exit code 2, nothing run (DRY_RUN=1 would otherwise print the command).
MULTI = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0"}
BAD_VARIABLES = [
    ("torchrun_single.sh", {}, "NPROC", ["abc", "0", "-1", "2.5"]),  # empty: the default, auto
    ("torchrun_single.sh", {}, "MAX_RESTARTS", ["-1", "x", "1e3"]),
    ("torchrun_single.sh", {}, "DRY_RUN", ["yes", "true"]),
    ("torchrun_multi.sh", MULTI, "NNODES", ["0", "two", "3:2", "1:", "-2"]),
    ("torchrun_multi.sh", MULTI, "NODE_RANK", ["-1", "x", "2", "9"]),
    ("torchrun_multi.sh", MULTI, "MASTER_ADDR", ["node0:29500", "a b", "http://node0"]),
    ("torchrun_multi.sh", MULTI, "MASTER_PORT", ["0", "65536", "http"]),
    ("torchrun_multi.sh", MULTI, "RUN_ID", ["a/b", "x y", "-r"]),
    ("torchrun_multi.sh", MULTI, "IS_HOST", ["yes", "1"]),
    ("torchrun_multi.sh", MULTI, "NPROC", ["abc", "0"]),
    ("torchrun_multi.sh", MULTI, "LOCAL_ADDR", ["a b", "10.0.0.1:1"]),
    ("submit_ray.sh", {}, "RAY_ADDRESS", ["10.0.0.1:6379", "localhost", "http://"]),
    ("submit_ray.sh", {}, "ENTRYPOINT_NUM_CPUS", ["x", "-1"]),
    ("submit_ray.sh", {}, "ENTRYPOINT_NUM_GPUS", ["one"]),
    ("submit_ray.sh", {}, "SUBMISSION_ID", ["a b", "a/b"]),
    ("submit_ray.sh", {}, "FORWARD_ENV", ["A,B", "1X"]),
    ("submit_ray.sh", {}, "RAY_AUTH_MODE", ["off"]),
]


@pytest.mark.parametrize("name, env, variable, value",
                         [(n, e, v, x) for n, e, v, values in BAD_VARIABLES for x in values])
def test_a_bad_script_variable_is_one_line_naming_it_and_nothing_runs(name, env, variable, value):
    proc = script(name, env={**env, "DRY_RUN": "1", variable: value})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"error: {variable}=")
    assert not proc.stdout


def test_a_missing_program_is_named_before_anything_runs(tmp_path):
    proc = script("torchrun_single.sh", env={"TORCHRUN": "torchrun-not-installed"})
    assert proc.returncode == 2 and proc.stderr == "error: TORCHRUN=torchrun-not-installed: no such program on PATH\n"


def test_torchrun_scripts_check_the_config_once_before_torchrun_starts_any_rank(tmp_path):
    """A bad key would otherwise fail in every rank, and torchrun then prints its own traceback."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = script("torchrun_single.sh", "train.steps=10", env={"TORCHRUN": torchrun, "NPROC": "2"})
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr == ("error: --set train.steps: key 'train.log_every' must be <= train.steps, "
                           "got train.log_every=25, train.steps=10\n")
    multi = script("torchrun_multi.sh", "train.lr=0", env={"TORCHRUN": torchrun, **MULTI})
    assert multi.returncode == 2 and multi.stderr == "error: --set train.lr: key 'train.lr' must be > 0, got 0\n"


@pytest.mark.slow  # imports torch in a subprocess (~5 s); the same check runs in-process in test_input_fuzz.py
def test_torchrun_scripts_refuse_use_gpu_on_a_machine_without_cuda_before_any_rank_starts():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = script("torchrun_single.sh", env={"TORCHRUN": torchrun, "CONFIG": "jobs/configs/cityscapes.yaml",
                                             "NPROC": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: train.use_gpu: true, but this torch (")
    assert proc.stderr.count("\n") == 1 and "built without CUDA" in proc.stderr
