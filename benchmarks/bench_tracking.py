"""Tracking: the training step time with MLflow tracking on (every step logged to a real `mlflow
server`), off, and on while the server is down (killed: the records go to the spool), in one process.

    .venv/bin/python benchmarks/bench_tracking.py [--quick] [--repeats 3]

Each round trains the same short run (``unet_dist.train.loop.train``, one rank, 1 compute thread)
once per case, in a rotating order; a run's value is its median step time after the first 5 steps.
The baseline is tracking off. Goal (issue 23): tracking on <= 1.02x off, and the outage no slower
than normal tracking.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CASES = ("tracking off", "tracking on", "tracking on, server down")


class Server:
    """`mlflow server` over a sqlite store in ``root``, in its own process group."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.url, self.proc = root, f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            if time.monotonic() > deadline:
                raise SystemExit("mlflow server did not start")
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def config(shards: Path, tmp: Path, steps: int, uri: str):
    from unet_dist.config import load_config

    return load_config(None, [
        f"shards.dir={shards}", "model.width=8", "model.depth=4", "train.batch_size=2", "train.crop=[64,128]",
        f"train.steps={steps}", "train.log_every=1", "train.eval_every=0", f"train.checkpoint_every={steps}",
        f"train.checkpoint_dir={tmp}", "train.loader_workers=1", "train.cpus_per_worker=1", "train.warmup_steps=0",
        "train.run_name=bench", f"mlflow.tracking_uri={uri}", "mlflow.log_model=false",
        "mlflow.system_metrics=false", "mlflow.flush_timeout_s=0"])


def run_once(case: str, shards: Path, steps: int, server: Server) -> float:
    """One training run; its median step time (s) after the first 5 steps."""
    from unet_dist import checkpoint, tracking
    from unet_dist.train.loop import Context, train

    stamps: list[float] = []

    class Stamp(logging.Handler):
        def emit(self, record):
            if "img/s" in record.getMessage():
                stamps.append(time.perf_counter())

    log = logging.getLogger("unet_dist.train")
    log.setLevel(logging.INFO)
    handler = Stamp()
    log.addHandler(handler)
    with tempfile.TemporaryDirectory(prefix="bench-track-") as tmp:
        cfg = config(shards, Path(tmp), steps, server.url)
        run_id = None
        if case != "tracking off":
            if server.proc is None or server.proc.poll() is not None:
                server.start()
            run_id = tracking.start_run(cfg, resume_run_id=None, tags={"bench": case})
            if case.endswith("server down"):
                server.kill()

        def report(metrics: dict, ckpt: Path | None) -> None:
            if ckpt is not None:
                checkpoint.publish(ckpt, Path(tmp) / "run", int(metrics["step"]))

        ctx = Context(rank=0, world_size=1, local_rank=0, launcher="single", run_id=run_id, report=report,
                      latest_checkpoint=lambda: contextlib.nullcontext(None))
        summary = train(cfg, ctx)
    log.removeHandler(handler)
    assert summary["status"] == "finished", summary
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][5:]
    return C.median(gaps)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = C.parser(__doc__.split("\n\n")[0]).parse_args()
    t_start = C.header("Tracking: step time with MLflow on, off, and during an outage (1 rank, CPU)", args)
    cache = C.cache_dir(args.cache)
    steps = 30 if args.quick else 150
    shards = C.shards(cache, C.dataset(cache, 24, 4), 8)
    logging.basicConfig(level=logging.WARNING)
    times: dict[str, list[float]] = {c: [] for c in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as root:
        server = Server(Path(root))
        try:
            for r in range(args.repeats):
                for case in CASES[r % 3:] + CASES[:r % 3]:
                    times[case].append(run_once(case, shards, steps, server))
        finally:
            server.kill()
    t = C.Table(f"Step time, U-Net width 8 depth 4, crop 64x128, batch 2, {steps} steps, every step logged",
                "ms/step", higher_is_better=False, baseline="tracking off")
    t.add("tracking off", [x * 1000 for x in times["tracking off"]], "no MLflow run (NullLogger)")
    t.add("tracking on", [x * 1000 for x in times["tracking on"]], "3 metrics a step to a live mlflow server")
    t.add("tracking on, server down", [x * 1000 for x in times["tracking on, server down"]],
          "server killed after the run was created: records go to the spool")
    t.print()
    on, down = t.ratio("tracking on"), t.ratio("tracking on, server down")
    print(C.goal_line("step time, tracking on / off", on, "<= 1.02", on <= 1.02))
    print(C.goal_line("step time, server down / on", down / on, "<= 1.0 within noise (<= 1.02)", down / on <= 1.02))
    C.footer(t_start)


if __name__ == "__main__":
    main()
