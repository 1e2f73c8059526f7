"""Multi-node: 1 node x 2 workers against 2 nodes x 1 worker, same config, on the namespace cluster.

    sudo .venv/bin/python benchmarks/bench_multinode.py [--quick] [--repeats 3]

Both cases run ``jobs/torchrun_multi.sh`` (gloo, c10d rendezvous on node0) inside the network and
mount namespaces of tests/cluster: once with NNODES=1 NPROC=2 on node0, once with NNODES=2 NPROC=1
on node0 and node1, so the only difference is whether the all-reduce crosses the veth/bridge
"network" or stays on one node. Shards sit in one host folder bound at /mnt/shared in both nodes;
MLflow is a server in the services namespace. The two "nodes" share this machine's cores, so this
measures the cost of crossing nodes (rendezvous, TCP between namespaces), not a speed-up from more
hardware. Every rank computes on 1 thread (OMP_NUM_THREADS=1; torchrun sets it only with more than
one process per node), so 2 ranks never ask for more than the 2 cores either way. Needs root
(network namespaces). Cases alternate; medians of the repeats.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO / "tests"))
from cluster import BIN, Cluster, start_mlflow, unavailable  # noqa: E402

STEP = re.compile(r"step (\d+)/(\d+) loss \S+ lr \S+ ([\d.]+) img/s")
BATCH = 4


def launch(c: Cluster, nodes: list[str], nproc: int, sets: list[str], rdzv: str, timeout: float) -> dict:
    """One training job across ``nodes``; wall seconds (launch -> every agent exited) and img/s windows."""
    logs = [c.root / f"{rdzv}-{n}.log" for n in nodes]
    t0 = time.perf_counter()
    procs = [c.popen(n, ["bash", C.REPO / "jobs" / "torchrun_multi.sh", *sets], log=logs[i], cwd=C.REPO,
                     env=c.env(n, NNODES=str(len(nodes)), NODE_RANK=str(i), MASTER_ADDR=c.ip(nodes[0]),
                               NPROC=str(nproc), RUN_ID=rdzv, MAX_RESTARTS="0", CONFIG="jobs/configs/smoke.yaml",
                               TORCHRUN=str(BIN / "torchrun"), PYTHON=str(BIN / "python"),
                               MLFLOW_TRACKING_URI=c.mlflow_uri, OMP_NUM_THREADS="1"))
             for i, n in enumerate(nodes)]
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{rdzv}: still running after {timeout} s") from None
    wall = time.perf_counter() - t0
    text = "".join(p.read_text() for p in logs)
    rates = [float(m.group(3)) for m in STEP.finditer(text)]
    if any(p.returncode for p in procs) or len(rates) < 2:
        raise SystemExit(f"{rdzv} failed:\n{text[-3000:]}")
    return {"wall_s": wall, "img_s": rates[1:]}


def main() -> None:
    args = C.parser(__doc__.split("\n\n")[0]).parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"error: {why}")
    t_start = C.header("Multi-node: 1 node x 2 workers vs 2 nodes x 1 worker (torchrun, gloo)", args)
    cache = C.cache_dir(args.cache)
    steps, every = (6, 2) if args.quick else (40, 5)
    source = C.shards(cache, C.dataset(cache, 16, 8), 4)
    results: dict[str, list[dict]] = {"1x2": [], "2x1": []}
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        shutil.copytree(source, Path(tmp) / "nfs" / "shards")
        with Cluster(Path(tmp) / "cluster", ["node0", "node1"], services=True, shared=Path(tmp) / "nfs") as c:
            c.mlflow_uri = start_mlflow(c)
            for r in range(args.repeats):
                for case in (("1x2", "2x1") if r % 2 == 0 else ("2x1", "1x2")):
                    sets = ["shards.dir=/mnt/shared/shards", "train.checkpoint_dir=/mnt/shared/ckpt",
                            f"train.run_name=bench-{case}-{r}", f"train.steps={steps}", "train.warmup_steps=0", f"train.log_every={every}",
                            f"train.checkpoint_every={steps}", "train.eval_every=0", "train.eval_batches=1",
                            f"train.batch_size={BATCH}", "train.crop=[64,64]", "model.width=8",
                            "train.loader_workers=1", "mlflow.log_model=false", "mlflow.registered_model=",
                            "mlflow.system_metrics=false"]
                    nodes, nproc = (["node0"], 2) if case == "1x2" else (["node0", "node1"], 1)
                    results[case].append(launch(c, nodes, nproc, sets, f"bench-{case}-{r}", timeout=600))

    def steps_per_s(res: list[dict]) -> list[float]:
        return [C.median(x["img_s"]) / (2 * BATCH) for x in res]

    t = C.Table(f"Step rate, U-Net width 8, crop 64x64, batch {BATCH} per worker, {steps} steps (first window "
                "dropped)", "steps/s", baseline="1 node x 2 workers")
    t.add("1 node x 2 workers", steps_per_s(results["1x2"]), "NNODES=1 NPROC=2")
    t.add("2 nodes x 1 worker", steps_per_s(results["2x1"]), "NNODES=2 NPROC=1, gloo over veth + bridge")
    t.print()
    w = C.Table("Whole job: launch -> every agent exited", "s", higher_is_better=False, baseline="1 node x 2 workers")
    w.add("1 node x 2 workers", [x["wall_s"] for x in results["1x2"]])
    w.add("2 nodes x 1 worker", [x["wall_s"] for x in results["2x1"]])
    w.print()
    C.footer(t_start)


if __name__ == "__main__":
    main()
