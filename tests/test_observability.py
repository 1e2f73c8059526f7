"""A real Prometheus scrapes a short torchrun run and a short Ray run; PromQL over its HTTP API
returns every series of unet_dist.train.telemetry with plausible values, and each run's goodput
report adds up to its wall time.

Prometheus is Debian's `prometheus` package (.ci/run installs it), started here on 127.0.0.1 with a
generated config: one scrape job for torchrun's rank 0 (prometheus_client on prometheus.port), one
for the Ray head's metrics export port (Ray's metrics agent exports ray.util.metrics), every 0.5 s.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, clean_env, free_port, local_ray_head, run, served
from test_reliability import TINY
from unet_dist.train import goodput, telemetry

pytestmark = pytest.mark.slow
STEPS = 30
PROMETHEUS = shutil.which("prometheus")


def job_sets(tmp: Path, shards: Path, name: str, *extra: str) -> list[str]:
    pairs = [f"shards.dir={shards}", f"train.checkpoint_dir={tmp / 'ckpt'}", f"train.run_name={name}",
             f"train.steps={STEPS}", "train.checkpoint_every=10", "train.workers=2", *TINY,
             "train.eval_every=15", "train.eval_batches=1", "prometheus.linger_s=3", *extra]
    return [a for s in pairs for a in ("--set", s)]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """`prometheus` on a free port of 127.0.0.1, scraping the two targets the jobs will open."""
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run installs Debian's prometheus package")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    root = tmp_path_factory.mktemp("prometheus")
    targets = {"torchrun": free_port(), "ray": free_port()}
    scrape = [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]} for job, port in targets.items()]
    config = {"global": {"scrape_interval": "500ms", "scrape_timeout": "400ms"}, "scrape_configs": scrape}
    (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    cmd = [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with served(cmd, root, f"http://127.0.0.1:{port}", "/-/ready", clean_env(), timeout=60) as url:
        yield {"url": url, "targets": targets}


def query(prom: dict, promql: str) -> list[dict]:
    url = f"{prom['url']}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def values_over_run(prom: dict, series: str) -> list[float]:
    """Every sample Prometheus kept of ``series`` in the last 10 minutes, in time order."""
    [result] = query(prom, f"{series}[10m]")
    return [float(v) for _, v in result["values"]]


def wait_for(prom: dict, series: str, value: float, log: str, timeout: float = 20) -> None:
    """The last values of a run reach Prometheus a scrape (and, under Ray, an export) later."""
    promql, deadline = f"last_over_time({series}[10m])", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(float(r["value"][1]) == value for r in query(prom, promql)):
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql} never reached {value}: {query(prom, promql)}\n{log[-3000:]}")


def goodput_report(tmp: Path, text: str) -> goodput.Ledger:
    """The end report's ledger, as logged to MLflow (the JSON artifact of the end)."""
    run_id = re.search(r"MLflow run\s+([0-9a-f]{32})", text).group(1)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    [name] = [a.path for a in client.list_artifacts(run_id, "goodput") if a.path.endswith("_end.json")]
    data = json.loads(Path(client.download_artifacts(run_id, name, str(tmp))).read_text())
    metrics = client.get_run(run_id).data.metrics
    assert metrics["goodput/wall_s"] == pytest.approx(data["as_of"] - data["job_started_at"])
    return goodput.Ledger.from_dict(data)


@pytest.fixture(scope="module")
def runs(prometheus, small_shards, tmp_path_factory):
    """One short torchrun job and one short Ray job, one after the other, both scraped."""
    out = {}
    tmp = tmp_path_factory.mktemp("torchrun")
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "unet_dist.train",
           *job_sets(tmp, small_shards, "prom-torchrun", f"prometheus.port={prometheus['targets']['torchrun']}",
                     "prometheus.host=127.0.0.1")]
    began = time.time()
    proc = run(cmd, cwd=tmp, env=env, timeout=300)
    out["torchrun"] = {"tmp": tmp, "text": proc.stdout + proc.stderr, "began": began, "ended": time.time()}

    tmp = tmp_path_factory.mktemp("ray")
    head_env = clean_env(RAY_metrics_report_interval_ms="1000")
    with local_ray_head(head_env, tmp, ("--metrics-export-port", str(prometheus["targets"]["ray"]))) as head:
        env = clean_env(RAY_ADDRESS=head["address"], MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
        began = time.time()
        proc = run([sys.executable, "-m", "unet_dist.train", *job_sets(tmp, small_shards, "prom-ray")],
                   cwd=tmp, env=env, timeout=300)
        out["ray"] = {"tmp": tmp, "text": proc.stdout + proc.stderr, "began": began, "ended": time.time()}
        wait_for(prometheus, 'ray_unet_train_step{run="prom-ray"}', STEPS, out["ray"]["text"])
    return out


NAMES = {"torchrun": "{}", "ray": "ray_{}"}  # Ray's metrics agent prefixes its exports with ray_


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_prometheus_scrapes_every_series_with_plausible_values(prometheus, runs, launcher):
    name = NAMES[launcher].format
    labels = f'{{run="prom-{launcher}",launcher="{launcher}",rank="0"}}'
    last = {}
    for series in telemetry.SERIES:
        found = query(prometheus, f"last_over_time({name(series)}{labels}[10m])")
        assert len(found) == 1, f"{name(series)}{labels}: {found}"
        last[series] = float(found[0]["value"][1])
    steps = values_over_run(prometheus, f"{name('unet_train_step')}{labels}")
    assert steps == sorted(steps) and steps[0] < STEPS and steps[-1] == STEPS, steps  # 0 from the first step on
    assert last["unet_train_steps_total"] == STEPS
    assert max(values_over_run(prometheus, f"{name('unet_train_images_per_second')}{labels}")) > 0
    assert 0 < last["unet_train_step_seconds"] < 30
    assert 0 <= last["unet_train_data_wait_fraction"] <= 1
    assert 0 < last["unet_checkpoint_write_seconds"] < 60 and 0 < last["unet_evaluation_seconds"] < 60
    assert last["unet_job_restarts"] == last["unet_job_preemptions"] == last["unet_tracking_spool_depth"] == 0
    assert 0 < last["unet_goodput_fraction"] <= 1


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_goodput_report_adds_up_to_the_wall_time_from_the_launch(runs, launcher):
    r = runs[launcher]
    assert f"goodput at the end (finished) at step {STEPS}:" in r["text"]
    assert re.search(r"goodput\s+\d+\.\d% of \d+\.\d s \(lost: ", r["text"]), "one line in the training summary"
    led = goodput_report(r["tmp"], r["text"])
    assert abs(sum(led.seconds.values()) - led.wall) <= 0.01 * led.wall, led
    # wall time runs from the launch: the torchrun agent or the Ray driver this test started
    assert r["began"] - 1.5 <= led.job_started_at <= r["began"] + 5 and led.as_of <= r["ended"] + 0.5
    assert led.seconds["productive"] > 0 and led.seconds["startup"] > 0
    assert led.seconds["checkpoint"] > 0 and led.seconds["evaluation"] > 0
    assert led.seconds["restarts"] == led.seconds["recomputed"] == 0 and led.attempts == 1
