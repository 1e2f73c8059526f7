"""torchrun DDP on CPU (gloo) through the one-node launcher jobs/torchrun_single.sh: the same loop
as Ray, real processes, small data."""
import re
import sys
from pathlib import Path

import pytest

from conftest import BIN, REPO, clean_env, run, step_keys
from unet_dist import checkpoint

pytestmark = pytest.mark.slow  # torchrun with two gloo ranks

TINY = ["model.width=4", "model.depth=3", "train.crop=[32,32]", "train.batch_size=2", "train.loader_workers=0",
        "train.eval_every=0", "train.log_every=2", "train.warmup_steps=0", "mlflow.system_metrics=false", "mlflow.log_model=false"]


def torchrun(tmp: Path, shards: Path, steps: int, *extra: str, nproc: int = 2, restarts: int = 0):
    sets = [f"shards.dir={shards}", f"train.checkpoint_dir={tmp / 'ckpt'}", f"train.steps={steps}",
            "train.checkpoint_every=3", "train.run_name=tr", *TINY, *extra]
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", NPROC=str(nproc),
                    MAX_RESTARTS=str(restarts), CONFIG="jobs/configs/demo.yaml", TORCHRUN=str(BIN / "torchrun"))
    return run(["bash", str(REPO / "jobs" / "torchrun_single.sh"), *sets], cwd=tmp, env=env, timeout=300)


def digests(log: str) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"rank (\d+) final weights sha256 (\w+)", log)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, small_shards):
    tmp = tmp_path_factory.mktemp("torchrun")
    return tmp, small_shards, torchrun(tmp, small_shards, 6)


def test_two_ranks_train_and_end_with_identical_weights(first_run):
    tmp, _, proc = first_run
    log = proc.stdout + proc.stderr
    d = digests(log)
    assert set(d) == {0, 1}, log[-3000:]
    assert d[0] == d[1]
    latest = checkpoint.find_latest(tmp / "ckpt" / "tr")
    assert checkpoint.read_meta(latest)["step"] == 6
    assert checkpoint.read_meta(latest)["world_size"] == 2
    assert "status      finished" in proc.stdout


def test_relaunch_resumes_from_checkpoint_and_continues_step_count(first_run):
    tmp, shards, first = first_run
    run_id = re.search(r"MLflow run\s+(\w+)", first.stdout).group(1)
    proc = torchrun(tmp, shards, 9)
    log = proc.stdout + proc.stderr
    assert re.search(r"resumed from .*checkpoint_step-00000006 at step 6", log), log[-3000:]
    assert "step 8/9" in log and "step 2/9" not in log
    assert checkpoint.read_meta(checkpoint.find_latest(tmp / "ckpt" / "tr"))["step"] == 9
    assert re.search(r"MLflow run\s+(\w+)", proc.stdout).group(1) == run_id


def test_eval_metrics_are_identical_for_one_and_two_workers(first_run):
    tmp, shards, _ = first_run
    ckpt = str(tmp / "ckpt" / "tr")
    one = run([sys.executable, "-m", "unet_dist.evaluate", "--model", ckpt, "--shards", str(shards), "--json",
               "--batch-size", "3"], cwd=tmp)
    two = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "unet_dist.evaluate",
               "--model", ckpt, "--shards", str(shards), "--json", "--batch-size", "3"], cwd=tmp, env=clean_env())
    last = lambda p: [line for line in p.stdout.splitlines() if line.startswith("{")][-1]
    assert last(one) == last(two)


# ------------------------------------------------------------------------------ a world that changes
def parameters(ckpt: Path) -> dict:
    state = checkpoint.load_state(ckpt, map_location="cpu")["model"]
    return {k: v for k, v in state.items() if v.is_floating_point() and "running" not in k}


def test_a_run_that_shrinks_and_grows_trains_on_the_global_batches_of_a_fixed_world(tmp_path, small_shards):
    """2 ranks to step 4, 1 rank to step 8, 2 ranks to step 12, against 2 ranks throughout: the same
    samples in every step (4 micro-batches of 2, dealt 2 + 2 or 4 + 0), and weights that differ only
    by the order of the sums."""
    sets = ("train.global_batch=8", "train.schedule=constant", "train.checkpoint_every=4")
    fixed, elastic = tmp_path / "fixed", tmp_path / "elastic"
    fixed.mkdir(), elastic.mkdir()
    ref = torchrun(fixed, small_shards, 12, *sets, f"train.sample_log={fixed / 'samples'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    logs = []
    for steps, nproc in ((4, 2), (8, 1), (12, 2)):
        proc = torchrun(elastic, small_shards, steps, *sets, f"train.sample_log={elastic / 'samples'}", nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append(proc.stdout + proc.stderr)
    assert "world 1, global batch 8 (4 micro-batches of 2, 4 a rank)" in logs[1], logs[1][-3000:]
    assert re.search(r"written by a world of 2, this one has 1: the same global batches follow", logs[1])
    assert "world 2, global batch 8 (4 micro-batches of 2, 2 a rank)" in logs[2]
    want = step_keys(fixed / "samples")
    assert sorted(want) == list(range(1, 13)) and all(len(k) == 8 for k in want.values())
    assert step_keys(elastic / "samples") == want
    a = parameters(checkpoint.find_latest(fixed / "ckpt" / "tr"))
    b = parameters(checkpoint.find_latest(elastic / "ckpt" / "tr"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max abs weight difference after 12 steps: {diff:.3g}")
    assert diff < 1e-4, diff
