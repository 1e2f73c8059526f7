"""The whole job on each object store: preprocess -> torchrun -> Ray Train resuming torchrun's
checkpoint -> evaluate, with shards, checkpoints and MLflow artifacts in the store.

One real server process per store (moto's S3, fake-gcs-server, Azurite) on 127.0.0.1, reached
through the standard variables only (AWS_ENDPOINT_URL + keys, STORAGE_EMULATOR_HOST,
AZURE_STORAGE_CONNECTION_STRING), and one `mlflow server` per store proxying artifacts to it
(``--artifacts-destination s3://... | gs://... | wasbs://...``). Tiny data: 64x64 samples, a 4-wide
3-level U-Net, 4 steps under torchrun and 2 more under Ray.
"""
from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import BIN, clean_env, mlflow_server_process, run

pytestmark = pytest.mark.slow

SETS = ["data.resize=[64,64]", "quantize.sample_pixels=20000", "shards.samples_per_shard=4", "shards.processes=2"]
TRAIN = ["train.batch_size=2", "train.warmup_steps=0", "train.crop=[32,32]", "train.loader_workers=0", "train.log_every=1",
         "model.width=4", "model.depth=3", "train.eval_every=2", "train.checkpoint_every=2", "train.workers=2",
         "train.run_name=chain", "mlflow.registered_model=", "mlflow.system_metrics=false", "mlflow.experiment=stores"]
SERVERS = {"s3": "s3_server", "gs": "gcs_server", "az": "azurite"}


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def artifact_destination(scheme: str, bucket: str) -> str:
    """MLflow's own URL for the same place (its Azure store takes wasbs://CONTAINER@ACCOUNT...)."""
    if scheme == "az":
        return f"wasbs://{bucket}@devstoreaccount1.blob.core.windows.net/mlflow"
    return f"{scheme}://{bucket}/mlflow"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores") / "raw"
    run([sys.executable, "-m", "unet_dist.synth", "--layout", "pairs", "--out", str(root), "--train", "16",
         "--val", "4", "--seed", "0"], cwd=root.parent)
    return root


@pytest.fixture(scope="module", params=list(SERVERS))
def chain(request, raw, tmp_path_factory):
    server = request.getfixturevalue(SERVERS[request.param])
    tmp = tmp_path_factory.mktemp(f"chain-{request.param}")
    bucket = server.bucket("chain")
    base = f"{server.scheme}://{bucket}"
    env = clean_env(**server.env)
    server_env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **server.env)
    with mlflow_server_process(tmp, artifact_destination(server.scheme, bucket), server_env) as uri:
        env = {**env, "MLFLOW_TRACKING_URI": uri}
        places = [f"shards.dir={base}/shards", f"train.checkpoint_dir={base}/ckpt"]
        pre = run([sys.executable, "-m", "unet_dist.preprocess", *sets(f"data.root={raw}", *places, *SETS)],
                  cwd=tmp, env=env)
        torchrun = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "unet_dist.train",
                        *sets(*places, *TRAIN, "train.steps=4")], cwd=tmp, env=env, timeout=300)
        ray = run([sys.executable, "-m", "unet_dist.train", *sets(*places, *TRAIN, "train.steps=6")],
                  cwd=tmp, env=env, timeout=400)  # a private local Ray: its workers get this environment
        ev = run([sys.executable, "-m", "unet_dist.evaluate", "--model", f"{base}/ckpt/chain",
                  "--shards", f"{base}/shards", "--json"], cwd=tmp, env=env)
    return {"server": server, "bucket": bucket, "base": base, "tmp": tmp, "pre": pre.stdout,
            "torchrun": torchrun.stdout + torchrun.stderr, "ray": ray.stdout + ray.stderr, "eval": ev.stdout}


def test_preprocess_writes_shards_and_manifest_into_the_store(chain):
    objects = chain["server"].objects(chain["bucket"], "shards/")
    assert {"shards/manifest.json", "shards/quantizer.json", "shards/train-000003.tar", "shards/val-000000.tar"} \
        <= objects.keys()
    manifest = json.loads(objects["shards/manifest.json"])
    assert manifest["config"]["shards"]["dir"] == f"{chain['base']}/shards"
    assert f"shards: {chain['base']}/shards" in chain["pre"] and not (chain["tmp"] / f"{chain['server'].scheme}:").exists()


def test_torchrun_checkpoints_into_the_store_and_ray_resumes_from_it(chain):
    assert "world 2" in chain["torchrun"], chain["torchrun"][-3000:]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", chain["ray"])
    assert resumed and resumed[0] == (f"{chain['base']}/ckpt/chain/checkpoint_step-00000004", "4"), chain["ray"][-4000:]
    objects = chain["server"].objects(chain["bucket"], "ckpt/chain/")
    meta = json.loads(objects["ckpt/chain/checkpoint_step-00000006/meta.json"])
    assert meta["step"] == 6 and meta["launcher"] == "ray" and meta["world_size"] == 2
    assert len(objects["ckpt/chain/checkpoint_step-00000006/checkpoint.pt"]) == meta["state_bytes"]
    ids = {m for text in (chain["torchrun"], chain["ray"]) for m in re.findall(r"MLflow run\s+([0-9a-f]{32})", text)}
    assert len(ids) == 1 and meta["mlflow_run_id"] in ids  # Ray continued torchrun's MLflow run


def test_evaluate_reads_the_checkpoint_and_shards_from_the_store(chain):
    scores = json.loads(chain["eval"])
    assert 0.0 <= scores["miou"] <= 1.0 and 0.0 <= scores["pixel_acc"] <= 1.0


def test_mlflow_artifacts_land_in_the_store_through_the_server(chain):
    keys = list(chain["server"].objects(chain["bucket"], "mlflow/"))
    assert any(k.endswith("/artifacts/data/manifest.json") for k in keys), keys[:20]
    assert any(k.endswith("/artifacts/data/kmeans_clusters.png") for k in keys), keys[:20]
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]
