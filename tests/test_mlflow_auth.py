"""Training against a real `mlflow server --app-name basic-auth` on 127.0.0.1.

The server runs the start script of the kit's MLflow Deployment (k8s/base/mlflow.yaml): the auth
tables share the tracking store's database, the admin comes from MLFLOW_AUTH_ADMIN_*, and the jobs
log in as their own user, created by the admin through the REST API (docs/security.md). Anonymous requests are refused; a run with the
jobs' credentials logs metrics and its model; wrong credentials stop before training with one line.
"""
from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, clean_env, free_port, run, served

pytestmark = pytest.mark.slow
JOBS_USER = "unet-jobs"


def request(uri: str, path: str, *, auth: tuple[str, str] | None = None, body: dict | None = None) -> int:
    """HTTP status of one request (GET, or POST with a JSON body)."""
    req = urllib.request.Request(uri + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def manifest_script(root: Path, port: int) -> str:
    """The start script of the kit's MLflow Deployment, pointed at this machine: sqlite in place of
    the PostgreSQL URL (tracking and auth stores alike), 127.0.0.1:port, and ``root`` in place of
    the pod's volumes. Everything else (ini file, --app-name, flags) runs as written."""
    docs = yaml.safe_load_all((REPO / "k8s" / "base" / "mlflow.yaml").read_text())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    script = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    swaps = {'"postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@mlflow-postgres:5432/mlflow"': f"sqlite:///{root / 'mlflow.db'}",
             "--host 0.0.0.0": "--host 127.0.0.1", "--port 5000": f"--port {port}",
             "/tmp/basic_auth.ini": str(root / "basic_auth.ini")}
    for old, new in swaps.items():
        assert old in script, f"k8s/base/mlflow.yaml no longer has {old!r}"
        script = script.replace(old, new)
    return script


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The kit's MLflow server (its own start script) with the admin from the environment."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    admin = ("admin", secrets.token_hex(16))
    port = free_port()
    env = clean_env(MLFLOW_WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", HOME=str(root),
                    MLFLOW_ARTIFACTS_DESTINATION=str(root / "shared" / "mlflow-artifacts"),  # the Deployment's env
                    MLFLOW_AUTH_ADMIN_USERNAME=admin[0], MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
                    MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    uri = f"http://127.0.0.1:{port}"
    with served(["bash", "-c", manifest_script(root, port)], root, uri, "/health", env, timeout=120):
        jobs = (JOBS_USER, secrets.token_hex(16))
        created = request(uri, "/api/2.0/mlflow/users/create", auth=admin,
                          body={"username": jobs[0], "password": jobs[1]})
        assert created == 200, (root / "server.log").read_text()[-3000:]
        yield {"uri": uri, "admin": admin, "jobs": jobs, "root": root}


def test_anonymous_requests_are_refused_and_health_stays_open(auth_server):
    uri = auth_server["uri"]
    assert request(uri, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert request(uri, "/api/2.0/mlflow/experiments/search?max_results=1", auth=("admin", "wrong")) == 401
    assert request(uri, "/api/2.0/mlflow/users/create", auth=auth_server["jobs"],
                   body={"username": "intruder", "password": "x" * 12}) == 403, "only the admin creates users"
    assert request(uri, "/health") == 200  # the kubelet's probes carry no credentials


TINY = ["model.width=4", "model.depth=3", "train.crop=[32,32]", "train.batch_size=2", "train.loader_workers=0",
        "train.eval_every=2", "train.log_every=1", "train.warmup_steps=0", "train.checkpoint_every=2", "mlflow.system_metrics=false",
        "mlflow.experiment=auth", "mlflow.registered_model=unet-auth"]


def test_a_run_with_the_jobs_credentials_logs_metrics_and_model(auth_server, small_shards, tmp_path, monkeypatch):
    user, password = auth_server["jobs"]
    env = clean_env(MLFLOW_TRACKING_URI=auth_server["uri"], MLFLOW_TRACKING_USERNAME=user,
                    MLFLOW_TRACKING_PASSWORD=password, NPROC="1", CONFIG="jobs/configs/demo.yaml",
                    TORCHRUN=str(BIN / "torchrun"), HOME=str(tmp_path))
    sets = [f"shards.dir={small_shards}", f"train.checkpoint_dir={tmp_path / 'ckpt'}", "train.steps=2",
            "train.run_name=auth", *TINY]
    run(["bash", str(REPO / "jobs" / "torchrun_single.sh"), *sets], cwd=tmp_path, env=env, timeout=300)

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(auth_server["uri"])
    exp = client.get_experiment_by_name("auth")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2]
    assert client.get_metric_history(r.info.run_id, "val/miou")
    versions = client.search_model_versions("name='unet-auth'")
    assert versions and versions[0].run_id == r.info.run_id


@pytest.mark.parametrize("variant", ["wrong password", "no login"])
def test_wrong_credentials_stop_before_training_with_one_line(auth_server, small_shards, tmp_path, variant):
    login = {"wrong password": {"MLFLOW_TRACKING_USERNAME": JOBS_USER, "MLFLOW_TRACKING_PASSWORD": "not-it"},
             "no login": {}}[variant]
    env = clean_env(MLFLOW_TRACKING_URI=auth_server["uri"], HOME=str(tmp_path), **login)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "unet_dist.train", "--config", str(REPO / "jobs" / "configs" / "demo.yaml"),
         "--set", f"shards.dir={small_shards}", "--set", f"train.checkpoint_dir={ckpt}", "--set", "train.steps=2",
         *[a for s in TINY for a in ("--set", s)]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    variable = "MLFLOW_TRACKING_PASSWORD" if login else "MLFLOW_TRACKING_USERNAME"
    assert errors[0].startswith(f"error: {variable}: the MLflow server at {auth_server['uri']}")
    assert not ckpt.exists() and "step" not in proc.stdout, "training started"
