"""Small helpers for jobs/submit_ray.sh that the `ray job` CLI does not offer.

``runtime-env FILE``: print the runtime env of FILE as JSON, with the variables named in
$FORWARD_ENV copied in from this shell (so a job logs to the MLflow server the submitter chose).
Names that look like credentials are refused: runtime env values are shown in the Ray dashboard.

``check --address A``: reach the job server once, before uploading anything, and turn a refused
token or an unreachable server into one line naming the variable to fix (`ray job submit` prints
a traceback and a paragraph).

``wait --address A ID``: wait until job ID reaches a terminal state, print it, and exit 0 only
for SUCCEEDED (`ray job submit` also exits 0 for STOPPED, or when its log stream drops).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

# CONNECTION_STRING: Azure's carries the account key.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|CONNECTION_STRING|(^|_)KEY($|_)", re.IGNORECASE)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def render_runtime_env(path: Path, environ: dict[str, str], forward: list[str]) -> dict:
    """The runtime env in ``path`` with ``env_vars`` updated from ``environ`` for ``forward``."""
    try:
        runtime_env = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        fail(f"{path}: cannot read the runtime env ({str(e).splitlines()[0]})")
    if not isinstance(runtime_env, dict):
        fail(f"{path}: expected a mapping at the top level")
    for key in ("pip", "uv", "conda", "container", "image_uri"):
        if key in runtime_env:
            fail(f"{path}: key '{key}' is not used here: the image carries every dependency")
    env_vars = dict(runtime_env.get("env_vars") or {})
    for name in forward:
        if SECRET_NAME.search(name):
            fail(f"FORWARD_ENV: '{name}' looks like a credential; give it to the cluster's nodes instead")
        if environ.get(name):
            env_vars[name] = environ[name]
    bad = [k for k, v in env_vars.items() if not isinstance(v, str)]
    if bad:
        fail(f"{path}: env_vars values must be strings (quote them): {', '.join(bad)}")
    runtime_env["env_vars"] = env_vars
    return runtime_env


def check_job_server(address: str) -> None:
    """Fail with one line unless the job server at ``address`` answers and accepts our token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address)
    except AuthenticationError as e:
        mode = os.environ.get("RAY_AUTH_MODE", "")
        if "invalid" in str(e).lower():
            fail(f"RAY_AUTH_TOKEN: the Ray job server at {address} refused the token: it is not this cluster's token")
        fail(f"RAY_AUTH_TOKEN: the Ray job server at {address} requires a token and none was sent "
             f"(RAY_AUTH_MODE={mode or 'unset'}): set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    except ConnectionError as e:
        fail(f"RAY_ADDRESS: cannot reach the Ray job server at {address} ({str(e).splitlines()[0]})")


def wait_for_job(address: str, submission_id: str, poll_s: float, timeout_s: float) -> str:
    """Poll the job server until the job ends; return its final status name."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while True:
        status = str(getattr(client.get_job_status(submission_id), "value", ""))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return f"{status or 'UNKNOWN'} (gave up waiting after {timeout_s:g}s)"
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("runtime-env", help="print the runtime env as JSON")
    env.add_argument("file", type=Path)
    check = sub.add_parser("check", help="reach the job server; one-line error if it refuses us")
    check.add_argument("--address", required=True)
    wait = sub.add_parser("wait", help="wait for a job to end; exit 0 only if it SUCCEEDED")
    wait.add_argument("--address", required=True)
    wait.add_argument("--poll", type=float, default=5.0, help="seconds between status checks")
    wait.add_argument("--timeout", type=float, default=0.0, help="seconds; 0 waits forever")
    wait.add_argument("submission_id")
    args = parser.parse_args(argv)

    if args.command == "runtime-env":
        forward = os.environ.get("FORWARD_ENV", "MLFLOW_TRACKING_URI").split()
        print(json.dumps(render_runtime_env(args.file, dict(os.environ), forward), sort_keys=True))
        return 0
    if args.command == "check":
        check_job_server(args.address)
        return 0
    status = wait_for_job(args.address, args.submission_id, args.poll, args.timeout)
    print(f"Ray job {args.submission_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
