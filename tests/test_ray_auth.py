"""Ray token authentication, end to end against a real `ray start --head` with RAY_AUTH_MODE=token.

Without the token the job server refuses a submission; jobs/submit_ray.sh with the token trains
for real; a refused or missing token reaches the user as one `error: RAY_AUTH_TOKEN: ...` line.
Every process gets a temporary HOME, so the machine's ~/.ray/auth_token is never read or written.
"""
from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, REPO, clean_env, local_ray_head, run

SUBMIT = REPO / "jobs" / "submit_ray.sh"


def token_env(home: Path, **extra: str) -> dict[str, str]:
    """The job environment with a private HOME and no token unless given in ``extra``."""
    env = clean_env(HOME=str(home), **extra)
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(name, None)
    env.update(extra)
    return env


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return lines[0]


def test_submit_ray_without_any_token_stops_before_contacting_the_cluster(tmp_path):
    """Token auth is the default: no token anywhere is one line naming RAY_AUTH_TOKEN, exit 2."""
    proc = subprocess.run(["bash", str(SUBMIT)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=token_env(tmp_path, RAY_ADDRESS="http://127.0.0.1:9"))
    assert one_error_line(proc).startswith("error: RAY_AUTH_TOKEN: no Ray token")


def test_submit_ray_rejects_an_unknown_auth_mode(tmp_path):
    proc = subprocess.run(["bash", str(SUBMIT)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=token_env(tmp_path, RAY_AUTH_MODE="off"))
    assert one_error_line(proc).startswith("error: RAY_AUTH_MODE=off: expected token or disabled")


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A real Ray head with token authentication, its token only in this fixture's environment."""
    home = tmp_path_factory.mktemp("ray-auth-home")
    token = secrets.token_hex(32)
    env = token_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    machine_token = Path.home() / ".ray" / "auth_token"
    before = machine_token.stat().st_mtime_ns if machine_token.exists() else None
    with local_ray_head(env, home) as head:
        yield {"dashboard": head["dashboard"], "token": token, "home": home}
    assert (machine_token.stat().st_mtime_ns if machine_token.exists() else None) == before, \
        "the machine's ~/.ray/auth_token was touched"


@pytest.mark.slow
@pytest.mark.parametrize("mode, token", [("disabled", None), ("token", "0" * 64)])
def test_ray_job_submit_without_the_cluster_token_is_refused(token_head, tmp_path, mode, token):
    extra = {"RAY_AUTH_MODE": mode, **({"RAY_AUTH_TOKEN": token} if token else {})}
    proc = run([str(BIN / "ray"), "job", "submit", "--address", token_head["dashboard"], "--", "echo", "ran"],
               cwd=tmp_path, env=token_env(tmp_path, **extra), timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "AuthenticationError" in out, out[-3000:]
    assert "ran\n" not in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode, token, says", [
    ("disabled", None, "requires a token and none was sent"),
    ("token", "0" * 64, "refused the token"),
])
def test_submit_ray_turns_a_refusal_into_one_line(token_head, tmp_path, mode, token, says):
    extra = {"RAY_AUTH_MODE": mode, "RAY_ADDRESS": token_head["dashboard"], **({"RAY_AUTH_TOKEN": token} if token else {})}
    proc = subprocess.run(["bash", str(SUBMIT), "train.steps=1"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=token_env(tmp_path, **extra))
    line = one_error_line(proc)
    assert line.startswith("error: RAY_AUTH_TOKEN: ") and says in line and token_head["dashboard"] in line


@pytest.mark.slow
def test_submit_ray_with_the_token_file_trains_a_tiny_model(token_head, small_shards, tmp_path):
    """The token from $HOME/.ray/auth_token (a private HOME), RAY_AUTH_MODE left to its default."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token_file = home / ".ray" / "auth_token"
    token_file.write_text(token_head["token"])
    token_file.chmod(0o600)
    ckpt = tmp_path / "ckpt"
    sets = [f"shards.dir={small_shards}", f"train.checkpoint_dir={ckpt}", "train.steps=2", "train.workers=2",
            "train.run_name=ray-auth", "train.checkpoint_every=2", "train.eval_every=2", "train.batch_size=2",
            "train.crop=[32,32]", "train.loader_workers=0", "model.width=4", "model.depth=3",
            "train.log_every=1", "train.warmup_steps=0", "mlflow.experiment=ray-auth"]
    env = token_env(home, RAY_ADDRESS=token_head["dashboard"], CONFIG="jobs/configs/demo.yaml",
                    MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = run(["bash", str(SUBMIT), *sets], cwd=tmp_path, env=env, timeout=420)
    assert "SUCCEEDED" in proc.stdout + proc.stderr
    assert any(ckpt.rglob("*")), "the job wrote no checkpoint"
    # The token travelled in the request header only: the job's runtime env never held it.
    listing = run([str(BIN / "ray"), "job", "list", "--address", token_head["dashboard"]], cwd=tmp_path,
                  env=token_env(home, RAY_AUTH_MODE="token"), timeout=120)
    assert "ray-auth" in listing.stdout + listing.stderr or listing.returncode == 0
    assert token_head["token"] not in listing.stdout + listing.stderr
