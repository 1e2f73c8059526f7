"""The tracking writer: the loop's MLflow calls never wait on the server; what the server has not
taken waits in the spool beside the checkpoints and reaches the run later, once.

Servers here are real: a port nobody listens on (refused), a socket that takes connections and never
answers (hung), and a real `mlflow server` (the session's) to deliver to. The jobs that keep training
through an outage are in tests/test_tracking_outage.py.
"""
from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import clean_env, free_port
from unet_dist import storage
from unet_dist.config import load_config
from unet_dist.tracking import RunLogger, start_run, spool

RUN_ID = "f" * 32  # a run on a server that never answers


@pytest.fixture
def bounded(monkeypatch):
    """What a training process runs with (tracking.bounded_requests), set here so this test
    process's environment is restored afterwards."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def config(uri: str, *extra: str):
    """A close waits 2 s at most for a server that does not answer (mlflow.flush_timeout_s)."""
    return load_config(None, [f"mlflow.tracking_uri={uri}", "mlflow.system_metrics=false", "model.width=2",
                              "model.depth=3", "mlflow.flush_timeout_s=2", *extra])


def log_steps(logger: RunLogger, steps: range) -> None:
    for step in steps:
        logger.metrics({"train/loss": 1.0 / step, "train/lr": 0.001}, step)


def spooled(run_dir: Path) -> tuple[dict, list[dict]]:
    return spool.read(storage.location(str(run_dir)) / spool.FOLDER)


def test_records_wait_in_the_spool_in_order_while_the_server_refuses(tmp_path, bounded):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: every connection is refused
    logger = RunLogger(config(uri), RUN_ID, resumed=False, spool_dir=str(tmp_path))
    log_steps(logger, range(1, 101))
    logger.image(Image.new("RGB", (8, 4), (255, 0, 0)), "eval/red.png")
    logger.text("hello", "notes/hello.txt")
    closed = logger.close()

    header, records = spooled(tmp_path)
    assert closed.pending == len(records) == 103 and closed.model_uri is None
    assert header == {"run_id": RUN_ID, "tracking_uri": uri}
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert [r["step"] for r in records if r["kind"] == "metrics"] == list(range(1, 101))
    picture = next(r for r in records if r["kind"] == "file" and r["path"] == "eval/red.png")
    assert Image.open(io.BytesIO(base64.b64decode(picture["b64"]))).getpixel((0, 0)) == (255, 0, 0)
    assert records[-1] == {"seq": records[-1]["seq"], "kind": "end", "status": "FINISHED"}


def test_logging_calls_return_at_once_while_the_server_hangs(tmp_path, bounded):
    """A server that takes the connection and never answers (SIGSTOPped, or a dead pod behind a
    Service): each request would wait 30 s, the calls do not."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel completes the handshakes; nobody ever reads
    try:
        logger = RunLogger(config(f"http://127.0.0.1:{hung.getsockname()[1]}"), RUN_ID, resumed=False,
                           spool_dir=str(tmp_path))
        t0 = time.monotonic()
        log_steps(logger, range(1, 1001))
        logger.tags({"phase": "hung"})
        called_s = time.monotonic() - t0
        closed = logger.close()
    finally:
        hung.close()
    assert called_s < 10, f"1001 logging calls took {called_s:.1f} s: they waited on the server"
    assert closed.pending == 1002 and len(spooled(tmp_path)[1]) == 1002


def test_bad_spool_segment_is_one_line_naming_it(tmp_path):
    folder = tmp_path / spool.FOLDER
    folder.mkdir()
    (folder / "000000000001-000000000002.jsonl").write_text("not json\n")
    proc = subprocess.run([sys.executable, "-m", "unet_dist.tracking", "sync", str(tmp_path)],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "000000000001-000000000002.jsonl: not a tracking spool segment" in proc.stderr


def test_sync_of_a_run_dir_that_is_not_there_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unet_dist.tracking", "sync", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "nope" in proc.stderr


# ------------------------------------------------------------------ delivering, with a real server
def metric_steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_sync_delivers_a_spool_once_even_when_part_of_it_had_arrived(mlflow_server, tmp_path, bounded):
    cfg = config(mlflow_server, "mlflow.experiment=spool-sync")
    run_id = start_run(cfg, resume_run_id=None, tags={})
    client = MlflowClient(mlflow_server)
    dead = f"http://127.0.0.1:{free_port()}"
    logger = RunLogger(config(dead), run_id, resumed=False, spool_dir=str(tmp_path))
    log_steps(logger, range(1, 61))
    logger.text("late", "notes/late.txt")
    assert logger.close().pending == 62
    log_steps(RunLogger(cfg, run_id, resumed=True, spool_dir=str(tmp_path / "other")), range(1, 21))
    deadline = time.monotonic() + 60
    while metric_steps(client, run_id) != list(range(1, 21)):  # these arrived before a crash
        assert time.monotonic() < deadline, metric_steps(client, run_id)
        time.sleep(0.2)

    sync = [sys.executable, "-m", "unet_dist.tracking", "sync", str(tmp_path), "--tracking-uri", mlflow_server]
    first = subprocess.run(sync, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert first.returncode == 0, first.stderr
    assert f"records delivered to run {run_id}" in first.stdout
    assert metric_steps(client, run_id) == list(range(1, 61))  # each step once
    assert client.get_run(run_id).info.status == "FINISHED"  # the spooled end, after everything before it
    assert "notes/late.txt" in [a.path for a in client.list_artifacts(run_id, "notes")]
    assert spooled(tmp_path)[1] == []

    again = subprocess.run(sync, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert again.returncode == 0 and "nothing spooled" in again.stdout, again.stderr
    assert metric_steps(client, run_id) == list(range(1, 61))


@pytest.mark.slow
def test_a_resumed_writer_delivers_the_earlier_attempts_spool_first(mlflow_server, tmp_path, bounded):
    cfg = config(mlflow_server, "mlflow.experiment=spool-resume")
    run_id = start_run(cfg, resume_run_id=None, tags={})
    client = MlflowClient(mlflow_server)
    earlier = RunLogger(config(f"http://127.0.0.1:{free_port()}"), run_id, resumed=False, spool_dir=str(tmp_path))
    log_steps(earlier, range(1, 31))
    assert earlier.close("KILLED").pending == 31  # the attempt ended during the outage

    resumed = RunLogger(cfg, run_id, resumed=True, spool_dir=str(tmp_path))
    log_steps(resumed, range(21, 41))  # the resume repeats the steps after its checkpoint (20)
    closed = resumed.close()
    assert closed.pending == 0
    assert metric_steps(client, run_id) == list(range(1, 41))
    assert client.get_run(run_id).info.status == "FINISHED"  # not the earlier attempt's KILLED
    assert spooled(tmp_path)[1] == []
