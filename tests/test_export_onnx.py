"""ONNX export (`python -m unet_dist.export`): a checked file with dynamic height and width whose
logits, run by onnxruntime through the same padding and overlap-tile path, match PyTorch's.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from batch_helpers import make_checkpoint, write_photos
from conftest import assert_only_error, clean_env, run

pytestmark = pytest.mark.slow  # exports and runs paper-depth networks, and the CLIs in subprocesses
PY = sys.executable
SIZES = [(128, 128), (256, 512), (512, 1024)]
TILE = 572  # the paper's tile: at 256x512 and 512x1024 a valid model runs several overlapping tiles


@pytest.fixture(scope="module", params=["same", "valid"])
def exported(request, tmp_path_factory):
    """A paper-depth (5 levels) U-Net with BatchNorm, as a checkpoint and as the ONNX file exported from it."""
    tmp = tmp_path_factory.mktemp(f"onnx-{request.param}")
    ckpt = make_checkpoint(tmp / "ckpt", width=8, depth=5, padding=request.param, batch_norm=True, seed=1)
    out = run([PY, "-m", "unet_dist.export", "--model", str(ckpt), "--format", "onnx", "--out", str(tmp / "unet.onnx")],
              cwd=tmp)
    assert "wrote" in out.stdout and f"{request.param} padding" in out.stdout, out.stdout
    return {"padding": request.param, "ckpt": ckpt, "onnx": tmp / "unet.onnx", "tmp": tmp}


def test_the_file_passes_the_onnx_checker_and_has_dynamic_batch_height_and_width(exported):
    import onnx

    proto = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(proto, full_check=True)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"], dims
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["unet_dist.padding"] == exported["padding"] and props["unet_dist.depth"] == "5"


@pytest.mark.parametrize("size", SIZES)
def test_onnxruntime_logits_match_pytorch_through_the_same_tiling_path(exported, size):
    from unet_dist.onnx_model import OnnxUNet
    from unet_dist.segment import predict_logits
    from unet_dist.serving.loading import load_model

    model, _ = load_model(str(exported["ckpt"]), "cpu")
    ort = OnnxUNet(exported["onnx"])
    x = torch.from_numpy(np.random.default_rng(size[0]).standard_normal((1, 3, *size), dtype=np.float32))
    tile = TILE if exported["padding"] == "valid" else None
    a, b = predict_logits(model, x, tile), predict_logits(ort, x, tile)
    assert a.shape == b.shape == (1, 19, *size)
    assert (a - b).abs().max().item() <= 1e-4
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.9999


def test_predict_takes_the_onnx_file_and_writes_the_checkpoints_masks(exported):
    tmp = exported["tmp"]
    write_photos(tmp / "photos", [(96, 160)], seed=4)
    for name, model in (("torch", exported["ckpt"]), ("onnx", exported["onnx"])):
        run([PY, "-m", "unet_dist.predict", "--model", str(model), "--input", str(tmp / "photos"),
             "--out", str(tmp / name), "--device", "cpu"], cwd=tmp)
    from PIL import Image

    a = np.asarray(Image.open(tmp / "torch" / "p00_trainIds.png"))
    b = np.asarray(Image.open(tmp / "onnx" / "p00_trainIds.png"))
    assert (a == b).mean() >= 0.9999


def test_export_logs_the_file_to_an_mlflow_run_beside_the_model(exported):
    from mlflow.tracking import MlflowClient

    tmp = exported["tmp"]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"export-{exported['padding']}",
                                                        (tmp / "artifacts").as_uri())).info.run_id
    out = run([PY, "-m", "unet_dist.export", "--model", str(exported["ckpt"]), "--out", str(tmp / "again.onnx"),
               "--log-to-run", run_id], cwd=tmp, env=clean_env(MLFLOW_TRACKING_URI=uri))
    assert f"logged to MLflow run {run_id}" in out.stdout
    assert [f.path for f in client.list_artifacts(run_id, "model_onnx")] == ["model_onnx/again.onnx"]


def test_a_file_that_is_not_an_onnx_model_is_one_line(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    write_photos(tmp_path / "photos", [(32, 32)])
    proc = run([PY, "-m", "unet_dist.predict", "--model", str(tmp_path / "x.onnx"), "--input", str(tmp_path / "photos"),
                "--out", str(tmp_path / "out"), "--device", "cpu"], cwd=tmp_path, check=False)
    assert_only_error(proc, "x.onnx: not a loadable ONNX model")


def test_export_refuses_a_folder_as_out_and_a_missing_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert_only_error(run([PY, "-m", "unet_dist.export", "--model", str(ckpt), "--out", str(tmp_path)],
                          cwd=tmp_path, check=False), "--out", "is a folder")
    assert_only_error(run([PY, "-m", "unet_dist.export", "--model", str(tmp_path / "nope"), "--out", "m.onnx"],
                          cwd=tmp_path, check=False), "--model", "no such directory")
