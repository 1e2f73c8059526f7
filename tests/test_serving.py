"""The registered model behind `mlflow models serve`, over real HTTP on 127.0.0.1.

A freshly initialised tiny U-Net is logged through the same `RunLogger.model` training calls, to a
real `mlflow server`, and served from `models:/<name>/<version>` with `--env-manager local`.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BIN, clean_env, free_port, run
from unet_dist.serving.pyfunc import BadRequest, decode_batch, decode_image

MAX_PIXELS = 200_000  # the server's limit in these tests: 256x512 fits, 500x500 does not
SIZES = [(128, 128), (256, 512)]


def png_b64(photo: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def register(tracking_uri: str, name: str, padding: str, spool_dir: Path) -> str:
    """Log a fresh tiny U-Net through the training path's logger; register it under ``name``."""
    from unet_dist.config import load_config
    from unet_dist.model import UNet
    from unet_dist.tracking import RunLogger, start_run

    cfg = load_config(None, [f"mlflow.tracking_uri={tracking_uri}", f"mlflow.registered_model={name}",
                             "mlflow.system_metrics=false", "model.width=2", "model.depth=3",
                             f"model.padding={padding}", "model.batch_norm=false"])
    run_id = start_run(cfg, resume_run_id=None, tags={"test": "serving"})
    logger = RunLogger(cfg, run_id, resumed=False, spool_dir=str(spool_dir))
    logger.model(UNet.from_config(cfg.model), cfg, (32, 48))
    assert logger.close().pending == 0
    return f"models:/{name}/1"


@pytest.fixture(scope="module", params=["same", "valid"])
def served(request, mlflow_server, tmp_path_factory):
    """`mlflow models serve` of a registered model, plus `python -m unet_dist.predict` on the same photos."""
    padding = request.param
    tmp = tmp_path_factory.mktemp(f"serve-{padding}")
    uri = register(mlflow_server, f"unet-serve-{padding}", padding, tmp)
    port = free_port()
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server, UNET_SERVE_MAX_PIXELS=str(MAX_PIXELS))
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow models serve did not start:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.5)
    src = tmp / "photos"
    src.mkdir()
    for i, photo in enumerate(photos()):
        Image.fromarray(photo).save(src / f"p{i}.png")
    run([sys.executable, "-m", "unet_dist.predict", "--model", uri, "--input", str(src), "--out", str(tmp / "pred"),
         "--device", "cpu"], cwd=tmp, env=clean_env(MLFLOW_TRACKING_URI=mlflow_server))
    expected = [np.asarray(Image.open(tmp / "pred" / f"p{i}_trainIds.png")) for i in range(len(SIZES))]
    yield {"url": url, "expected": expected, "padding": padding, "uri": uri, "tracking_uri": mlflow_server}
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def decode_mask(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.mark.slow
def test_served_photos_come_back_as_masks_of_their_size_equal_to_predict(served):
    body = {"dataframe_split": {"columns": ["image"], "data": [[png_b64(p)] for p in photos()]},
            "params": {"color_mask": True, "class_pixels": True}}
    status, out = post(served["url"], body)
    assert status == 200, out
    preds = out["predictions"]
    assert [(p["height"], p["width"]) for p in preds] == SIZES
    for pred, expected, (h, w) in zip(preds, served["expected"], SIZES):
        mask = decode_mask(pred["mask"])
        assert mask.shape == (h, w) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, expected)  # the same inference path as `predict`
        assert decode_mask(pred["color_mask"]).shape == (h, w, 3)
        assert sum(pred["class_pixels"].values()) == h * w


@pytest.mark.slow
def test_served_model_takes_uint8_arrays_and_returns_array_masks(served):
    small = photos()[0]
    body = {"dataframe_records": [{"pixels": small.tolist()}], "params": {"mask_format": "array"}}
    status, out = post(served["url"], body)
    assert status == 200, out
    np.testing.assert_array_equal(np.array(out["predictions"][0]["mask"], dtype=np.uint8), served["expected"][0])


BAD = {
    "not an image": ({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"hello").decode()]]}},
                     "photo 0 image: not a readable PNG or JPEG image"),
    "wrong channel count": ({"dataframe_records": [{"pixels": np.zeros((4, 4, 4), int).tolist()}]},
                            "photo 0 pixels: expected a uint8 HxWx3 array"),
    "empty batch": ({"dataframe_records": []}, "empty batch"),
    "oversized image": ({"dataframe_split": {"columns": ["image"],
                                             "data": [[png_b64(np.zeros((500, 500, 3), np.uint8))]]}},
                        f"over the limit of {MAX_PIXELS}"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_one_line_4xx_and_the_server_keeps_serving(served, case):
    body, expected = BAD[case]
    status, out = post(served["url"], body)
    assert 400 <= status < 500, (status, out)
    assert expected in out["message"] and "\n" not in out["message"] and len(out["message"]) < 300, out
    status, out = post(served["url"], {"dataframe_split": {"columns": ["image"], "data": [[png_b64(photos()[0])]]}})
    assert status == 200 and out["predictions"][0]["height"] == 128


@pytest.mark.slow
def test_logged_model_holds_no_pickles_and_its_weights_load_tensor_only(served):
    import mlflow
    import torch

    local = mlflow.artifacts.download_artifacts(served["uri"], tracking_uri=served["tracking_uri"])
    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    assert {"logged_code.py", "artifacts/weights.pt", "artifacts/unet_config.json",
            "artifacts/preprocessing.json", "artifacts/labels.json", "serving_input_example.json"} <= files
    assert not any(f.endswith((".pkl", ".pickle")) for f in files), files
    state = torch.load(f"{local}/artifacts/weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_bad_request_keeps_its_one_line_when_the_scoring_server_rewrites_it():
    err = BadRequest("photo 0 image: not a readable PNG or JPEG image")
    err.message = f"Failed to predict data '{'x' * 1000}'. \nError: {err.message}"  # what the server does
    assert err.get_http_status_code() == 400
    assert json.loads(err.serialize_as_json())["message"] == "photo 0 image: not a readable PNG or JPEG image"


def test_oversized_photo_is_refused_from_its_header_and_grayscale_reads_as_rgb():
    big = base64.b64decode(png_b64(np.zeros((300, 400, 3), np.uint8)))
    with pytest.raises(BadRequest, match=r"photo 0 image: 400x300 is 120000 pixels, over the limit of 1000"):
        decode_batch([{"image": big, "pixels": None}], max_pixels=1000, max_batch=4)
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), "photo", 1000).shape == (5, 7, 3)  # as `predict` reads it
    with pytest.raises(BadRequest, match="exactly one of 'image'"):
        decode_batch([{"image": big, "pixels": [[[0, 0, 0]]]}], max_pixels=10**6, max_batch=4)
    with pytest.raises(BadRequest, match="batch of 5 photos is over the limit of 4"):
        decode_batch([{"pixels": [[[0, 0, 0]]]}] * 5, max_pixels=10**6, max_batch=4)


def test_a_model_logged_before_the_serving_package_still_builds_its_pyfunc(tmp_path):
    """Models logged before unet_dist/serving/ keep a `serving_model.py` that imports unet_dist.serve;
    MLflow runs that file when it loads them."""
    import runpy

    import mlflow.models.model as mlflow_model

    from unet_dist.serving.pyfunc import PhotoSegmenter

    old = tmp_path / "serving_model.py"
    old.write_text("import mlflow\n\nfrom unet_dist.serve import PhotoSegmenter\n\nmlflow.models.set_model(PhotoSegmenter())\n")
    try:
        runpy.run_path(str(old))
        assert isinstance(mlflow_model.__mlflow_model__, PhotoSegmenter)
    finally:
        mlflow_model.__mlflow_model__ = None
