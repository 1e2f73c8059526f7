"""Checkpoints in the background against synchronous ones: how long the loop is held per checkpoint,
and what checkpointing every 4 steps costs in wall time, on local disk and on S3 (moto) behind a
link with injected latency; torchrun, 2 CPU ranks, the paper-size U-Net (width 64, depth 5).

    .venv/bin/python benchmarks/bench_checkpoint.py [--quick] [--repeats 3] [--latency-ms 50] [--rate-mb 0]

Each repeat runs, per store, four jobs of 16 steps: a checkpoint only at the end (synchronous, as
before: the baseline), every 4 steps synchronously (``train.checkpoint_async=false``), every 4 steps
in the background (the default) and the same with ``train.checkpoint_when_busy=skip``. "held" is
rank 0's own figure for the periodic checkpoints (steps 4, 8, 12: "the loop was held ... s"), the
wait for an earlier write included (and shown apart: when a write takes longer than 4 steps, the
next checkpoint waits for it); "loop" is the training loop's wall time (the run summary's
``loop_s``: steps, evaluation, checkpoints, the final flush). The S3 jobs reach the moto server
through tests/slow_link.py: every byte ``--latency-ms`` late each way, at most ``--rate-mb`` MB/s
(0: no limit).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_preempt import make_shards  # noqa: E402
from bench_storage import start_s3  # noqa: E402

sys.path.insert(0, str(C.REPO / "tests"))
from slow_link import SlowLink  # noqa: E402

STEPS = 16
HELD = re.compile(r"checkpoint at step (\d+): the loop was held ([\d.]+) s \(([\d.]+) s of it waiting")


def one(shards: Path, work: Path, ckpt_dir: str, env: dict, sets: list[str]) -> tuple[float, list[tuple[float, float]]]:
    """(loop s, [(held s, of it waiting for the last write s) at each periodic checkpoint]) of one job."""
    name = f"r{time.monotonic_ns()}"
    args = [f"shards.dir={shards}", f"train.checkpoint_dir={ckpt_dir}", f"train.run_name={name}",
            "train.eval_every=0", "train.eval_batches=1", "train.log_every=4", "train.warmup_steps=2", "train.loader_workers=1",
            "mlflow.system_metrics=false", "mlflow.log_model=false", "mlflow.registered_model=", *sets]
    summary = work / f"{name}.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "-m", "unet_dist.train", "--summary-json", str(summary), *[x for a in args for x in ("--set", a)]]
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise SystemExit(f"job exited {proc.returncode}:\n{out[-4000:]}")
    steps = int(next(s.split("=")[1] for s in sets if s.startswith("train.steps=")))
    held = [(float(h), float(w)) for step, h, w in HELD.findall(out) if int(step) != steps]  # the last: then the flush
    return json.loads(summary.read_text())["loop_s"], held


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--latency-ms", type=float, default=50.0, help="added to every byte to and from S3, each way")
    p.add_argument("--rate-mb", type=float, default=0.0, help="S3 link bandwidth in MB/s each way (0: no limit)")
    args = p.parse_args()
    t0 = C.header("Checkpoints: in the background vs synchronous (torchrun, 2 CPU ranks)", args)
    cache = C.cache_dir(args.cache)
    shards = make_shards(cache)
    model = ["model.width=64", "model.depth=5", "train.crop=[64,128]", "train.batch_size=1", f"train.steps={STEPS}"]
    every = 4
    if args.quick:
        model = ["model.width=8", "model.depth=3", "train.crop=[32,32]", "train.batch_size=1", "train.steps=8"]
        every = 2
    cases = {"end only": ["train.checkpoint_every=1000", "train.checkpoint_async=false"],
             f"every {every}, synchronous": [f"train.checkpoint_every={every}", "train.checkpoint_async=false"],
             f"every {every}, background": [f"train.checkpoint_every={every}", "train.checkpoint_async=true"],
             f"every {every}, background, skip when busy": [f"train.checkpoint_every={every}", "train.checkpoint_async=true",
                                                            "train.checkpoint_when_busy=skip"]}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    server, endpoint = start_s3(cache / "moto_server.log")
    link = SlowLink(int(endpoint.rsplit(":", 1)[1]), latency_s=args.latency_ms / 1000, rate=args.rate_mb * 1e6)
    s3_env = {**base_env, "AWS_ENDPOINT_URL": link.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
              "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    link_note = f"+{args.latency_ms:g} ms each way" + (f", {args.rate_mb:g} MB/s" if args.rate_mb else "")
    stores = {"local disk": (None, base_env), f"S3 (moto, {link_note})": ("s3://bench/ckpt", s3_env)}
    loops = {(s, c): [] for s in stores for c in cases}
    held = {(s, c): [] for s in stores for c in cases}
    try:
        for _ in range(args.repeats):  # interleaved: a slow minute of the machine hits every case
            for store, (url, env) in stores.items():
                for case, sets in cases.items():
                    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as work:
                        loop_s, h = one(shards, Path(work), url or str(Path(work) / "ckpt"), env, model + sets)
                    loops[store, case].append(loop_s)
                    held[store, case].extend(h)
    finally:
        link.close()
        os.killpg(server.pid, signal.SIGKILL)
    sync_case, async_case, skip_case = list(cases)[1:]
    ratios = []
    for store in stores:
        blocked = C.Table(f"{store}: seconds the loop is held per periodic checkpoint", "s", higher_is_better=False,
                          baseline=sync_case)
        blocked.add(sync_case, [h for h, _ in held[store, sync_case]], "the whole write and publish")
        blocked.add(async_case, [h for h, _ in held[store, async_case]],
                    "snapshot to host memory, and any wait for the last write")
        snap = f"{async_case}: snapshot alone"
        blocked.add(snap, [h - w for h, w in held[store, async_case]], "held less the wait for the last write")
        if held[store, skip_case]:  # none when every periodic checkpoint was skipped
            blocked.add(skip_case, [h for h, _ in held[store, skip_case]], "the checkpoints taken (the others skipped)")
        blocked.print()
        wall = C.Table(f"{store}: training loop wall time, {STEPS if not args.quick else 8} steps", "s",
                       higher_is_better=False, baseline="end only")
        for case in cases:
            wall.add(case, loops[store, case], "loop_s of the run summary")
        wall.print()
        ratios += [C.goal_line(f"{store}: held, background / synchronous", blocked.ratio(async_case), "<= 0.10",
                               blocked.ratio(async_case) <= 0.10),
                   f"- {store}: held for the snapshot alone / synchronous: {blocked.ratio(snap):.3f}",
                   C.goal_line(f"{store}: wall, every {every} in the background / end only", wall.ratio(async_case),
                               "<= 1.15", wall.ratio(async_case) <= 1.15),
                   C.goal_line(f"{store}: wall, every {every} in the background, skip when busy / end only",
                               wall.ratio(skip_case), "<= 1.15", wall.ratio(skip_case) <= 1.15),
                   f"- {store}: wall, every {every} synchronous / end only: {wall.ratio(sync_case):.2f}"]
    print("Ratios (medians of this run):")
    print("\n".join(ratios))
    C.footer(t0)


if __name__ == "__main__":
    main()
