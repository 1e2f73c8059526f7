"""Goodput accounting without processes: a clock whose phases cover every instant, ledgers joined
across attempts (restarts, recomputed work) that still add up to the job's wall time, the beacon
written off the step path, and the Prometheus series served by prometheus_client.

The same accounting on real runs with a preemption and a killed worker is checked in
tests/test_preemption.py and tests/test_reliability.py; scraped by a real Prometheus in
tests/test_observability.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import free_port
from unet_dist.train import goodput, telemetry
from unet_dist.train.goodput import BUCKETS, Clock, Ledger, before_attempt
from unet_dist.train.observer import BeaconWriter


def ledger(job: float, as_of: float, step: int = 0, ended: str | None = None, attempts: int = 1, **seconds) -> Ledger:
    """A ledger whose buckets add up to its wall time: what is not given is productive."""
    s = {b: 0.0 for b in BUCKETS} | seconds
    s["productive"] += (as_of - job) - sum(s.values())
    return Ledger(job_started_at=job, as_of=as_of, step=step, attempts=attempts, ended=ended, seconds=s)


def adds_up(led: Ledger, within: float = 0.01) -> bool:
    return abs(sum(led.seconds.values()) - led.wall) <= within * max(led.wall, 1e-9)


def test_a_first_attempt_charges_its_start_up_from_the_launch():
    first = before_attempt(None, None, launched_at=100.0, started_at=107.5)
    assert first.job_started_at == 100.0 and first.seconds["startup"] == 7.5 and adds_up(first, 1e-12)
    assert first.attempts == 1 and first.failures == first.preemptions == 0


def test_clock_phases_cover_every_instant_and_add_up_to_the_wall_time():
    clock = Clock(started_at=time.time() - 0.2, launched_at=time.time() - 0.5)
    clock.switch("productive")
    with clock.timed("data_wait"):
        time.sleep(0.02)
    time.sleep(0.03)
    with clock.timed("evaluation"):
        time.sleep(0.02)
        with clock.timed("checkpoint"):
            time.sleep(0.01)
    assert clock.phase == "productive"
    snap = clock.snapshot(step=3)
    assert adds_up(snap, 0.001), snap
    assert snap.seconds["startup"] >= 0.45 and snap.seconds["data_wait"] >= 0.02
    assert snap.seconds["checkpoint"] >= 0.01 and 0.02 <= snap.seconds["evaluation"] < 0.02 + 0.01 + 0.02


def test_work_after_the_last_checkpoint_is_recomputed_and_the_gap_is_restarts():
    """Attempt 1 checkpointed at t=60 (step 50), was last seen at t=90 (step 80), then died;
    attempt 2 starts at t=130."""
    kept = ledger(0, 60, step=50, startup=10, data_wait=5, checkpoint=3, evaluation=2)
    last = ledger(0, 90, step=80, startup=10, data_wait=8, checkpoint=3, evaluation=4)
    base = before_attempt(kept, last, launched_at=125, started_at=130)
    assert base.as_of == 130 and base.step == 50 and adds_up(base, 1e-9)
    assert base.seconds["recomputed"] == pytest.approx(30)  # everything attempt 1 did after t=60
    assert base.seconds["restarts"] == pytest.approx(40)  # t=90 .. 130
    assert base.seconds["productive"] == kept.seconds["productive"]  # only the kept steps
    assert (base.attempts, base.failures, base.preemptions) == (2, 1, 0)


def test_a_preempted_attempt_loses_no_work_and_counts_as_a_preemption():
    kept = ledger(0, 60, step=50, startup=10)
    last = ledger(0, 62, step=50, startup=10, checkpoint=1.5, other=0.5, ended="preempted")
    base = before_attempt(kept, last, launched_at=300, started_at=302)
    assert base.seconds["recomputed"] == 0 and base.seconds["checkpoint"] == pytest.approx(1.5)
    assert base.seconds["restarts"] == pytest.approx(240) and adds_up(base, 1e-9)
    assert (base.attempts, base.failures, base.preemptions) == (2, 0, 1)


def test_a_beacon_older_than_the_checkpoint_or_from_another_job_is_ignored():
    kept = ledger(0, 60, step=50, startup=10)
    for stale in (ledger(0, 40, step=30, startup=10), ledger(-500, 90, startup=10)):
        base = before_attempt(kept, stale, launched_at=100, started_at=100)
        assert base.seconds["recomputed"] == 0 and base.seconds["restarts"] == pytest.approx(40), stale


def test_a_crash_before_the_first_checkpoint_keeps_its_start_up_and_recomputes_the_rest():
    last = ledger(0, 30, step=20, startup=12, data_wait=3)
    base = before_attempt(None, last, launched_at=50, started_at=55)
    assert base.seconds["startup"] == 12 and base.seconds["recomputed"] == pytest.approx(18)
    assert base.seconds["restarts"] == 25 and base.seconds["productive"] == 0 and adds_up(base, 1e-9)


def test_a_resumed_clock_adds_up_from_the_first_launch():
    t0 = time.time()
    kept = ledger(t0 - 100, t0 - 40, step=10, startup=5)
    last = ledger(t0 - 100, t0 - 30, step=12, startup=5, ended=None)
    clock = Clock(started_at=t0 - 1.0)
    clock.carry(kept, last)
    clock.switch("productive")
    snap = clock.snapshot(step=20)
    assert snap.wall == pytest.approx(100, abs=0.5) and adds_up(snap, 0.001)
    assert snap.seconds["restarts"] == pytest.approx(29, abs=0.01)
    assert snap.seconds["recomputed"] == pytest.approx(10, abs=0.01)


def test_a_beacon_from_a_clock_ahead_of_this_one_is_not_counted_twice():
    t0 = time.time()
    last = ledger(t0 - 50, t0 + 2.0, step=5, startup=5)  # written "after" this attempt started
    clock = Clock(started_at=t0 - 1.0)
    clock.carry(last, None)
    snap = clock.snapshot(step=5)
    assert adds_up(snap, 0.001) and snap.seconds["restarts"] == 0


def test_a_process_start_is_known_to_a_clock_tick():
    """A fast restart (a new rank a few hundred ms after the old one died) must show as restart time,
    so the start cannot be rounded to the second the way the boot time is."""
    code = "from unet_dist.train import goodput; print(goodput.process_start(), goodput.process_start(parent=True))"
    before = time.time()
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    after = time.time()
    own, parent = map(float, child.stdout.split())
    assert before - 0.02 <= own <= after
    assert parent == pytest.approx(goodput.process_start(), abs=0.02)  # the parent is this process


def test_ledgers_round_trip_and_a_torn_one_reads_as_none():
    led = ledger(1.0, 11.0, step=4, startup=2, ended="finished")
    assert Ledger.from_dict(json.loads(json.dumps(led.to_dict()))) == led
    assert Ledger.from_dict(None) is None and Ledger.from_dict({"as_of": 3}) is None
    assert Ledger.from_dict({"job_started_at": "x", "as_of": 1}) is None


def test_the_report_names_every_bucket_with_its_share():
    led = ledger(0, 200, step=40, startup=20, data_wait=10, checkpoint=6, evaluation=4, restarts=30, recomputed=10)
    text = goodput.lines(led, "at the end (finished)")
    assert text[0].startswith("goodput at the end (finished) at step 40: 60.0% of 200.0 s wall time")
    assert [line.split()[0] for line in text[1:]] == ["productive", "start-up", "data", "checkpoint", "evaluation",
                                                    "restarts", "recomputed", "other"]
    m = goodput.metrics(led)
    assert m["goodput/fraction"] == pytest.approx(0.6) and m["goodput/restarts_s"] == 30
    assert sum(m[f"goodput/{b}_fraction"] for b in BUCKETS) == pytest.approx(1)


def test_the_beacon_is_written_off_the_step_path_and_the_last_one_wins(tmp_path, monkeypatch):
    written, release = [], threading.Event()

    def slow_write(run_dir, led):
        release.wait(5)  # a store that hangs while steps go on
        written.append(led.step)

    monkeypatch.setattr(goodput, "write_beacon", slow_write)
    writer = BeaconWriter(tmp_path)
    start = time.perf_counter()
    for step in range(1, 51):
        writer.submit(ledger(0, step, step=step))
    assert time.perf_counter() - start < 0.05, "submitting never waits on the store"
    release.set()
    writer.close(ledger(0, 99, step=99, ended="finished"))
    assert written[-1] == 99 and len(written) <= 3


def test_beacon_round_trip_in_the_run_directory(tmp_path):
    assert goodput.read_beacon(tmp_path) is None
    led = ledger(5.0, 25.0, step=7, startup=3)
    goodput.write_beacon(tmp_path, led)
    assert goodput.read_beacon(tmp_path) == led
    (tmp_path / goodput.BEACON).write_text("{torn")
    assert goodput.read_beacon(tmp_path) is None


def test_step_time_and_data_wait_share_come_from_the_clock_between_log_steps():
    window = telemetry.Window({"data_wait": 1.0, "productive": 4.0}, step=10)
    out = window.advance({"data_wait": 2.0, "productive": 7.0}, step=20)
    assert out == {"unet_train_step_seconds": pytest.approx(0.4), "unet_train_data_wait_fraction": pytest.approx(0.25)}


def test_rank_0_serves_every_series_with_its_labels_and_other_ranks_serve_nothing():
    port = free_port()
    assert type(telemetry.start("torchrun", 1, "r", port, "127.0.0.1")) is telemetry.Exporter
    exporter = telemetry.start("torchrun", 0, "my-run", port, "127.0.0.1")
    try:
        assert telemetry.current() is exporter
        exporter.set({"unet_train_step": 12, "unet_train_images_per_second": 3.5})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        exporter.close()
    for name in telemetry.SERIES:
        assert f"# TYPE {name} gauge" in text, name
    assert 'unet_train_step{launcher="torchrun",node="' in text and 'rank="0",run="my-run"} 12.0' in text
    # a port already taken costs the metrics, not the run
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = telemetry.start("torchrun", 0, "r", taken.getsockname()[1], "127.0.0.1")
    assert type(busy) is telemetry.Exporter
