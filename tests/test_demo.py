"""The main job, run as a new user runs it: `python -m unet_dist.demo` on embedded defaults."""
import re
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import clean_env, run
from unet_dist.config import Config
from unet_dist.data import shards
from unet_dist.scoring import evaluate_model
from unet_dist.model import UNet

pytestmark = pytest.mark.slow  # the whole demo: Ray Train workers and an MLflow store


def test_demo_trains_to_high_miou_and_leaves_a_complete_mlflow_run(tmp_path):
    work = tmp_path / "demo"
    proc = run([sys.executable, "-m", "unet_dist.demo", "--workdir", str(work)], cwd=tmp_path,
               env=clean_env(), timeout=900)
    out = proc.stdout
    miou = float(re.search(r"final val mIoU: (\d\.\d+)", out).group(1))
    assert miou >= 0.75, out[-4000:]

    # Far above what the same network does before training, on the same val shards.
    torch.manual_seed(0)
    untrained = UNet.from_config(Config().model)
    manifest = shards.load_manifest(work / "shards")
    urls = shards.shard_paths(work / "shards", manifest, "val")
    base = evaluate_model(untrained, urls, batch_size=8, device=torch.device("cpu"))["scores"]["miou"]
    assert base < 0.2 and miou > base + 0.5

    uri = re.search(r"--backend-store-uri (\S+)", out).group(1)
    assert uri == f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    client = MlflowClient(uri)
    run_id = re.search(r"MLflow run\s+(\w{32})", out).group(1)
    r = client.get_run(run_id)
    assert r.data.tags["launcher"] == "ray" and r.data.tags["world_size"] == "2"
    assert abs(r.data.metrics["eval/val_miou"] - miou) < 1e-4  # printed to 4 decimals
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert losses[-1] < 0.5 * losses[0]
    assert client.search_model_versions("name='unet-cityscapes'")
