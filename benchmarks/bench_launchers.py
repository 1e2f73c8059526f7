"""Launchers: Ray Train against torchrun on the same config, 2 CPU ranks: steady-state step time and
start-up time, at U-Net width 16 (and width 64 at a small crop).

    .venv/bin/python benchmarks/bench_launchers.py [--quick] [--repeats 3]

Each launch is the real command line in a subprocess: ``python -m unet_dist.train`` (a private local
Ray cluster, ``RAY_AUTH_MODE=disabled``) or ``torchrun --standalone --nproc_per_node=2 -m
unet_dist.train``, with the same ``--set`` keys (MLflow to a local sqlite file, no model logging).
Times come from the arrival of their output lines: start-up is launch -> the loop's "training N
steps" line; the step time is global batch / the "img/s" of each logging window after the first.
Ray relays worker lines to the driver, so its start-up can read up to about a second late.
Launches alternate (Ray, torchrun, Ray, ...). This is the slow script (3-5 min by default): every
Ray launch starts a cluster. ``--quick`` runs torchrun only, since Ray alone starts in ~25 s here.
"""
from __future__ import annotations

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

STEP = re.compile(r"step (\d+)/(\d+) loss \S+ lr \S+ ([\d.]+) img/s")
READY = re.compile(r"training \d+ steps from step \d+")
WORLD, BATCH = 2, 4


def launch(kind: str, sets: list[str], timeout: float) -> dict:
    """Run one training job; returns start-up seconds, window img/s and wall seconds."""
    bin_dir = Path(sys.executable).parent
    args = [a for kv in sets for a in ("--set", kv)]
    if kind == "ray":
        cmd = [sys.executable, "-m", "unet_dist.train", *args]
    else:
        cmd = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={WORLD}", "-m", "unet_dist.train", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=C.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ready, rates, tail = None, [], []
    try:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            tail = (tail + [line])[-40:]
            if ready is None and READY.search(line):
                ready = now
            m = STEP.search(line)
            if m:
                rates.append(float(m.group(3)))
            if now > timeout:
                raise TimeoutError
        proc.wait(timeout=60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode or ready is None or len(rates) < 2:
        raise SystemExit(f"{kind} launch failed (exit {proc.returncode}):\n{''.join(tail)}")
    return {"startup_s": ready, "img_s": rates[1:], "wall_s": time.perf_counter() - t0}


def init_mlflow(db: Path) -> None:
    """Create the sqlite tracking store once, so no launch pays for its migrations."""
    code = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); "
            "mlflow.MlflowClient().search_experiments()")
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}"], check=True, capture_output=True)


def main() -> None:
    args = C.parser(__doc__.split("\n\n")[0]).parse_args()
    t_start = C.header("Launchers: Ray Train vs torchrun, 2 CPU ranks", args)
    cache = C.cache_dir(args.cache)
    if args.quick:
        n_train, n_val, spp = 16, 8, 8
        cases = [(16, 4, 1, (32, 64), 1)]  # width, steps, log_every, crop, rounds: 3 windows
        kinds = ("torchrun",)
    else:
        n_train, n_val, spp = 184, 16, 25
        cases = [(16, 20, 4, (64, 128), args.repeats), (64, 8, 2, (32, 64), 1)]
        kinds = ("ray", "torchrun")
    shards = C.shards(cache, C.dataset(cache, n_train, n_val), spp)

    results: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        db = Path(tmp) / "mlflow.db"
        if not args.quick:  # --quick: the first launch creates it (a few seconds of its start-up)
            init_mlflow(db)
        n = 0
        for width, steps, every, crop, rounds in cases:
            for r in range(rounds):
                for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                    n += 1
                    sets = [f"shards.dir={shards}", f"model.width={width}", "model.depth=5", f"train.steps={steps}",
                            f"train.log_every={every}", f"train.crop=[{crop[0]},{crop[1]}]", "train.eval_every=0",
                            "train.eval_batches=1", f"train.checkpoint_every={steps}",
                            f"train.checkpoint_dir={tmp}/ckpt", f"train.run_name=bench-{n}", f"train.workers={WORLD}",
                            "train.cpus_per_worker=1", f"train.batch_size={BATCH}", "train.loader_workers=1",
                            "train.warmup_steps=1",
                            f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.log_model=false",
                            "mlflow.registered_model=", "mlflow.system_metrics=false"]
                    results.setdefault((width, kind), []).append(launch(kind, sets, timeout=400))

    ratios = {}
    for width, steps, every, crop, rounds in cases:
        base = f"torchrun, width {width}"

        def step_ms(res: list[dict]) -> list[float]:  # per launch the median window; one launch: its windows
            per = [[WORLD * BATCH / r * 1e3 for r in x["img_s"]] for x in res]
            return [C.median(p) for p in per] if len(per) > 1 else per[0]

        t = C.Table(f"Steady-state step, width {width}, crop {crop[0]}x{crop[1]}, batch {BATCH} per rank, "
                    f"{steps} steps, window {every}", "ms per step", higher_is_better=False, baseline=base)
        if (width, "ray") in results:
            t.add(f"Ray Train, width {width}", step_ms(results[(width, "ray")]), "TorchTrainer, 2 workers x 1 CPU")
        t.add(base, step_ms(results[(width, "torchrun")]), "--standalone --nproc_per_node=2, gloo")
        t.print()
        s = C.Table(f"Start-up, width {width}: launch -> first line of the training loop", "s",
                    higher_is_better=False, baseline=base)
        if (width, "ray") in results:
            s.add(f"Ray Train, width {width}", [x["startup_s"] for x in results[(width, "ray")]],
                  "private local cluster, MLflow run, worker group, process group")
        s.add(base, [x["startup_s"] for x in results[(width, "torchrun")]], "rendezvous, process group, MLflow run")
        if (width, "ray") in results:
            s.add(f"Ray Train whole job, width {width}", [x["wall_s"] for x in results[(width, "ray")]],
                  "launch -> exit")
        s.add(f"torchrun whole job, width {width}", [x["wall_s"] for x in results[(width, "torchrun")]],
              "launch -> exit")
        s.print()
        if (width, "ray") in results:
            ratios[width] = (t.ratio(f"Ray Train, width {width}"),
                             s.value(f"Ray Train, width {width}") - s.value(base))
    if args.quick:
        print("Ray Train: skipped in --quick (a private Ray cluster takes ~25 s to start here).\n")
    print("Ratios (medians of this run):")
    for width, (r, extra) in ratios.items():
        print(C.goal_line(f"width {width}: Ray / torchrun steady-state step time", r, "<= 1.05", r <= 1.05))
        print(f"- width {width}: Ray starts {extra:.1f} s later than torchrun")
    C.footer(t_start)


if __name__ == "__main__":
    main()
