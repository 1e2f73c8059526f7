"""Multi-node, for real: two "machines" made of Linux namespaces (tests/cluster), each with its own
address, /tmp, Ray temp dir, host name and /etc/hosts, and a services namespace with an MLflow server
and an S3 server. The Ray job keeps shards and checkpoints in S3 only; the torchrun jobs use one host
folder bound at /mnt/shared in every node (the NFS case).

Both launchers train across the two nodes through the user-facing scripts (jobs/submit_ray.sh,
jobs/torchrun_multi.sh), survive losing node 1 mid-run, and end with one MLflow run that logged each
step once; evaluation on two nodes gives the confusion matrix of one process; nodes whose host name
resolves to 127.0.1.1 still train (is_host from NODE_RANK, the collective interface chosen from the
route to MASTER_ADDR). Elastic, both launchers go on at half size when node 1 goes and grow back when
it returns, on the global batches of a fixed-size run (train.sample_log), in one MLflow run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster import BIN, Cluster, mlflow_store, require_namespaces, s3_env, start_mlflow, start_s3
from conftest import REPO, make_shards, patient, step_keys
from unet_dist import checkpoint

pytestmark = pytest.mark.slow

TINY = ["model.width=4", "model.depth=3", "train.crop=[32,32]", "train.batch_size=2", "train.loader_workers=0",
        "train.eval_every=0", "train.log_every=1", "train.warmup_steps=0", "train.checkpoint_every=5",
        "mlflow.system_metrics=false",
        "mlflow.log_model=false", "mlflow.registered_model=", "shards.dir=/mnt/shared/shards",
        "train.checkpoint_dir=/mnt/shared/ckpt"]
TWINS = {"twin0": "twin", "twin1": "twin"}  # two machines with one host name, resolving to 127.0.1.1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """node0, node1 (plain machines), twin0, twin1 (host name resolves elsewhere), services (MLflow, S3)."""
    require_namespaces()
    root = tmp_path_factory.mktemp("cluster")
    nfs = root / "nfs"
    nfs.mkdir()
    make_shards(nfs)  # -> nfs/shards, seen as /mnt/shared/shards on every node
    c = Cluster(root, ["node0", "node1", "twin0", "twin1"], services=True, shared=nfs,
                hostnames=TWINS, hosts={n: "127.0.1.1 twin" for n in TWINS})
    try:
        c.mlflow_uri = start_mlflow(c)
        c.s3 = s3_env(start_s3(c))
        c.nfs = nfs
        yield c
    finally:
        c.close()


def wait_for(predicate, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 240):
    deadline = time.monotonic() + patient(timeout)
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a job ended before {what}\n" + tail(logs))
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n" + tail(logs))


def tail(logs: list[Path], n: int = 3000) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text()[-n:]}" for p in logs if p.exists())


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    deadline = time.monotonic() + patient(timeout)
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError("job still running\n" + tail(logs)) from None
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs] + [tail(logs)]


def latest_step(run_dir: Path) -> int:
    latest = checkpoint.find_latest(run_dir)
    return int(checkpoint.read_meta(latest)["step"]) if latest else 0


def logged_steps(text: str, steps: int) -> list[int]:
    return [int(s) for s in re.findall(rf"step (\d+)/{steps} loss", text)]


def digests(text: str) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"rank (\d+) final weights sha256 (\w+)", text)}


def run_ids(text: str) -> set[str]:
    return set(re.findall(r"MLflow run\s+([0-9a-f]{32})", text)) | set(re.findall(r"continuing MLflow run ([0-9a-f]{32})", text))


def metric_steps(c: Cluster, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(mlflow_store(c)).get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------ torchrun
def torchrun_node(c: Cluster, node: str, rank: int, master: str, rdzv: str, log: Path, *sets: str,
                  restarts: int = 0, nnodes: str = "2", **env: str) -> subprocess.Popen:
    env = c.env(node, NNODES=nnodes, NODE_RANK=str(rank), MASTER_ADDR=master, MASTER_PORT="29400", RUN_ID=rdzv,
                NPROC="1", MAX_RESTARTS=str(restarts), CONFIG="jobs/configs/smoke.yaml",
                TORCHRUN=str(BIN / "torchrun"), PYTHON=str(BIN / "python"), MLFLOW_TRACKING_URI=c.mlflow_uri, **env)
    return c.popen(node, ["bash", REPO / "jobs" / "torchrun_multi.sh", *TINY, *sets], log=log, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def torchrun_node_lost(cluster):
    """torchrun on node0 + node1; node1 is powered off (agent and rank SIGKILLed) after a checkpoint,
    then started again: the group re-forms under --max-restarts and resumes."""
    c, steps, name = cluster, 30, "tr2"
    run_dir = c.nfs / "ckpt" / name
    logs = [c.root / "tr-node0.log", c.root / "tr-node1.log", c.root / "tr-node1-again.log"]
    sets = (f"train.steps={steps}", f"train.run_name={name}")
    p0 = torchrun_node(c, "node0", 0, "node0", name, logs[0], *sets, restarts=2)
    p1 = torchrun_node(c, "node1", 1, "node0", name, logs[1], *sets, restarts=2)

    def past_checkpoint():
        ckpt = latest_step(run_dir)
        logged = logged_steps(logs[0].read_text() + logs[1].read_text(), steps)
        return (ckpt, max(logged)) if ckpt >= 5 and logged and max(logged) > ckpt else None

    ckpt_at, logged_at = wait_for(past_checkpoint, "a checkpoint and a later step", [p0, p1], logs)
    agents = c.find("node1", "bin/torchrun")
    assert agents, "node1's torchrun agent"
    c.kill_node("node1")  # the agent and its rank: a machine gone
    p1.wait(timeout=30)
    wait_for(lambda: "failed (exitcode" in logs[0].read_text(), "node0's agent to see its rank fail", [p0], logs)
    newest = latest_step(run_dir)
    # The machine comes back as a rebooted one would: after the rendezvous has written the old
    # agent off (no heartbeat for keep_alive_interval x keep_alive_max_attempt = 15 s).
    time.sleep(20)
    p1b = torchrun_node(c, "node1", 1, "node0", name, logs[2], *sets, restarts=2)
    finish([p0, p1b], logs, timeout=300)
    return {"c": c, "logs": logs, "steps": steps, "run_dir": run_dir, "ckpt_at": ckpt_at, "logged_at": logged_at,
            "newest": newest}


def test_torchrun_group_reforms_after_losing_a_node_and_resumes_to_the_configured_step(torchrun_node_lost):
    r = torchrun_node_lost
    text = "".join(p.read_text() for p in r["logs"])
    assert 5 <= r["ckpt_at"] <= r["newest"] < r["steps"] and r["logged_at"] > r["ckpt_at"], "killed mid-run"
    resumed = [int(s) for s in re.findall(r"resumed from \S*checkpoint_step-\d+ at step (\d+)", text)]
    assert r["newest"] in resumed, tail(r["logs"])
    meta = checkpoint.read_meta(checkpoint.find_latest(r["run_dir"]))
    assert meta["step"] == r["steps"] and meta["world_size"] == 2


def test_torchrun_ranks_on_two_nodes_end_with_the_same_weights(torchrun_node_lost):
    r = torchrun_node_lost
    after = r["logs"][0].read_text() + r["logs"][2].read_text()  # the re-formed group
    d = digests(after)
    assert set(d) == {0, 1} and d[0] == d[1], tail(r["logs"])


def test_torchrun_across_nodes_logs_one_mlflow_run_once_per_step(torchrun_node_lost):
    r = torchrun_node_lost
    ids = run_ids("".join(p.read_text() for p in r["logs"]))
    assert len(ids) == 1, ids
    run_id = ids.pop()
    assert checkpoint.read_meta(checkpoint.find_latest(r["run_dir"]))["mlflow_run_id"] == run_id
    assert metric_steps(r["c"], run_id) == list(range(1, r["steps"] + 1)), "each step logged exactly once"
    assert MlflowClient(mlflow_store(r["c"])).get_run(run_id).info.status == "FINISHED"


def test_evaluation_on_two_nodes_gives_the_confusion_matrix_of_one_process(torchrun_node_lost):
    c, model = torchrun_node_lost["c"], "/mnt/shared/ckpt/tr2"
    args = ["-m", "unet_dist.evaluate", "--model", model, "--shards", "/mnt/shared/shards", "--json",
            "--batch-size", "3"]
    one = c.run("node0", [BIN / "python", *args], cwd=REPO)
    logs = [c.root / f"eval-{n}.log" for n in ("node0", "node1")]
    procs = [c.popen(node, [BIN / "torchrun", "--nnodes=2", f"--node-rank={i}", "--nproc-per-node=1",
                            "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29401", "--rdzv-id=eval",
                            f"--rdzv-conf=is_host={'true' if i == 0 else 'false'}", *args],
                     log=logs[i], cwd=REPO) for i, node in enumerate(("node0", "node1"))]
    finish(procs, logs, timeout=180)
    last = lambda text: json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    single, two = last(one.stdout), last("".join(p.read_text() for p in logs))
    assert two["confusion"] == single["confusion"] and sum(map(sum, single["confusion"])) > 0
    assert two["miou"] == single["miou"]


# ------------------------------------------------------------------------------- elastic torchrun
ELASTIC = ("train.global_batch=4", "train.schedule=constant",  # 2 micro-batches of 2 a step: 1 + 1 or 2 + 0
           "train.checkpoint_every=20", "train.log_every=5")


def worlds(text: str) -> list[int]:
    return [int(w) for w in re.findall(r"training \d+ steps from step \d+: world (\d+), global batch 4 ", text)]


@pytest.fixture(scope="module")
def torchrun_elastic(cluster):
    """NNODES=1:2 on node0 + node1. node1 is powered off after a checkpoint: node0 goes on alone at
    once (no waiting for node1); node1 comes back and the group grows to two again. Against a
    fixed-size run of one process on the same config."""
    c, steps, name = cluster, 400, "elastic"
    run_dir, samples = c.nfs / "ckpt" / name, c.nfs / "samples"
    logs = [c.root / f"el-{n}.log" for n in ("node0", "node1", "node1-again", "fixed")]
    sets = (f"train.steps={steps}", f"train.run_name={name}", *ELASTIC)
    extra = dict(nnodes="1:2", restarts=2, RDZV_CONF="last_call_timeout=3")
    # The fixed-size run: one torchrun rank, as many threads as an elastic rank (the sums inside a
    # convolution follow the thread count).
    ref = c.run("node0", ["bash", REPO / "jobs" / "torchrun_single.sh", *TINY, *sets, "train.run_name=fixed",
                          "train.sample_log=/mnt/shared/fixed"], cwd=REPO, timeout=600,
                env=c.env("node0", NPROC="1", MAX_RESTARTS="0", CONFIG="jobs/configs/smoke.yaml",
                          TORCHRUN=str(BIN / "torchrun"), MLFLOW_TRACKING_URI=c.mlflow_uri))
    logs[3].write_text(ref.stdout + ref.stderr)
    sets = (*sets, "train.sample_log=/mnt/shared/samples")
    p0 = torchrun_node(c, "node0", 0, "node0", name, logs[0], *sets, **extra)
    p1 = torchrun_node(c, "node1", 1, "node0", name, logs[1], *sets, **extra)

    def past_checkpoint():  # c10d deals the ranks: rank 0, the one that logs, may be on either node
        ckpt = latest_step(run_dir)
        logged = logged_steps(logs[0].read_text() + logs[1].read_text(), steps)
        return (ckpt, max(logged)) if ckpt >= 20 and logged and max(logged) > ckpt else None

    wait_for(past_checkpoint, "a checkpoint and a later step", [p0, p1], logs[:2])
    c.kill_node("node1")  # the agent and its rank: a machine gone
    p1.wait(timeout=30)
    lost_at = time.monotonic()

    def alone():
        text = logs[0].read_text()
        cut = text.rfind("world 1, global batch")
        return cut > 0 and len(logged_steps(text[cut:], steps)) >= 3

    wait_for(alone, "node0 to train alone", [p0], logs[:1])
    alone_after = time.monotonic() - lost_at
    p1b = torchrun_node(c, "node1", 1, "node0", name, logs[2], *sets, **extra)
    finish([p0, p1b], logs[:3], timeout=300)
    return {"c": c, "logs": logs, "steps": steps, "run_dir": run_dir, "samples": samples, "alone_after": alone_after}


def test_elastic_torchrun_goes_on_at_half_size_and_grows_back_when_the_node_returns(torchrun_elastic):
    r = torchrun_elastic
    text = "".join(p.read_text() for p in r["logs"][:3])
    assert sorted(set(worlds(text))) == [1, 2], tail(r["logs"])
    assert r["alone_after"] < 60, "node0 did not wait for node1"
    assert re.search(r"written by a world of 2, this one has 1: the same global batches follow", text)
    assert re.search(r"written by a world of 1, this one has 2: the same global batches follow", text)
    meta = checkpoint.read_meta(checkpoint.find_latest(r["run_dir"]))
    assert meta["step"] == r["steps"] and meta["world_size"] == 2 and meta["global_batch"] == 4


def test_elastic_torchrun_trains_every_step_once_on_the_global_batches_of_a_fixed_size_run(torchrun_elastic):
    r = torchrun_elastic
    want = step_keys(r["c"].nfs / "fixed")
    assert sorted(want) == list(range(1, r["steps"] + 1)) and all(len(k) == 4 for k in want.values())
    assert step_keys(r["samples"]) == want


def test_elastic_torchrun_logs_one_mlflow_run_once_per_step(torchrun_elastic):
    r = torchrun_elastic
    ids = run_ids("".join(p.read_text() for p in r["logs"][:3]))
    assert len(ids) == 1, ids
    run_id = ids.pop()
    assert metric_steps(r["c"], run_id) == list(range(5, r["steps"] + 1, 5)), "each log step logged exactly once"
    assert MlflowClient(mlflow_store(r["c"])).get_run(run_id).info.status == "FINISHED"


def test_elastic_torchrun_ends_within_float_rounding_of_the_fixed_size_run(torchrun_elastic):
    """The same samples in every step; only the sums may run in another order (here they do not:
    one micro-batch on each of two ranks or two on one is the same arithmetic). BatchNorm's running
    statistics follow the ranks (averaged at each change of size), so val mIoU may move a little."""
    r = torchrun_elastic
    fixed, elastic = r["c"].nfs / "ckpt" / "fixed", r["run_dir"]
    a, b = (checkpoint.load_state(checkpoint.find_latest(d), map_location="cpu")["model"] for d in (fixed, elastic))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point() and "running" not in k)
    scores = [json.loads(r["c"].run("node0", [BIN / "python", "-m", "unet_dist.evaluate", "--model", str(d).replace(
        str(r["c"].nfs), "/mnt/shared"), "--shards", "/mnt/shared/shards", "--json"], cwd=REPO).stdout.splitlines()[-1])["miou"]
        for d in (fixed, elastic)]
    print(f"elastic vs fixed after {r['steps']} steps: max abs weight difference {diff:.3g}, "
          f"val mIoU {scores[1]:.4f} vs {scores[0]:.4f}")
    assert diff < 1e-3, diff
    assert abs(scores[1] - scores[0]) < 0.02, scores


# ------------------------------------------------------------------------- host name resolves elsewhere
def test_nodes_whose_host_name_resolves_to_loopback_still_train(cluster):
    """Both machines are called "twin" and resolve it to 127.0.1.1: the rendezvous is hosted by
    NODE_RANK 0 (not guessed from the name) and gloo binds the interface routing to MASTER_ADDR."""
    c = cluster
    assert c.run("twin1", ["getent", "hosts", "twin"]).stdout.split()[0] == "127.0.1.1"
    logs = [c.root / f"twin{i}.log" for i in range(2)]
    master = c.ip("twin0")
    sets = ("train.steps=6", "train.run_name=twins")
    procs = [torchrun_node(c, f"twin{i}", i, master, "twins", logs[i], *sets) for i in range(2)]
    finish(procs, logs, timeout=240)
    text = "".join(p.read_text() for p in logs)
    assert len(re.findall(r"network interface eth0 \(198\.18\.0\.\d+, route to MASTER_ADDR", text)) == 2, tail(logs)
    d = digests(text)
    assert set(d) == {0, 1} and d[0] == d[1]


# ------------------------------------------------------------------------------------------ Ray
RAY_PORT, DASHBOARD_PORT = 6379, 8265


def ray_start(c: Cluster, node: str) -> None:
    """`ray start` on a node: the head on node0 (GCS, dashboard/job server on its own address)."""
    ip = c.ip(node)
    args = ["ray", "start", "--node-ip-address", ip, "--num-cpus", "1", "--object-store-memory", str(100 << 20),
            "--disable-usage-stats"]
    if node == "node0":
        args += ["--head", "--port", str(RAY_PORT), "--dashboard-host", ip, "--dashboard-port", str(DASHBOARD_PORT)]
    else:
        args += ["--address", f"{c.ip('node0')}:{RAY_PORT}"]
    # Notice a dead node in ~3 s rather than ~15 s (the head's health checks of the raylets).
    # Workers inherit the raylet's environment: the S3 endpoint and credentials, as on a real node.
    c.run(node, args, timeout=180, env=c.env(node, RAY_health_check_period_ms="1000",
                                             RAY_health_check_failure_threshold="3", **c.s3))


def wait_for_two_free_nodes(c: Cluster) -> None:
    """Both nodes registered and idle: a restarted node1 is "alive" only once its new raylet has
    joined, and a job's workers free their CPUs a little after the job ends."""
    code = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(len([n for n in ray.nodes() if n['Alive']]), ray.available_resources().get('CPU', 0))")
    deadline = time.monotonic() + 120
    while True:
        nodes, cpus = c.run("node0", [BIN / "python", "-c", code], timeout=120,
                            env=c.env("node0", RAY_ADDRESS=f"{c.ip('node0')}:{RAY_PORT}")).stdout.split()
        if int(nodes) == 2 and float(cpus) >= 2:
            return
        assert time.monotonic() < deadline, f"{nodes} alive nodes, {cpus} free CPUs"
        time.sleep(2)


def alive_nodes(c: Cluster) -> list[str]:
    code = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
    return c.run("node0", [BIN / "python", "-c", code], env=c.env("node0", RAY_ADDRESS=f"{c.ip('node0')}:{RAY_PORT}"),
                 timeout=120).stdout.split()


S3_SHARDS, S3_CKPT = "s3://cluster/shards", "s3://cluster/ckpt"


def submit(c: Cluster, log: Path, *sets: str, tracking: bool = True) -> subprocess.Popen:
    """jobs/submit_ray.sh from node0, shards and checkpoints in the services node's S3."""
    env = c.env("node0", RAY_ADDRESS=f"http://{c.ip('node0')}:{DASHBOARD_PORT}", CONFIG="jobs/configs/smoke.yaml",
                PYTHON=str(BIN / "python"), **c.s3, **({"MLFLOW_TRACKING_URI": c.mlflow_uri} if tracking else {}))
    return c.popen("node0", ["bash", REPO / "jobs" / "submit_ray.sh", *TINY, "train.workers=2",
                             "train.cpus_per_worker=1", f"shards.dir={S3_SHARDS}",
                             f"train.checkpoint_dir={S3_CKPT}", *sets], log=log, env=env, cwd=REPO)


def s3_latest_step(c: Cluster, run_dir: str) -> int:
    """The newest complete checkpoint's step in S3, as node1 sees it."""
    code = ("import sys; from unet_dist import checkpoint as k; l = k.find_latest(sys.argv[1]); "
            "print(k.read_meta(l)['step'] if l else 0)")
    return int(c.run("node1", [BIN / "python", "-c", code, run_dir], env=c.env("node1", **c.s3), cwd=REPO).stdout)


def published_steps(text: str) -> list[int]:
    """Checkpoints in storage once the line is printed: Ray Train's own line for a synchronous report,
    ours for a background one (train.checkpoint_async, the default)."""
    return [int(ray_line or ours) for ray_line, ours in re.findall(
        r"Checkpoint successfully created at: .*checkpoint_step-(\d+)|checkpoint of step (\d+) published in", text)]


@pytest.fixture(scope="module")
def ray_cluster(cluster):
    """Ray head on node0 and a worker node on node1 (1 CPU each, so 2 workers must spread); the
    shards uploaded to S3 from node0 (no node reads /mnt/shared in the Ray tests)."""
    c = cluster
    upload = ("import sys, boto3; from unet_dist import storage; boto3.client('s3').create_bucket(Bucket='cluster'); "
              "storage.location(sys.argv[2]).upload_tree(sys.argv[1])")
    c.run("node0", [BIN / "python", "-c", upload, "/mnt/shared/shards", S3_SHARDS], env=c.env("node0", **c.s3),
          cwd=REPO)
    ray_start(c, "node0")
    ray_start(c, "node1")
    wait_for_two_free_nodes(c)
    probe = c.env("node0", RAY_ADDRESS=f"http://{c.ip('node0')}:{DASHBOARD_PORT}")
    deadline = time.monotonic() + patient(180)  # the head's job agent takes jobs a little after `ray start`
    while c.run("node0", [BIN / "ray", "job", "submit", "--no-wait", "--", "true"], env=probe, check=False).returncode:
        assert time.monotonic() < deadline, "node0's Ray job server takes no job"
        time.sleep(2)
    yield c
    for node in ("node1", "node0"):
        c.kill_node(node)  # never `ray stop`: it kills every Ray process on the host


def test_ray_cluster_has_two_alive_nodes_with_their_own_addresses(ray_cluster):
    assert alive_nodes(ray_cluster) == [ray_cluster.ip("node0"), ray_cluster.ip("node1")]


@pytest.fixture(scope="module")
def ray_node_lost(ray_cluster):
    """2 workers on 2 nodes; node1's raylet is SIGKILLed after a checkpoint, node1 restarts; the run
    resumes through FailureConfig."""
    c, steps, name = ray_cluster, 30, "ray2"
    run_dir, log = f"{S3_CKPT}/{name}", c.root / "ray-submit.log"
    wait_for_two_free_nodes(c)
    proc = submit(c, log, f"train.steps={steps}", f"train.run_name={name}", "train.max_failures=3")

    def past_checkpoint():
        text = log.read_text()
        ckpts, logged = published_steps(text), logged_steps(text, steps)
        return (max(ckpts), max(logged)) if ckpts and logged and max(logged) > max(ckpts) else None

    ckpt_at, logged_at = wait_for(past_checkpoint, "a checkpoint and a later step", [proc], [log], timeout=300)
    raylets = c.find("node1", "raylet")
    assert raylets, "node1's raylet"
    for pid in raylets:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "[FailurePolicy] RETRY" in log.read_text(), "Ray Train to retry", [proc], [log], timeout=120)
    newest = s3_latest_step(c, run_dir)
    c.kill_node("node1")  # what the raylet left behind (agents, workers): the machine reboots
    ray_start(c, "node1")
    finish([proc], [log], timeout=300)
    return {"c": c, "text": log.read_text(), "steps": steps, "run_dir": run_dir, "ckpt_at": ckpt_at,
            "logged_at": logged_at, "newest": newest}


def test_submitted_job_places_its_two_workers_on_different_nodes(ray_node_lost):
    r = ray_node_lost
    groups = re.findall(r"- \(ip=([\d.]+), pid=\d+\) world_rank=(\d)", r["text"])
    first = dict((rank, ip) for ip, rank in groups[:2])
    assert set(first.values()) == {r["c"].ip("node0"), r["c"].ip("node1")}, r["text"][-3000:]


def test_ray_run_resumes_after_a_node_returns_and_ends_at_the_configured_step(ray_node_lost):
    r = ray_node_lost
    assert 5 <= r["ckpt_at"] <= r["newest"] < r["steps"] and r["logged_at"] > r["ckpt_at"], "killed mid-run"
    resumed = [int(s) for s in re.findall(r"resumed from \S*checkpoint_step-\d+ at step (\d+)", r["text"])]
    assert resumed and resumed[-1] >= r["newest"], r["text"][-4000:]
    assert s3_latest_step(r["c"], r["run_dir"]) == r["steps"]
    assert re.search(rf"status\s+finished\s+steps\s+{r['steps']}\b", r["text"]), r["text"][-3000:]


def test_ray_run_across_nodes_logs_one_mlflow_run_once_per_step(ray_node_lost):
    r = ray_node_lost
    ids = run_ids(r["text"])
    assert len(ids) == 1, ids
    run_id = ids.pop()
    assert metric_steps(r["c"], run_id) == list(range(1, r["steps"] + 1)), "each step logged exactly once"
    assert MlflowClient(mlflow_store(r["c"])).get_run(run_id).info.status == "FINISHED"


def node_id(c: Cluster, ip: str) -> str:
    code = ("import sys, ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(next(n['NodeID'] for n in ray.nodes() if n['Alive'] and n['NodeManagerAddress'] == sys.argv[1]))")
    return c.run("node0", [BIN / "python", "-c", code, ip], env=c.env("node0", RAY_ADDRESS=f"{c.ip('node0')}:{RAY_PORT}"),
                 timeout=120).stdout.strip()


def test_a_ray_node_drain_checkpoints_at_once_and_training_goes_on(ray_cluster):
    """A spot reclaim notice (`ray drain-node`, reason preemption, as the autoscaler sends it):
    the workers checkpoint at the next log step, off the schedule, and keep training."""
    c, steps, name = ray_cluster, 600, "drain"  # ~20 s: Ray polls for drains every 5 s
    log = c.root / "ray-drain.log"
    proc = submit(c, log, f"train.steps={steps}", f"train.run_name={name}", "train.log_every=2",
                  "train.checkpoint_every=10000")
    try:
        wait_for(lambda: max(logged_steps(log.read_text(), steps) or [0]) >= 6, "step 6", [proc], [log], timeout=300)
        c.run("node0", [BIN / "ray", "drain-node", "--address", f"{c.ip('node0')}:{RAY_PORT}",
                        "--node-id", node_id(c, c.ip("node1")), "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "spot reclaim", "--deadline-remaining-seconds", "600"])
        finish([proc], [log], timeout=300)
        text = log.read_text()
        drained = re.search(r"Ray node drain \(1 node\(s\) of this job\): checkpoint at step (\d+), training goes on", text)
        assert drained, tail([log])
        at = int(drained.group(1))
        assert 6 < at < steps and at % 2 == 0, at
        assert at in published_steps(text), "the drain checkpoint is in storage"
        assert s3_latest_step(c, f"{S3_CKPT}/{name}") == steps
    finally:
        if proc.poll() is None:
            proc.kill()
        c.kill_node("node1")  # a drained node takes no new work: give the next tests a fresh one
        ray_start(c, "node1")
        wait_for_two_free_nodes(c)


@pytest.fixture(scope="module")
def ray_elastic(ray_cluster):
    """train.min_workers=1, train.workers=2 on node0 + node1 (one worker each). node1's raylet is
    SIGKILLed after a checkpoint: Ray restarts the group with the one worker that fits and training
    goes on; node1 comes back and the group grows to two again."""
    c, steps, name = ray_cluster, 700, "ray-elastic"
    run_dir, log = f"{S3_CKPT}/{name}", c.root / "ray-elastic.log"
    wait_for_two_free_nodes(c)  # Ray starts an elastic group with the workers that fit now
    proc = submit(c, log, f"train.steps={steps}", f"train.run_name={name}", "train.max_failures=3",
                  "train.min_workers=1", "train.elastic_check_s=5", "train.sample_log=/mnt/shared/ray-samples", *ELASTIC)
    try:
        def past_checkpoint_of_two():
            text = log.read_text()
            cut = text.rfind("world 2, global batch")
            ckpts, logged = published_steps(text[cut:]), logged_steps(text[cut:], steps)
            return cut > 0 and ckpts and logged and max(logged) > max(ckpts)

        wait_for(past_checkpoint_of_two, "two workers, a checkpoint and a later step", [proc], [log], timeout=300)
        for pid in c.find("node1", "raylet"):
            os.kill(pid, signal.SIGKILL)
        lost_at = time.monotonic()

        def alone():
            text = log.read_text()
            cut = text.rfind("world 1, global batch")
            return cut > 0 and len(logged_steps(text[cut:], steps)) >= 3

        wait_for(alone, "one worker to train alone", [proc], [log], timeout=180)
        alone_after = time.monotonic() - lost_at
        c.kill_node("node1")  # what the raylet left behind: the machine reboots
        ray_start(c, "node1")
        finish([proc], [log], timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"c": c, "text": log.read_text(), "steps": steps, "run_dir": run_dir, "alone_after": alone_after,
            "samples": c.nfs / "ray-samples"}


def test_elastic_ray_goes_on_with_the_workers_that_fit_and_grows_back(ray_elastic):
    r = ray_elastic
    w = worlds(r["text"])
    assert 2 in w and 1 in w[w.index(2):] and w[-1] == 2, w  # two, one after node1 is lost, two again
    assert r["alone_after"] < 120, "the run waited for node1"
    room = [int(s) for s in re.findall(r"room for another worker \(elastic, 1 of 2\): checkpoint at step (\d+)", r["text"])]
    assert room, r["text"][-4000:]
    grown = re.search(r"checkpoint_step-\d+ at step (\d+)\s.*?training \d+ steps from step \d+: world 2",
                      r["text"][r["text"].rfind("world 1, global batch"):], re.S)
    # Ray grows the group up to ~20 s + elastic_check_s after the room appears; the checkpoints taken
    # meanwhile (every elastic_check_s) bound what the restart recomputes.
    assert grown and int(grown.group(1)) >= room[0], "the grown group resumes from a checkpoint taken for the room"
    assert s3_latest_step(r["c"], r["run_dir"]) == r["steps"]
    assert re.search(rf"status\s+finished\s+steps\s+{r['steps']}\b", r["text"]), r["text"][-3000:]


def test_elastic_ray_trains_every_step_on_the_global_batches_of_a_fixed_size_run(ray_elastic, torchrun_elastic):
    r = ray_elastic
    want = step_keys(r["c"].nfs / "fixed")  # the fixed-size torchrun run: the same shards and seed
    got = step_keys(r["samples"])
    assert sorted(got) == list(range(1, r["steps"] + 1))
    assert all(got[s] == want[s] for s in want), "the same samples in each step"


def test_elastic_ray_logs_one_mlflow_run_once_per_log_step(ray_elastic):
    r = ray_elastic
    ids = run_ids(r["text"])
    assert len(ids) == 1, ids
    run_id = ids.pop()
    assert metric_steps(r["c"], run_id) == list(range(5, r["steps"] + 1, 5)), "each log step logged exactly once"
    assert MlflowClient(mlflow_store(r["c"])).get_run(run_id).info.status == "FINISHED"


def plain_submit(c: Cluster, log: Path, *sets: str) -> subprocess.Popen:
    """The README's plain ``ray job submit --working-dir .``: no runtime env, so no MLFLOW_TRACKING_URI."""
    args = [a for kv in [*TINY, "train.workers=2", f"shards.dir={S3_SHARDS}", f"train.checkpoint_dir={S3_CKPT}", *sets]
            for a in ("--set", kv)]
    cmd = [BIN / "ray", "job", "submit", "--address", f"http://{c.ip('node0')}:{DASHBOARD_PORT}", "--working-dir",
           REPO, "--", "python", "-m", "unet_dist.train", "--config", "jobs/configs/smoke.yaml", *args]
    return c.popen("node0", cmd, log=log, env=c.env("node0", **c.s3), cwd=REPO)


@pytest.mark.parametrize("key", ["mlflow.tracking_uri", "train.checkpoint_dir"])
def test_multinode_mistakes_end_the_job_with_one_line_before_workers_start(ray_cluster, key):
    """No tracking URI: the run would go to a sqlite file on the driver's node; a checkpoint folder
    on each node's own disk: each node would resume its own checkpoints."""
    c = ray_cluster
    log = c.root / f"ray-mistake-{key}.log"
    if key == "mlflow.tracking_uri":
        proc = plain_submit(c, log, "train.steps=4", "train.run_name=mistake-tracking")
    else:
        proc = submit(c, log, "train.steps=4", "train.run_name=mistake-ckpt", "train.checkpoint_dir=/scratch/ckpt")
    proc.wait(timeout=240)
    text = log.read_text()
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith(f"error: {key}: "), text[-3000:]
    assert "world_rank=" not in text, "no training worker started"


# ------------------------------------------------------------------------------------------ S3
def test_s3_server_in_the_services_namespace_is_one_store_for_every_node(cluster):
    """Nodes that share no folder share objects: written from node1, read back on node0."""
    c = cluster
    env = c.s3
    put = ("import boto3; s3 = boto3.client('s3'); s3.create_bucket(Bucket='shared'); "
           "s3.put_object(Bucket='shared', Key='probe', Body=b'from node1')")
    c.run("node1", [BIN / "python", "-c", put], env=c.env("node1", **env))
    get = "import boto3; print(boto3.client('s3').get_object(Bucket='shared', Key='probe')['Body'].read().decode())"
    assert c.run("node0", [BIN / "python", "-c", get], env=c.env("node0", **env)).stdout.strip() == "from node1"
