"""Run every benchmark script in turn (each in its own process) and print their tables.

    make bench                                   # = .venv/bin/python benchmarks/run_all.py
    make bench ARGS="--quick"                    # every script at tiny sizes (< 20 s each)
    .venv/bin/python benchmarks/run_all.py --only preprocess,loader --out bench.md

Arguments other than --only/--out go to every script (--quick, --repeats N, --cache DIR).
Default run: 6-10 minutes on 2 cores (more when the machine is busy); the launcher comparison is half of it.
Not in the default run (ask with --only): preempt, checkpoint (~20 min), sweep, demo (~25 min), multinode (root).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {  # name -> file, in the order of the data flow
    "synth": "bench_synth.py",
    "preprocess": "bench_preprocess.py",
    "loader": "bench_loader.py",
    "sizing": "loader_sizing.py",
    "storage": "bench_storage.py",
    "train": "bench_train.py",
    "launchers": "bench_launchers.py",
    "serving": "bench_serving.py",
    "tracking": "bench_tracking.py",
    "onnx": "bench_onnx.py",
    "gpu": "gpu.py",
    # Long (minutes each, ~25 for demo) or needing root: run them by name with --only.
    "preempt": "bench_preempt.py",
    "checkpoint": "bench_checkpoint.py",
    "sweep": "bench_sweep.py",
    "demo": "bench_demo.py",
    "multinode": "bench_multinode.py",
}
DEFAULT = ["synth", "preprocess", "loader", "sizing", "storage", "train", "launchers", "serving", "tracking", "gpu"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    p.add_argument("--out", help="also write all the output (markdown tables) to this file")
    args, rest = p.parse_known_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or DEFAULT
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; expected some of {', '.join(SCRIPTS)}")
    out, failed = [], []
    t0 = time.perf_counter()
    for name in names:
        cmd = [sys.executable, str(HERE / SCRIPTS[name]), *rest]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            out.append(line)
        if proc.wait():
            failed.append(name)
    print(f"\nall benchmarks: {time.perf_counter() - t0:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.out:
        Path(args.out).write_text("".join(out))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
