"""The resumable training stream and the preemption flag, in-process (the real-signal jobs are in
tests/test_preemption.py)."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_dist import preprocess
from unet_dist.config import load_config
from unet_dist.data import shards
from unet_dist.data.augment import Augment, to_device
from unet_dist.data.stream import StreamSpec, index_shards, micro_batches, positions, share, train_stream
from unet_dist.synth import write_dataset
from unet_dist.train import preemption

AUG = Augment(crop=(16, 24), scale=(0.75, 1.25), flip=True)


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("stream")
    write_dataset(root / "raw", "pairs", 10, 2, seed=0, processes=1)
    out = root / "shards"
    preprocess.run(load_config(None, [f"data.root={root / 'raw'}", f"shards.dir={out}", "data.resize=[32,32]",
                                      "shards.samples_per_shard=4", "shards.processes=1",
                                      "quantize.sample_pixels=5000"]))
    return shards.shard_paths(out, shards.load_manifest(out), "train")


def batches(urls, *, start: int, n: int, workers: int, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(train_stream(urls, AUG, 3, rank=rank, world=2, seed=5, start=start, workers=workers, pin_memory=False))
    return [to_device(next(it), AUG, torch.device("cpu")) for _ in range(n)]


def test_index_reads_every_sample_from_the_tar_headers(urls):
    samples = index_shards(urls)
    assert [key for _, key, _ in samples] == [f"train-{i:06d}" for i in range(10)]
    url, key, members = samples[5]
    assert Path(url).name == "train-000001.tar" and {"label.png"} <= set(members)
    with open(url, "rb") as f:  # the offsets point at the member's bytes
        offset, size = members["label.png"]
        f.seek(offset)
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and size > 8


def test_each_epoch_covers_every_sample_once_across_the_ranks():
    n, seen, spec = 10, [], StreamSpec(seed=5, batch_size=3)
    for step in range(10):  # 2 ranks x 3 samples x 10 steps = 6 epochs of 10
        for rank in (0, 1):
            for g in itertools.islice(micro_batches(step, 2, rank, 2), 1):
                seen += positions(spec, g, n)
    for epoch in range(6):
        assert sorted(i for e, i in seen if e == epoch) == list(range(n))
    assert [i for e, i in seen if e == 0] != list(range(n)), "shuffled"


def step_samples(step: int, per_step: int, world: int) -> list[list[int]]:
    """The sample indices each rank of ``world`` trains step ``step`` on."""
    spec = StreamSpec(seed=5, batch_size=2)
    return [[i for g in itertools.islice(micro_batches(step, per_step, rank, world), share(per_step, rank, world))
             for _, i in positions(spec, g, 10)] for rank in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_a_step_trains_on_the_same_samples_at_any_world_size(world):
    """An elastic group that shrinks or grows keeps the global batches: 4 micro-batches a step, dealt
    to 1, 2, 3 or 4 ranks (3 ranks: 2, 1 and 1), are the same 8 samples."""
    for step in (0, 1, 7):
        full = sorted(i for rank in step_samples(step, 4, 4) for i in rank)
        ranks = step_samples(step, 4, world)
        assert sorted(i for rank in ranks for i in rank) == full
        assert [len(r) for r in ranks] == [2 * share(4, r, world) for r in range(world)]
    assert [share(4, r, 3) for r in range(3)] == [2, 1, 1]


def test_the_stream_is_the_one_of_a_fixed_world_with_accumulation():
    """2 ranks taking 2 micro-batches each per step read what rank r's batch t always was:
    positions (t x world + r) x batch_size onwards."""
    spec = StreamSpec(seed=5, batch_size=2)
    for rank in (0, 1):
        stream = list(itertools.islice(micro_batches(3, 4, rank, 2), 6))
        assert stream == [t * 2 + rank for t in range(6, 12)]
        assert positions(spec, stream[0], 10)[0] == positions(spec, 12 + rank, 10)[0]


def test_resumed_stream_equals_the_uninterrupted_one_with_any_worker_count(urls):
    whole = batches(urls, start=0, n=7, workers=0)
    for workers in (0, 2):
        resumed = batches(urls, start=4, n=3, workers=workers)
        for (a, la), (b, lb) in zip(whole[4:], resumed):
            assert torch.equal(a, b) and torch.equal(la, lb)
    other_rank = batches(urls, start=0, n=1, workers=0, rank=1)
    assert not torch.equal(whole[0][0], other_rank[0][0])


LOADER_LEFT_OPEN = """
import sys
import psutil
from unet_dist.data.augment import Augment
from unet_dist.data.stream import train_stream
from unet_dist.train import preemption

preemption.install()  # as a training rank does, before its loader forks
aug = Augment(crop=(16, 24), scale=(1.0, 1.0), flip=False)
it = iter(train_stream(sys.argv[1:], aug, 2, rank=0, world=1, seed=0, workers=1, pin_memory=False))
next(it)
held = [it]
held.append(held)  # a cycle: the open loader lives until the interpreter's exit
print("workers", *[c.pid for c in psutil.Process().children()], flush=True)
raise RuntimeError("a rank's error with its loader open")
"""


def test_a_rank_that_fails_with_its_loader_open_exits_and_its_loader_workers_with_it(urls):
    """At exit multiprocessing stops a rank's open loader workers with SIGTERM and waits for them: a
    worker that ignored SIGTERM (or ran the rank's preemption handler) would hold its rank for ever,
    and torchrun would never see the failure."""
    proc = subprocess.run([sys.executable, "-c", LOADER_LEFT_OPEN, *urls], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "a rank's error with its loader open" in proc.stderr, proc.stderr[-2000:]
    workers = [int(p) for p in proc.stdout.split()[1:]]
    assert workers and not any(Path(f"/proc/{p}").exists() for p in workers)


def test_sigterm_sets_the_flag_and_a_second_one_would_stop_the_process():
    previous = signal.getsignal(signal.SIGTERM)
    preemption.reset()
    try:
        assert preemption.install()
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested() and preemption.reason() == "SIGTERM"
        assert preemption.agreed(world_size=1)
        assert preemption.seconds_since_request() >= 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        preemption.reset()


def test_sigterm_after_the_last_step_takes_its_default_action_without_a_checkpoint_message():
    """Ray ends its workers with SIGTERM after training: nothing to save, no misleading line."""
    import subprocess
    import sys

    code = ("import os, signal; from unet_dist.train import preemption as p; p.install(); p.steps_done(); "
            "os.kill(os.getpid(), signal.SIGTERM); print('still alive')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGTERM and "still alive" not in proc.stdout
    assert "checkpoint at the next step" not in proc.stderr


def test_a_registered_source_requests_a_preemption():
    preemption.reset()
    try:
        calls = []
        preemption.add_source(lambda: calls.append(1) or ("driver got SIGTERM" if len(calls) > 1 else None))
        assert not preemption.requested()
        preemption._last_poll = -np.inf  # do not wait POLL_S in a test
        assert preemption.requested() and preemption.reason() == "driver got SIGTERM"
    finally:
        preemption.reset()



def test_a_run_preempted_mid_way_and_resumed_ends_with_the_uninterrupted_weights(urls, tmp_path, monkeypatch,
                                                                                  caplog):
    """In-process, a world of one with a loader worker: the preemption checkpoint falls between the
    periodic ones (4, 8), and the resumed run ends bit-identical to the one that never stopped."""
    import logging
    import re

    from test_train_parts import local_context, tiny_run
    from unet_dist import checkpoint
    from unet_dist.train.loop import train

    caplog.set_level(logging.INFO, logger="unet_dist.train")
    monkeypatch.setattr(preemption, "POLL_S", 0.0)
    cfg = tiny_run(Path(urls[0]).parent, 8, "train.checkpoint_every=4", "train.loader_workers=1")

    def final_digest() -> str:
        [digest] = re.findall(r"final weights sha256 (\w+)", caplog.text)
        caplog.clear()
        return digest

    train(cfg, local_context(tmp_path / "whole", []))
    whole = final_digest()
    preemption.reset()
    try:
        preemption.add_source(lambda: "test" if preemption._step[0] == 6 else None)
        stopped = train(cfg, local_context(tmp_path / "cut", []))
    finally:
        preemption.reset()
    caplog.clear()
    meta = checkpoint.read_meta(checkpoint.find_latest(tmp_path / "cut"))
    assert stopped["status"] == "preempted" and stopped["steps"] == 6
    assert meta["step"] == 6 and meta["status"] == "preempted" and meta["data_position"] == 6
    resumed = train(cfg, local_context(tmp_path / "cut", []))
    assert resumed["resumed_from"].endswith("checkpoint_step-00000006") and resumed["steps"] == 8
    assert final_digest() == whole
