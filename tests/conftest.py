"""Shared fixtures: real processes only (a Ray head, an MLflow server, torchrun) on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child jobs: this venv first on PATH, no inherited MLflow/Ray targets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def make_shards(workdir: Path, *, train: int = 24, val: int = 8, size: int = 64, extra: tuple[str, ...] = ()) -> Path:
    """Synthetic pairs data -> shards, through the real CLIs. Returns the shards dir."""
    data, out = workdir / "raw", workdir / "shards"
    run([sys.executable, "-m", "unet_dist.synth", "--layout", "pairs", "--out", str(data),
         "--train", str(train), "--val", str(val), "--seed", "0"], cwd=workdir)
    run([sys.executable, "-m", "unet_dist.preprocess", "--set", f"data.root={data}", "--set", f"shards.dir={out}",
         "--set", f"data.resize=[{size},{size}]", "--set", "shards.samples_per_shard=8", *extra], cwd=workdir)
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A tiny synthetic dataset shared by the training tests (24 train / 8 val at 64x64)."""
    return make_shards(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite + artifacts on disk) on a free port of 127.0.0.1."""
    yield from serve_mlflow(tmp_path_factory.mktemp("mlflow"))


def serve_mlflow(root: Path):
    """Run `mlflow server` on 127.0.0.1 with its stores under ``root``; yield its URI, then stop it."""
    port = free_port()
    yield from serve_http(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        f"http://127.0.0.1:{port}", root, clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))


def serve_http(cmd: list[str], uri: str, root: Path, env: dict[str, str]):
    """Start a server process (log in ``root``), wait for ``uri``/health, yield ``uri``, then stop it."""
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:  # also when the caller closes the generator early
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real local Ray head (`ray start --head` on 127.0.0.1, auth disabled explicitly)."""
    tmp = tmp_path_factory.mktemp("ray")
    port, dash = free_port(), free_port()
    env = clean_env()
    run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         "--disable-usage-stats"], cwd=tmp, env=env, timeout=180)
    yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    run([str(BIN / "ray"), "stop", "--force"], cwd=tmp, env=env, timeout=120, check=False)
