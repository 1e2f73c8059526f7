"""Batch prediction on Ray Data (`python -m unet_dist.batch_predict`): what it reads, what it writes,
that its masks are predict's bytes, that it resumes, and that the official Cityscapes evaluator
scores its submission-format output exactly as `python -m unet_dist.evaluate` scores the model.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch_helpers import make_checkpoint, write_photos
from conftest import BIN, REPO, assert_only_error, clean_env, patient, run
from unet_dist import labels, mask_files, storage
from unet_dist.batch import inputs
from unet_dist.errors import UnetDistError

PY = sys.executable


# ------------------------------------------------------------------------------- what is read
def test_a_folder_is_read_at_any_depth_and_outputs_mirror_its_tree(tmp_path):
    write_photos(tmp_path, [(8, 8)] * 3, names=["a.png", "day1/b.jpg", "day1/cam2/c.png"])
    (tmp_path / "notes.txt").write_text("not a photo")
    items = inputs.list_items(storage.location(tmp_path))
    assert [i.stem for i in items] == ["a", "day1/b", "day1/cam2/c"]
    assert items[1].source == str(tmp_path / "day1" / "b.jpg")


def test_a_cityscapes_tree_is_read_below_leftImg8bit_and_split_picks_one_split(tmp_path):
    for split, city in (("val", "frankfurt"), ("test", "berlin")):
        write_photos(tmp_path / "leftImg8bit" / split / city, [(8, 8)], names=[f"{city}_000000_000019_leftImg8bit.png"])
    write_photos(tmp_path / "gtFine" / "val" / "frankfurt", [(8, 8)], names=["frankfurt_000000_000019_gtFine_color.png"])
    items = inputs.list_items(storage.location(tmp_path))
    assert [i.stem for i in items] == ["test/berlin/berlin_000000_000019", "val/frankfurt/frankfurt_000000_000019"]
    (only,) = inputs.list_items(storage.location(tmp_path), "test")
    assert mask_files.output_name(only.stem, "cityscapes") == "test/berlin/berlin_000000_000019_labelIds.png"


def test_two_photos_that_would_write_the_same_masks_are_refused_naming_both(tmp_path):
    write_photos(tmp_path, [(8, 8)] * 2, names=["x.png", "x.jpg"])
    with pytest.raises(UnetDistError, match=r"x\.jpg and .*x\.png would write the same outputs"):
        inputs.list_items(storage.location(tmp_path))


def test_an_input_is_done_only_when_every_file_of_every_format_is_there(tmp_path):
    items = [inputs.Item("a.png", "a"), inputs.Item("b.png", "sub/b")]
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a_trainIds.png").write_bytes(b"x")
    (out / "a_color.png").write_bytes(b"x")
    (out / "sub" / "b_trainIds.png").write_bytes(b"x")
    (out / "sub" / ".b_color.png.tmp").write_bytes(b"half")  # a write cut short
    pending = inputs.pending(items, storage.location(out), ("trainid", "color"))
    assert [i.stem for i in pending] == ["sub/b"]


def test_submission_format_maps_train_ids_to_label_ids():
    ids = np.array([[0, 1, 18], [10, 13, 255]], np.uint8)
    got = np.asarray(Image.open(__import__("io").BytesIO(mask_files.encode(ids, "cityscapes"))))
    assert got.tolist() == [[7, 8, 33], [23, 26, 0]]
    lut = labels.id_to_train_id_lut()
    assert (lut[got[ids != 255]] == ids[ids != 255]).all()  # labelIds -> trainIds gives the prediction back


@pytest.mark.slow  # the command in a subprocess
@pytest.mark.parametrize("argv, needle", [
    (["--format", "png"], "--format: expected one or more of trainid|color|cityscapes"),
    (["--batch-size", "0"], "--batch-size"),
    (["--gpus-per-actor", "-1"], "--gpus-per-actor"),
])
def test_bad_arguments_are_one_line(tmp_path, argv, needle):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    write_photos(tmp_path / "in", [(8, 8)])
    proc = run([PY, "-m", "unet_dist.batch_predict", "--model", str(ckpt), "--input", str(tmp_path / "in"),
                "--out", str(tmp_path / "out"), *argv], cwd=tmp_path, check=False)
    assert_only_error(proc, needle)


@pytest.mark.slow  # the command in a subprocess
def test_out_inside_input_is_refused_before_ray_starts(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    write_photos(tmp_path / "in", [(8, 8)])
    proc = run([PY, "-m", "unet_dist.batch_predict", "--model", str(ckpt), "--input", str(tmp_path / "in"),
                "--out", str(tmp_path / "in" / "masks")], cwd=tmp_path, check=False)
    assert_only_error(proc, "--out", "must not be inside --input")


@pytest.mark.slow  # the command in a subprocess
def test_an_empty_input_folder_is_one_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "in").mkdir()
    proc = run([PY, "-m", "unet_dist.batch_predict", "--model", str(ckpt), "--input", str(tmp_path / "in"),
                "--out", str(tmp_path / "out")], cwd=tmp_path, check=False)
    assert_only_error(proc, "--input: no photos found in", str(tmp_path / "in"))


# ------------------------------------------------------------------ local Ray: predict's bytes
@pytest.mark.slow
def test_masks_are_predicts_bytes_a_rerun_skips_them_and_a_bad_photo_is_reported(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", width=4, depth=3)
    photos = write_photos(tmp_path / "in", [(64, 96)] * 5 + [(40, 50)], names=[f"p{i}.png" for i in range(5)] + ["cam/q.png"])
    (tmp_path / "in" / "cam" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = [PY, "-m", "unet_dist.batch_predict", "--model", str(ckpt), "--input", str(tmp_path / "in"),
           "--out", str(tmp_path / "out"), "--format", "trainid,color", "--actors", "2", "--batch-size", "2",
           "--cpus-per-actor", "0.5", "--cpus-per-task", "0.5"]  # 2 actors and both tasks on this 2-CPU Ray
    first = run(cmd, cwd=tmp_path, env=env, check=False)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "7 inputs" in first.stdout and "0 already done" in first.stdout, first.stdout[-2000:]
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 7 inputs could not be predicted") and "broken.jpg" in last, first.stderr[-2000:]

    run([PY, "-m", "unet_dist.predict", "--model", str(ckpt), "--input", str(tmp_path / "in" / "p0.png"),
         "--out", str(tmp_path / "single")], cwd=tmp_path)
    run([PY, "-m", "unet_dist.predict", "--model", str(ckpt), "--input", str(tmp_path / "in" / "cam" / "q.png"),
         "--out", str(tmp_path / "single")], cwd=tmp_path)
    for stem, single in (("p0", "p0"), ("cam/q", "q")):
        for fmt in ("trainid", "color"):
            got = (tmp_path / "out" / mask_files.output_name(stem, fmt)).read_bytes()
            assert got == (tmp_path / "single" / mask_files.output_name(single, fmt)).read_bytes(), (stem, fmt)
    assert Image.open(tmp_path / "out" / "cam" / "q_trainIds.png").size == (50, 40)
    assert len(list((tmp_path / "out").rglob("*_trainIds.png"))) == len(photos)

    again = run(cmd, cwd=tmp_path, env=env, check=False)
    assert "6 already done" in again.stdout and "1 to predict" in again.stdout, again.stdout[-2000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("unet-batch-predict")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    m = runs[0].data.metrics
    assert (m["inputs"], m["predicted"], m["failed"], m["skipped_done"]) == (7, 6, 1, 0) and m["images_per_s"] > 0
    assert runs[0].data.tags["checkpoint_step"] == "7" and runs[0].info.status == "FAILED"
    assert runs[1].data.metrics["skipped_done"] == 6


# ------------------------------------------------------------ the official evaluator agrees
EVALUATOR = """
import json, os, sys
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev
ev.args.evalInstLevelScore = False  # nIoU needs gtFine_instanceIds PNGs, which the synthetic tree has not
ev.args.quiet = True
sys.argv = [sys.argv[0]]
ev.main()
"""


@pytest.mark.slow
def test_official_evaluator_scores_the_submission_format_as_evaluate_scores_the_shards(tmp_path):
    raw, shards, preds = tmp_path / "raw", tmp_path / "shards", tmp_path / "preds"
    run([PY, "-m", "unet_dist.synth", "--layout", "cityscapes", "--out", str(raw), "--train", "2", "--val", "6",
         "--size", "128x256"], cwd=tmp_path)
    run([PY, "-m", "unet_dist.preprocess", "--set", f"data.root={raw}", "--set", "data.layout=cityscapes",
         "--set", "data.label_source=labelIds", "--set", "data.resize=null", "--set", f"shards.dir={shards}"],
        cwd=tmp_path)
    ckpt = make_checkpoint(tmp_path / "ckpt", width=8, depth=3, seed=3)
    ours = json.loads(run([PY, "-m", "unet_dist.evaluate", "--model", str(ckpt), "--shards", str(shards),
                           "--device", "cpu", "--json"], cwd=tmp_path).stdout)
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run([PY, "-m", "unet_dist.batch_predict", "--model", str(ckpt), "--input", str(raw), "--split", "val",
         "--out", str(preds), "--format", "cityscapes", "--actors", "1"], cwd=tmp_path, env=env)
    written = sorted(p.relative_to(preds).as_posix() for p in preds.rglob("*.png"))
    assert len(written) == 6 and all(p.startswith("val/") and p.endswith("_labelIds.png") for p in written), written

    export = tmp_path / "official"
    run([PY, "-c", EVALUATOR], cwd=tmp_path, env=clean_env(CITYSCAPES_DATASET=str(raw), CITYSCAPES_RESULTS=str(preds),
                                                          CITYSCAPES_EXPORT_DIR=str(export.mkdir() or export)))
    official = json.loads((export / "resultPixelLevelSemanticLabeling.json").read_text())
    predicted = {n for n, v in ours["iou"].items() if v is not None and v > 0}
    assert len(predicted) >= 3, ours["iou"]  # a comparison over several classes, not one
    for name in labels.CLASS_NAMES:  # the 19 evaluated classes, by name in both
        theirs, mine = official["classScores"][name], ours["iou"][name]
        if mine is None:
            assert theirs != theirs, (name, theirs)  # NaN: the class is in neither truth nor prediction
        else:
            assert abs(theirs - mine) <= 1e-6, (name, theirs, mine)
    assert abs(official["averageScoreClasses"] - ours["miou"]) <= 1e-6
    assert sum(not np.isnan(v) for v in official["classScores"].values()) == sum(v is not None for v in ours["iou"].values())


# ------------------------------------------- a Ray cluster and S3: a killed actor, a killed driver
def submit(ray_head, tmp, job_id: str, out: str, photos: str, ckpt: Path, mlflow_uri: str):
    # the head has 2 CPUs: half of one for the driver, 2 actors x 0.5 and the tasks in the rest
    env = clean_env(RAY_ADDRESS=ray_head["dashboard"], MLFLOW_TRACKING_URI=mlflow_uri, ENTRYPOINT_NUM_CPUS="0.5",
                    RAY_DEDUP_LOGS="0", FORWARD_ENV="MLFLOW_TRACKING_URI RAY_DEDUP_LOGS")  # every actor's lines
    run(["bash", str(REPO / "jobs" / "submit_batch_predict.sh"), "--no-wait", "--submission-id", job_id, "--",
         "--model", str(ckpt), "--input", photos, "--out", out, "--actors", "2", "--batch-size", "1",
         "--cpus-per-actor", "0.5", "--cpus-per-task", "0.5"], cwd=tmp, env=env)


def job_logs(ray_head, job_id: str) -> str:
    try:
        with urllib.request.urlopen(f"{ray_head['dashboard']}/api/jobs/{job_id}/logs", timeout=10) as r:
            return json.loads(r.read())["logs"]
    except OSError:
        return ""


def job_info(ray_head, job_id: str) -> dict:
    with urllib.request.urlopen(f"{ray_head['dashboard']}/api/jobs/{job_id}", timeout=10) as r:
        return json.loads(r.read())


def job_status(ray_head, job_id: str) -> str:
    return job_info(ray_head, job_id)["status"]


def wait_until(what, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + patient(timeout)
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(poll)
    return None


def masks(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix):]: v for k, v in s3_server.objects(bucket, prefix).items()}


@pytest.mark.slow
def test_on_a_ray_cluster_and_s3_a_killed_actor_is_replaced_and_a_killed_driver_is_resumed(ray_head, s3_server, tmp_path):
    n = 30
    bucket = s3_server.bucket("batch")
    ckpt = make_checkpoint(tmp_path / "ckpt", width=32, depth=4, seed=2)  # ~0.5 s a photo: time to kill mid-job
    client = s3_server.client()
    for path in write_photos(tmp_path / "photos", [(192, 384)] * n, names=[f"cam/{i:03d}.jpg" for i in range(n)]):
        client.put_object(Bucket=bucket, Key=f"photos/{path.relative_to(tmp_path / 'photos')}", Body=path.read_bytes())
    photos, uri = f"s3://{bucket}/photos", f"sqlite:///{tmp_path / 'mlflow.db'}"

    # 1. an actor SIGKILLed while the job runs: Ray Data restarts it and retries its batch
    job = f"batch-actor-{os.getpid()}"
    submit(ray_head, tmp_path, job, f"s3://{bucket}/a", photos, ckpt, uri)
    pids = wait_until(lambda: [int(p) for p in re.findall(r"predictor ready on cpu \(pid (\d+)\)", job_logs(ray_head, job))]
                      if masks(s3_server, bucket, "a/") else [], 240)
    assert pids, job_logs(ray_head, job)[-4000:]
    os.kill(pids[0], signal.SIGKILL)
    at_kill = len(masks(s3_server, bucket, "a/"))
    assert wait_until(lambda: job_status(ray_head, job) in ("SUCCEEDED", "FAILED", "STOPPED"), 300)
    text = job_logs(ray_head, job)
    assert job_status(ray_head, job) == "SUCCEEDED", text[-4000:]
    assert at_kill < n, "the job ended before the actor was killed"
    full = masks(s3_server, bucket, "a/")
    assert sorted(full) == [f"cam/{i:03d}_trainIds.png" for i in range(n)]
    ready = set(re.findall(r"predictor ready on cpu \(pid (\d+)\)", text))
    # Every photo was predicted although an actor died mid-job: its batch went to a live actor. (The
    # restarted actor's "ready" line may come after the driver has stopped forwarding logs.)
    assert str(pids[0]) in ready, text[-4000:]
    assert "TaskPoolMapOperator[MapBatches(decode)] -> ActorPoolMapOperator[MapBatches(Predictor)]" in text, text[-4000:]

    # 2. the driver SIGKILLed mid-job, then the same command again: only the rest is predicted
    job = f"batch-driver-{os.getpid()}"
    submit(ray_head, tmp_path, job, f"s3://{bucket}/b", photos, ckpt, uri)
    assert wait_until(lambda: len(masks(s3_server, bucket, "b/")) >= 4, 240), job_logs(ray_head, job)[-4000:]
    os.kill(int(job_info(ray_head, job)["driver_info"]["pid"]), signal.SIGKILL)
    assert wait_until(lambda: job_status(ray_head, job) in ("STOPPED", "FAILED", "SUCCEEDED"), 120)
    time.sleep(3)  # the job's workers go with their driver; a write in flight ends one way or the other
    done_before = len(masks(s3_server, bucket, "b/"))
    assert 4 <= done_before < n, done_before
    again = f"batch-rerun-{os.getpid()}"
    submit(ray_head, tmp_path, again, f"s3://{bucket}/b", photos, ckpt, uri)
    assert wait_until(lambda: job_status(ray_head, again) in ("SUCCEEDED", "FAILED", "STOPPED"), 300)
    text = job_logs(ray_head, again)
    assert job_status(ray_head, again) == "SUCCEEDED", text[-4000:]
    skipped = int(re.search(r"(\d+) already done", text).group(1))
    assert skipped == done_before and f"{n - done_before} to predict" in text, text[-3000:]
    assert masks(s3_server, bucket, "b/") == full  # the same bytes as the uninterrupted job

    from mlflow.tracking import MlflowClient

    mlc = MlflowClient(uri)
    runs = mlc.search_runs([mlc.get_experiment_by_name("unet-batch-predict").experiment_id],
                           order_by=["attributes.start_time ASC"])
    last = runs[-1].data
    assert (last.metrics["skipped_done"], last.metrics["predicted"], last.metrics["failed"]) == (done_before, n - done_before, 0)
    assert last.params["input"] == photos and last.tags["checkpoint_step"] == "7"
