"""Ray Train through `ray job submit` on a real Ray head, logging to a real `mlflow server`.

One job trains and checkpoints, a second submission with more steps resumes it; the MLflow run is
then read back with MlflowClient, and the registered model is loaded and used for prediction.
"""
import re
import sys

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, clean_env, run
from unet_dist import checkpoint

pytestmark = pytest.mark.slow  # a Ray head, an mlflow server and submitted jobs

MODEL_NAME = "unet-test"


def submit(ray_head, mlflow_uri, tmp, shards, steps):
    sets = [f"shards.dir={shards}", f"train.checkpoint_dir={tmp / 'ckpt'}", f"train.steps={steps}",
            "train.run_name=ray-test", "train.workers=2", "train.checkpoint_every=3", "train.eval_every=3",
            "train.log_every=1", "train.warmup_steps=0", "train.batch_size=2", "train.crop=[32,32]", "train.loader_workers=0",
            "model.width=4", "model.depth=3", "mlflow.experiment=ray-tests",
            f"mlflow.registered_model={MODEL_NAME}", "mlflow.system_metrics=true", "mlflow.system_metrics_interval=0.5"]
    env = clean_env(RAY_ADDRESS=ray_head["dashboard"], MLFLOW_TRACKING_URI=mlflow_uri,
                    CONFIG="jobs/configs/demo.yaml")
    return run(["bash", str(REPO / "jobs" / "submit_ray.sh"), *sets], cwd=tmp, env=env, timeout=420)


@pytest.fixture(scope="module")
def jobs(ray_head, mlflow_server, small_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayjob")
    first = submit(ray_head, mlflow_server, tmp, small_shards, 6)
    second = submit(ray_head, mlflow_server, tmp, small_shards, 9)
    return {"tmp": tmp, "first": first.stdout + first.stderr, "second": second.stdout + second.stderr,
            "uri": mlflow_server, "shards": small_shards}


def run_id_of(log: str) -> str:
    return re.search(r"MLflow run\s+(\w{32})", log).group(1)


def test_submitted_job_trains_with_two_workers_and_checkpoints(jobs):
    assert "SUCCEEDED" in jobs["first"], jobs["first"][-3000:]
    assert "world 2" in jobs["first"]
    meta = checkpoint.read_meta(checkpoint.find_latest(jobs["tmp"] / "ckpt" / "ray-test"))
    assert meta["step"] == 9 and meta["launcher"] == "ray"


def test_second_submission_resumes_step_count_in_the_same_mlflow_run(jobs):
    assert re.search(r"resumed from .*checkpoint_step-00000006 at step 6", jobs["second"]), jobs["second"][-3000:]
    assert "step 7/9" in jobs["second"] and "step 1/9" not in jobs["second"]
    assert run_id_of(jobs["first"]) == run_id_of(jobs["second"])


def test_mlflow_run_holds_params_metrics_pictures_and_registered_model(jobs):
    client = MlflowClient(jobs["uri"])
    run_id = run_id_of(jobs["second"])
    r = client.get_run(run_id)
    assert r.data.params["train.steps"] in ("6", "9") and r.data.params["model.width"] == "4"
    assert r.data.tags["launcher"] == "ray" and r.data.tags["world_size"] == "2"
    assert r.data.tags["device"] == "cpu" and len(r.data.tags["shards_manifest_sha256"]) == 64
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(loss_steps) == list(range(1, 10)), "each step logged exactly once across the resume"
    assert [m.step for m in client.get_metric_history(run_id, "val/miou")] == [3, 6, 9]
    assert client.get_metric_history(run_id, "val_iou/road")
    assert client.get_metric_history(run_id, "train/images_per_s")
    assert any(k.startswith("system/") for k in r.data.metrics), "system metrics are logged"
    files = {a.path for a in client.list_artifacts(run_id)} | \
        {a.path for d in ("eval", "data") for a in client.list_artifacts(run_id, d)}
    assert {"config.yaml", "data/manifest.json", "data/quantizer.json", "data/kmeans_clusters.png",
            "eval/predictions_step_0000003.png", "eval/confusion_step_0000009.png"} <= files
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert versions and versions[0].run_id == run_id


def test_registered_model_loads_with_mlflow_and_predicts(jobs):
    mlflow.set_tracking_uri(jobs["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    out = model.predict({"pixels": [np.zeros((32, 48, 3), np.uint8)]}, params={"mask_format": "array"})
    assert np.array(out[0]["mask"]).shape == (32, 48)


@pytest.mark.parametrize("source", ["checkpoint", "registry"])
def test_predict_and_evaluate_accept_checkpoints_and_registered_models(jobs, source, tmp_path):
    spec = str(jobs["tmp"] / "ckpt" / "ray-test") if source == "checkpoint" else f"models:/{MODEL_NAME}/1"
    env = clean_env(MLFLOW_TRACKING_URI=jobs["uri"])
    run_id = run_id_of(jobs["second"])
    ev = run([sys.executable, "-m", "unet_dist.evaluate", "--model", spec, "--shards", str(jobs["shards"]),
              "--log-to-run", run_id, "--step", "9"], cwd=tmp_path, env=env)
    miou = float(re.search(r"mIoU\s+(0\.\d{4})", ev.stdout).group(1))
    client = MlflowClient(jobs["uri"])
    assert abs(client.get_metric_history(run_id, "eval/val_miou")[-1].value - miou) < 1e-4
    assert "eval/val_confusion.png" in {a.path for a in client.list_artifacts(run_id, "eval")}
    assert client.get_run(run_id).info.status == "FINISHED"  # logging an evaluation leaves the status
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(photos / "a.png")
    run([sys.executable, "-m", "unet_dist.predict", "--model", spec, "--input", str(photos), "--out",
         str(tmp_path / "out")], cwd=tmp_path, env=env)
    mask = Image.open(tmp_path / "out" / "a_color.png")
    assert mask.size == (70, 45) and mask.mode == "RGB"
    assert (tmp_path / "out" / "a_overlay.jpg").is_file() and (tmp_path / "out" / "a_trainIds.png").is_file()
