"""Shards, checkpoints and MLflow artifacts on S3, against a real S3 server process (moto standalone).

The package reaches it exactly as it reaches AWS: boto3 and pyarrow with AWS_ENDPOINT_URL and
credentials from the standard variables. Tiny data (64x64 samples, a few steps) keeps each job short.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, REPO, assert_only_error, clean_env, mlflow_server_process, run

pytestmark = pytest.mark.slow  # an S3 server process, preprocess/torchrun/Ray jobs, an mlflow server

SETS = ["data.resize=[64,64]", "quantize.sample_pixels=20000", "shards.samples_per_shard=1", "shards.processes=2"]
TRAIN = ["train.batch_size=2", "train.crop=[32,32]", "train.loader_workers=1", "train.log_every=1",
         "train.warmup_steps=0",
         "model.width=4", "model.depth=3", "train.eval_every=3", "train.checkpoint_every=3",
         "mlflow.registered_model=", "mlflow.system_metrics=false"]


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def preprocess_cmd(raw: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "unet_dist.preprocess", *sets(f"data.root={raw}", f"shards.dir={out}", *SETS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3_server):
    """Raw pairs, a local preprocess run (the reference bytes) and the same config run into S3."""
    tmp = tmp_path_factory.mktemp("s3data")
    raw = tmp / "raw"
    run([sys.executable, "-m", "unet_dist.synth", "--layout", "pairs", "--out", str(raw), "--train", "24",
         "--val", "4", "--seed", "0"], cwd=tmp)
    run(preprocess_cmd(raw, str(tmp / "local")), cwd=tmp)
    bucket = s3_server.bucket("shards")
    env = clean_env(**s3_server.env)
    done = run(preprocess_cmd(raw, f"s3://{bucket}/demo"), cwd=tmp, env=env)
    return {"tmp": tmp, "raw": raw, "local": tmp / "local", "bucket": bucket, "url": f"s3://{bucket}/demo",
            "env": env, "stdout": done.stdout}


def local_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def without_dir(manifest: bytes) -> dict:
    m = json.loads(manifest)
    m["config"]["shards"]["dir"] = "-"
    return m


# --------------------------------------------------------------------------------- preprocess
def test_preprocess_to_s3_writes_the_objects_of_a_local_run(data, s3_server):
    objects = {k[len("demo/"):]: v for k, v in s3_server.objects(data["bucket"], "demo/").items()}
    local = local_files(data["local"])
    assert objects.keys() == local.keys()
    assert sum(k.endswith(".tar") for k in objects) == 28
    for key in objects:
        if key == "manifest.json":  # records shards.dir, the one key that differs
            assert without_dir(objects[key]) == without_dir(local[key])
        else:
            assert objects[key] == local[key], key
    assert f"shards: {data['url']}" in data["stdout"]
    assert not (data["tmp"] / "s3:").exists()


def test_killed_preprocess_to_s3_resumes_and_ends_with_identical_objects(data, s3_server, tmp_path):
    bucket = s3_server.bucket("resume")
    reference = {k[len("demo/"):]: v for k, v in s3_server.objects(data["bucket"], "demo/").items()}
    proc = subprocess.Popen(preprocess_cmd(data["raw"], f"s3://{bucket}/demo"), cwd=tmp_path, env=data["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client, seen = s3_server.client(), []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            got = client.list_objects_v2(Bucket=bucket, Prefix="demo/").get("Contents", [])
            seen = [o for o in got if o["Key"].endswith(".tar")]
            for o in seen:  # an object under its final key is always complete
                assert o["Size"] == len(reference[o["Key"][len("demo/"):]])
            if len(seen) >= 4:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and its pool workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    partial = {k[len("demo/"):]: v for k, v in s3_server.objects(bucket, "demo/").items()}
    assert "manifest.json" not in partial
    tars = {k: v for k, v in partial.items() if k.endswith(".tar")}
    assert 0 < len(tars) < 28 and all(reference[k] == v for k, v in tars.items())

    again = run(preprocess_cmd(data["raw"], f"s3://{bucket}/demo"), cwd=tmp_path, env=data["env"])
    assert "resuming:" in again.stderr
    final = {k[len("demo/"):]: v for k, v in s3_server.objects(bucket, "demo/").items()}
    assert final.keys() == reference.keys()
    assert all(final[k] == reference[k] for k in final if k != "manifest.json")
    assert without_dir(final["manifest.json"]) == without_dir(reference["manifest.json"])


def test_training_stream_from_s3_yields_the_batches_of_the_local_shards(data, s3_env):
    """Ranged GETs (one per sample) give the bytes a seek in the local tar gives."""
    import torch

    from unet_dist.data import shards
    from unet_dist.data.augment import Augment
    from unet_dist.data.stream import index_shards, train_stream

    aug = Augment(crop=(16, 24), scale=(0.75, 1.25), flip=True)

    def first_batches(where: str) -> list:
        urls = shards.shard_paths(where, shards.load_manifest(where), "train")
        it = iter(train_stream(urls, aug, 3, rank=1, world=2, seed=3, start=2, workers=0, pin_memory=False))
        return [next(it) for _ in range(3)]

    local = str(data["local"])
    assert [k for _, k, _ in index_shards(shards.shard_paths(data["url"], shards.load_manifest(data["url"]), "train"))] \
        == [k for _, k, _ in index_shards(shards.shard_paths(local, shards.load_manifest(local), "train"))]
    for (photos, labels, plans), (photos2, labels2, plans2) in zip(first_batches(data["url"]), first_batches(local)):
        assert torch.equal(plans, plans2)
        assert all(torch.equal(a, b) for a, b in zip(photos + labels, photos2 + labels2))


def test_mangled_s3_url_is_refused_and_writes_no_local_folder(data, tmp_path):
    proc = run(preprocess_cmd(data["raw"], "s3:/bucket/shards"), cwd=tmp_path, env=data["env"], check=False)
    assert_only_error(proc, "s3:/bucket/shards", "s3://BUCKET/PREFIX")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------- bad input, one line
def train_cli(data, tmp: Path, shards: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """The Ray driver; each case here must stop in the preflight, before Ray or an MLflow run starts."""
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "unet_dist.train",
           *sets(f"shards.dir={shards}", f"train.checkpoint_dir=s3://{data['bucket']}/ckpt", *TRAIN, *extra)]
    return run(cmd, cwd=tmp, env=env, check=False, timeout=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_bucket_is_one_line_before_anything_starts(data, tmp_path):
    assert_only_error(train_cli(data, tmp_path, "s3://no-such-bucket/demo", data["env"]),
                   "bucket 'no-such-bucket' does not exist")
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_prefix_is_one_line(data, tmp_path):
    assert_only_error(train_cli(data, tmp_path, f"s3://{data['bucket']}/nothing-here", data["env"]),
                   f"s3://{data['bucket']}/nothing-here: shards directory not found")


def test_missing_credentials_are_one_line(data, tmp_path):
    env = {k: v for k, v in data["env"].items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert_only_error(train_cli(data, tmp_path, data["url"], env), "no AWS credentials found")


def test_unreachable_endpoint_is_retried_then_one_line(data, tmp_path):
    port = closed_port()
    env = {**data["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2"}
    proc = train_cli(data, tmp_path, data["url"], env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"cannot reach http://127.0.0.1:{port} after 2 attempts" in errors[0]
    assert "retry 1 of 1" in proc.stderr and "Traceback" not in proc.stderr  # the retry is logged


def test_manifest_without_its_shards_is_one_line(data, s3_server, tmp_path):
    c = s3_server.client()
    manifest = c.get_object(Bucket=data["bucket"], Key="demo/manifest.json")["Body"].read()
    c.put_object(Bucket=data["bucket"], Key="lonely/manifest.json", Body=manifest)
    assert_only_error(train_cli(data, tmp_path, f"s3://{data['bucket']}/lonely", data["env"]),
                   f"s3://{data['bucket']}/lonely/train-000000.tar: shard listed in the manifest is missing")


# ----------------------------------------------------------------------------- torchrun from S3
@pytest.fixture(scope="module")
def torchrun_job(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3torchrun")
    env = {**data["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "unet_dist.train",
           *sets(f"shards.dir={data['url']}", f"train.checkpoint_dir=s3://{data['bucket']}/ckpt",
                 "train.run_name=tr", "train.steps=6", *TRAIN)]
    proc = run(cmd, cwd=tmp, env=env, timeout=300)
    return {"tmp": tmp, "env": env, "text": proc.stdout + proc.stderr, "run": f"s3://{data['bucket']}/ckpt/tr"}


def test_torchrun_with_two_ranks_trains_from_s3_and_checkpoints_to_s3(torchrun_job, data, s3_server):
    assert "world 2" in torchrun_job["text"], torchrun_job["text"][-3000:]
    keys = set(s3_server.objects(data["bucket"], "ckpt/tr/"))
    assert {"ckpt/tr/checkpoint_step-00000006/checkpoint.pt", "ckpt/tr/checkpoint_step-00000006/meta.json",
            "ckpt/tr/checkpoint_step-00000003/meta.json"} <= keys
    meta = json.loads(s3_server.objects(data["bucket"], "ckpt/tr/checkpoint_step-00000006/meta.json")
                      ["ckpt/tr/checkpoint_step-00000006/meta.json"])
    assert meta["step"] == 6 and meta["launcher"] == "torchrun" and meta["world_size"] == 2
    assert not (torchrun_job["tmp"] / "s3:").exists()


def test_evaluate_and_predict_take_a_checkpoint_and_shards_on_s3(torchrun_job, data, tmp_path):
    ev = run([sys.executable, "-m", "unet_dist.evaluate", "--model", torchrun_job["run"], "--shards", data["url"]],
             cwd=tmp_path, env=data["env"])
    assert "mIoU" in ev.stdout, ev.stdout
    photo = sorted((data["raw"] / "val").iterdir())[0]
    run([sys.executable, "-m", "unet_dist.predict", "--model", f"{torchrun_job['run']}/checkpoint_step-00000006",
         "--input", str(photo), "--out", str(tmp_path / "pred"), "--pairs"], cwd=tmp_path, env=data["env"])
    assert any((tmp_path / "pred").rglob("*.png"))


def test_a_partly_uploaded_checkpoint_is_never_the_newest(torchrun_job, data, s3_server, tmp_path):
    c, bucket = s3_server.client(), data["bucket"]
    for key, body in s3_server.objects(bucket, "ckpt/tr/checkpoint_step-00000006/").items():
        c.put_object(Bucket=bucket, Key=key.replace("ckpt/tr/", "ckpt/cut/"), Body=body)
    for key, body in s3_server.objects(bucket, "ckpt/tr/checkpoint_step-00000006/").items():
        step9 = key.replace("ckpt/tr/checkpoint_step-00000006", "ckpt/cut/checkpoint_step-00000009")
        if key.endswith("meta.json"):
            c.put_object(Bucket=bucket, Key=step9, Body=body.replace(b'"step": 6', b'"step": 9'))
        else:  # the state cut short: meta.json's state_bytes does not match
            c.put_object(Bucket=bucket, Key=step9, Body=body[: len(body) // 2])
    c.put_object(Bucket=bucket, Key="ckpt/cut/checkpoint_step-00000012/meta.json", Body=b'{"step": 12}')
    code = ("from unet_dist import checkpoint; "
            f"print(checkpoint.find_latest('s3://{bucket}/ckpt/cut'))")
    out = run([sys.executable, "-c", code], cwd=tmp_path, env=data["env"]).stdout.strip()
    assert out == f"s3://{bucket}/ckpt/cut/checkpoint_step-00000006"


def test_corrupted_shard_object_is_one_line_naming_it(torchrun_job, data, s3_server, tmp_path):
    c, bucket = s3_server.client(), data["bucket"]
    for key, body in s3_server.objects(bucket, "demo/").items():
        if key == "demo/val-000001.tar":
            body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]  # same size, one byte flipped
        c.put_object(Bucket=bucket, Key=key.replace("demo/", "corrupt/"), Body=body)
    proc = run([sys.executable, "-m", "unet_dist.evaluate", "--model", torchrun_job["run"],
                "--shards", f"s3://{bucket}/corrupt"], cwd=tmp_path, env=data["env"], check=False)
    assert_only_error(proc, f"s3://{bucket}/corrupt/val-000001.tar: sha256", "does not match the manifest")


# -------------------------------------------------- ray job submit: S3 shards, checkpoints, artifacts
def ckpt_steps(s3_server, bucket: str, prefix: str) -> list[int]:
    keys = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(int(m.group(1)) for o in keys if (m := re.search(r"checkpoint_step-(\d+)/meta\.json$", o["Key"])))


@pytest.fixture(scope="module")
def ray_s3_job(ray_head, data, s3_server, tmp_path_factory):
    """A Ray job from S3 shards with checkpoints on S3, logging to an mlflow server whose artifacts
    live in the bucket; a Ray Train worker is SIGKILLed after the first checkpoint."""
    tmp = tmp_path_factory.mktemp("s3ray")
    bucket, steps = data["bucket"], 36
    server_env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **s3_server.env)
    with mlflow_server_process(tmp, f"s3://{bucket}/mlflow", server_env) as uri:
        job_id = f"s3-ray-{os.getpid()}"
        env = clean_env(RAY_ADDRESS=ray_head["dashboard"], MLFLOW_TRACKING_URI=uri, CONFIG="jobs/configs/demo.yaml")
        run(["bash", str(REPO / "jobs" / "submit_ray.sh"), "--no-wait", "--submission-id", job_id,
             f"shards.dir={data['url']}", f"train.checkpoint_dir=s3://{bucket}/ckpt", "train.run_name=ray",
             f"train.steps={steps}", "train.workers=2", "train.max_failures=1", "mlflow.experiment=s3",
             *TRAIN], cwd=tmp, env=env)

        def logs() -> str:  # the job server's HTTP API: polled fast, unlike the `ray job logs` CLI
            try:
                with urllib.request.urlopen(f"{ray_head['dashboard']}/api/jobs/{job_id}/logs", timeout=10) as r:
                    return json.loads(r.read())["logs"]
            except OSError:
                return ""

        deadline, killed, text = time.time() + 300, None, ""
        while time.time() < deadline and killed is None:
            text = logs()
            done = ckpt_steps(s3_server, bucket, "ckpt/ray/")
            logged = [int(s) for s in re.findall(rf"step (\d+)/{steps} loss", text)]
            pids = {int(r): int(p) for p, r in re.findall(r"pid=(\d+)\) world_rank=(\d+)", text)}
            if done and logged and max(logged) > done[-1] and 0 in pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = (pids[0], done[-1])
            time.sleep(0.1)
        assert killed, f"no checkpoint on S3 and later step to kill after\n{text[-4000:]}"
        waited = run([sys.executable, str(REPO / "jobs" / "ray" / "job_tool.py"), "wait", "--address",
                      ray_head["dashboard"], "--poll", "1", "--timeout", "300", job_id], cwd=tmp, env=env, check=False)
        text = logs()
        client = MlflowClient(uri)
        run_id = re.search(r"MLflow run\s+([0-9a-f]{32})", text).group(1)
        info = client.get_run(run_id).info
        listed = [a.path for a in client.list_artifacts(run_id, "data")]
        return {"status": f"rc={waited.returncode} {waited.stderr.strip()}", "text": text, "killed": killed, "steps": steps, "bucket": bucket,
                "artifact_uri": info.artifact_uri, "listed": listed, "run_id": run_id}


def test_ray_job_trains_from_s3_and_resumes_from_s3_after_a_worker_is_killed(ray_s3_job, s3_server):
    r = ray_s3_job
    assert r["status"].startswith("rc=0 ") and r["status"].endswith("SUCCEEDED"), r["text"][-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", r["text"])]
    assert resumed and resumed[-1] >= r["killed"][1], r["text"][-4000:]
    assert ckpt_steps(s3_server, r["bucket"], "ckpt/ray/")[-1] == r["steps"]


def test_mlflow_artifacts_of_the_run_land_in_the_bucket_through_the_server(ray_s3_job, s3_server):
    r = ray_s3_job
    assert r["artifact_uri"].startswith("mlflow-artifacts:")  # the jobs send artifacts to the server
    assert "data/manifest.json" in r["listed"] and "data/kmeans_clusters.png" in r["listed"]
    keys = list(s3_server.objects(r["bucket"], "mlflow/"))
    assert any(k.endswith(f"{r['run_id']}/artifacts/data/kmeans_clusters.png") for k in keys), keys[:20]
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]
