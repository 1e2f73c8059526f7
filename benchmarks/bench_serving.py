"""Serving: latency of one 256x512 photo and throughput of a batch of 8 through `mlflow models serve`,
against the same pyfunc called in-process (the ratio is the cost of HTTP, JSON and base64).

    .venv/bin/python benchmarks/bench_serving.py [--quick] [--repeats 30]

The model is the demo's U-Net (width 16, depth 5, same padding, random weights: speed does not
depend on them), logged with the serving pyfunc's own `log_model` to a sqlite store in a temp dir,
and served with `mlflow models serve --env-manager local -w 1` on 127.0.0.1 (CPU). Requests are
PNG photos as base64 JSON, the documented interface; in-process calls get the same PNG bytes.
Calls alternate in-process / HTTP so load changes on a shared machine hit both alike.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def png(photo: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    return buf.getvalue()


def start_server(uri: str, tracking_uri: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(C.REPO), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    log = open(workdir / "serve.log", "w")
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=workdir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit(f"mlflow models serve did not start:\n{(workdir / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)


def post(url: str, images: list[bytes]) -> list[dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(b).decode()] for b in images]}}).encode()
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["predictions"]


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


def main() -> None:
    args = C.parser(__doc__.split("\n\n")[0], repeats=30).parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    t0 = C.header("Serving: mlflow models serve vs the pyfunc in-process (CPU)", args)
    import mlflow
    import pandas as pd
    import torch

    from unet_dist.serving import model_log
    from unet_dist.config import load_config
    from unet_dist.model import UNet

    width, (h, w) = (4, (64, 128)) if args.quick else (16, (256, 512))
    n = 5 if args.quick else args.repeats
    cfg = load_config(None, [f"model.width={width}", "mlflow.registered_model="])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    photos = [png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(tracking)
        mlflow.set_experiment("bench-serving")
        with mlflow.start_run():
            uri = model_log.log_model(UNet.from_config(cfg.model), cfg, (h, w))
        local = mlflow.pyfunc.load_model(uri)
        proc, url = start_server(uri, tracking, Path(tmp))
        try:
            one, batch = [photos[0]], photos
            calls = {"in-process": lambda imgs: local.predict(pd.DataFrame({"image": imgs})),
                     "HTTP": lambda imgs: post(url, imgs)}
            for fn in calls.values():  # warm-up: first calls allocate and pick kernels
                fn(one), fn(batch)
            assert [p["mask"] for p in calls["HTTP"](one)] == [p["mask"] for p in calls["in-process"](one)]
            lat = {k: [] for k in calls}
            thr = {k: [] for k in calls}
            for _ in range(n):
                for name, fn in calls.items():
                    lat[name] += C.timed(lambda: fn(one), 1)
            for _ in range(max(3, n // 5)):
                for name, fn in calls.items():
                    thr[name] += [len(batch) / s for s in C.timed(lambda: fn(batch), 1)]
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)

    t1 = C.Table(f"Latency, one {h}x{w} photo (PNG in, PNG mask out), U-Net width {width}", "ms",
                 higher_is_better=False, baseline="in-process")
    for name in calls:
        ms = [1000 * s for s in lat[name]]
        t1.add(name, ms, f"p95 {C.fmt(p95(ms))} ms")
    t1.print()
    t2 = C.Table(f"Throughput, batch of 8 photos {h}x{w} in one call", "photos/s", baseline="in-process")
    for name in calls:
        t2.add(name, thr[name])
    t2.print()
    ms_http, ms_local = (1000 * np.array(lat[k]) for k in ("HTTP", "in-process"))
    print("Ratios (medians of this run):")
    print(f"- serving overhead, one photo: HTTP / in-process latency = **{t1.ratio('HTTP'):.2f}** "
          f"(+{C.fmt(float(np.median(ms_http) - np.median(ms_local)))} ms); "
          f"p95 ratio {p95(list(ms_http)) / p95(list(ms_local)):.2f}")
    print(f"- batch of 8: HTTP / in-process throughput = **{t2.ratio('HTTP'):.2f}**")
    C.footer(t0)


if __name__ == "__main__":
    main()
