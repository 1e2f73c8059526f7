"""Against what users would pick instead (issue 29): the plain PyTorch script, Ray Data ingest under
Ray Train, and segmentation_models_pytorch's smp.Unet, each measured against this package in the
same run, alternating, on the demo data and at the Cityscapes size.

    make bench-peers                      # = .venv-peers/bin/python benchmarks/bench_peers.py
    .venv-peers/bin/python benchmarks/bench_peers.py [--quick] [--repeats 3] [--budget 150]

Runs in the peers' venv (``make peers-setup``: torch 2.14.1 + torchvision + smp, which smp needs;
every case here, ours included, runs on that torch). The peers are in ``benchmarks/peers/``.

Training (the demo data: 200 train / 40 val synthetic pairs images, preprocessed as the demo does):
every case trains the demo's recipe (``unet_dist/config.py`` defaults: 400 steps, batch 2 on each of
2 CPU ranks, 1 loader process per rank, the same U-Net, loss, optimiser and schedule) and
evaluates the whole val split every ``--eval-every`` steps; round r runs every case with seed r
(initial weights, data order, augmentation), so a round compares like with like and the rounds show
how much a seed moves the time to 0.75. Cases and the baseline each is divided by (same launcher):

- ours, Ray: ``python -m unet_dist.train`` (the demo's launcher)        -> baseline of Ray Data
- Ray Data: ``benchmarks/peers/ray_data.py`` (TorchTrainer + read_webdataset + iter_torch_batches)
- ours, torchrun: ``torchrun --nproc_per_node=2 -m unet_dist.train``     -> baseline of plain, smp
- plain PyTorch: ``torchrun ... benchmarks/peers/plain_torch.py`` (Dataset over the raw files)
- smp.Unet: ``torchrun ... benchmarks/peers/smp_unet.py`` (our loop, the model swapped)

Times come from the arrival of each run's output lines (as in bench_launchers.py; Ray relays worker
lines, up to about a second late, to ours under Ray and to Ray Data alike): start-up is launch ->
"training N steps"; training seconds run from that line to each "val mIoU" line, evaluations
included. Ours logs to MLflow (a sqlite file; no model logging, no system metrics); the peers print.
Each ratio is taken within a round (a peer and its baseline run back to back, the same seed), and
the table gives the median and min–max of those ratios. The fixed time budget for "val mIoU at a
budget" is, unless ``--budget`` says otherwise, the training seconds ours (same launcher) took for all
its steps in that round: what each peer has reached when ours is done.

Cityscapes size (synthetic street scenes at 1024x2048, Cityscapes' layout with labelIds): the CPU
one input pipeline spends per training sample (512x1024 crop, scale 0.5..2.0, flip, batch 4, one
loader process), summed over every process of the pipeline (the consumer, loader workers, and for
Ray Data the whole local Ray: raylet, GCS, workers), over a window after a few warm-up batches,
while the consumer only takes batches (so every pipeline works without pause). Ours ships uint8
windows and finishes the augmentation on the device; a row adds that step on this CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent / "peers"))
import _common as C  # noqa: E402

PEERS = C.REPO / "benchmarks" / "peers"
TARGET = 0.75
READY = re.compile(r"training \d+ steps from step \d+")
LOGGED = re.compile(r"step (\d+)/\d+ loss")
EVAL = re.compile(r"step (\d+): val mIoU ([\d.]+|nan)")
# case -> (the baseline it is divided by, what it is)
CASES = {
    "ours, Ray": (None, "python -m unet_dist.train (private local Ray, 2 workers x 1 CPU)"),
    "Ray Data": ("ours, Ray", "TorchTrainer; read_webdataset + map_batches + iter_torch_batches"),
    "ours, torchrun": (None, "torchrun --nproc_per_node=2 -m unet_dist.train"),
    "plain PyTorch": ("ours, torchrun", "Dataset over the raw files + DataLoader + DDP, torchrun"),
    "smp.Unet": ("ours, torchrun", "our pipeline and loop, smp.Unet(ENCODER) as the model"),
}


# ------------------------------------------------------------------------------------- data


def demo_data(cache: Path, n_train: int, n_val: int, spp: int) -> tuple[Path, Path]:
    """Raw synthetic pairs images and their shards, made as the demo makes them (once per cache)."""
    from unet_dist import preprocess
    from unet_dist.config import load_config
    from unet_dist.data.shards import MANIFEST
    from unet_dist.synth import write_dataset

    root, out = cache / f"peers-demo-{n_train}-{n_val}", cache / f"peers-demo-{n_train}-{n_val}-shards"
    if not (out / MANIFEST).is_file():
        write_dataset(root, "pairs", n_train, n_val, seed=0)
        preprocess.run(load_config(None, [f"data.root={root}", f"shards.dir={out}",
                                          f"shards.samples_per_shard={spp}"]))
    return root, out


def city_data(cache: Path, n: int, size: tuple[int, int]) -> tuple[Path, dict[str, Path]]:
    """Synthetic street scenes at ``size`` in Cityscapes' layout, and their shards as
    jobs/configs/cityscapes.yaml stores them (photos as JPEG q90 in 256x256 tiles) and with the
    source PNG photos (``shards.photo_encoding=source``)."""
    from unet_dist import preprocess
    from unet_dist.config import load_config
    from unet_dist.data.shards import MANIFEST
    from unet_dist.synth import write_dataset

    root = cache / f"peers-city-{size[0]}x{size[1]}-{n}"
    out = {"jpeg tiles": root.with_name(root.name + "-shards"), "png": root.with_name(root.name + "-png-shards")}
    if not all((d / MANIFEST).is_file() for d in out.values()):
        t0 = time.perf_counter()
        write_dataset(root, "cityscapes", n, 2, seed=0, size=size)
        for kind, d in out.items():
            preprocess.run(load_config(C.REPO / "jobs/configs/cityscapes.yaml", [
                f"data.root={root}", f"shards.dir={d}", "shards.processes=0", f"shards.samples_per_shard={n}",
                *(["shards.photo_encoding=source", "shards.photo_tile=null"] if kind == "png" else [])]))
        print(f"(generated {n} + 2 scenes at {size[0]}x{size[1]} and their shards in {time.perf_counter() - t0:.0f} s)",
              flush=True)
    return root, out


def label_check(cfg) -> str:
    """The plain peer's labels (raw files, the fitted quantizer) against the shards', sample by
    sample; and how far its photos are from the shards' (which preprocess re-encoded)."""
    import numpy as np
    import webdataset as wds

    import _ours as U
    import plain_torch

    manifest = U.load_manifest(cfg.shards.dir)
    train, val = plain_torch.datasets(cfg)
    same = total = 0
    diff = []
    for split, ds in (("train", train), ("val", val)):
        urls = U.shard_paths(cfg.shards.dir, manifest, split)
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            i = int(s["__key__"].rsplit("-", 1)[1])
            photo, ids = ds.load(i)
            total += 1
            same += bool(np.array_equal(ids, U.decode_label(s["label.png"])))
            members = {k: v for k, v in s.items() if k.startswith("image.")}
            diff.append(np.abs(U.decode_photo(members).astype(np.int16) - photo).mean())
    if same != total:
        raise SystemExit(f"plain peer: labels differ from the shards' on {total - same} of {total} samples")
    return (f"labels identical to the shards' on {same}/{total} samples (train + val); photos differ by "
            f"{np.mean(diff):.2f} grey levels on average (the shards' photo encoding)")


# ------------------------------------------------------------------------------------- training


def command(case: str, encoder: str) -> list[str]:
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return {"ours, Ray": [py, "-m", "unet_dist.train"],
            "Ray Data": [py, str(PEERS / "ray_data.py")],
            "ours, torchrun": [*torchrun, "-m", "unet_dist.train"],
            "plain PyTorch": [*torchrun, str(PEERS / "plain_torch.py")],
            "smp.Unet": [*torchrun, str(PEERS / "smp_unet.py"), "--encoder", encoder]}[case]


def launch(cmd: list[str], sets: list[str], timeout: float, expect: str = "") -> dict:
    """One training run; the arrival times of its start, logged-step and evaluation lines. A run
    whose output lacks ``expect`` fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", PYTHONPATH=str(C.REPO))
    args = [a for kv in sets for a in ("--set", kv)]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, *args], cwd=C.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    ready = logged = None
    evals: list[tuple[float, int, float]] = []
    tail: list[str] = []
    seen = not expect
    try:
        for line in proc.stdout:
            now = time.perf_counter() - t0
            tail = (tail + [line])[-60:]
            seen = seen or expect in line
            if ready is None and READY.search(line):
                ready = now
            if logged is None and LOGGED.search(line):
                logged = now
            m = EVAL.search(line)
            if m and ready is not None:
                evals.append((now - ready, int(m.group(1)), float(m.group(2))))
            if now > timeout:
                raise TimeoutError(f"{cmd}: still running after {timeout:.0f} s")
        proc.wait(timeout=120)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode or ready is None or not evals or not seen:
        why = f"exit {proc.returncode}" if seen else f"no line {expect!r}"
        raise SystemExit(f"{' '.join(cmd)} failed ({why}):\n{''.join(tail)}")
    return {"startup_s": ready, "first_logged_s": logged if logged is not None else math.nan, "evals": evals,
            "loop_s": evals[-1][0], "final": evals[-1][2], "steps": evals[-1][1], "wall_s": time.perf_counter() - t0}


def reached(run: dict) -> float:
    """Training seconds to the first evaluation at or above TARGET (nan: never)."""
    return next((t for t, _, miou in run["evals"] if miou >= TARGET), math.nan)


def at_budget(run: dict, budget: float) -> float:
    """val mIoU of the last evaluation within ``budget`` training seconds (nan: none yet)."""
    within = [miou for t, _, miou in run["evals"] if t <= budget]
    return within[-1] if within else math.nan


# ------------------------------------------------------------------------------------- tables


def ratio_table(title: str, unit: str, runs: dict[str, list[dict]], value, baseline_of, notes: dict[str, str],
                lower_is_better: bool) -> str:
    """Median and min–max of each case; the ratio to its baseline is taken per round (paired runs)."""
    head = ["case", f"median {unit}", "min – max", "n", "× ours (same launcher), median", "ratio min – max", "note"]
    lines = [f"**{title}** ({'lower' if lower_is_better else 'higher'} is better)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, rs in runs.items():
        vals = [value(r) for r in rs]
        base = baseline_of(case)
        ratios = [v / value(b) for v, b in zip(vals, runs[base])] if base in runs else []
        ratios = [x for x in ratios if not math.isnan(x)]
        finite = [v for v in vals if not math.isnan(v)]
        cells = [case, C.fmt(C.median(finite)) if finite else "n/a",
                 f"{C.fmt(min(finite))} – {C.fmt(max(finite))}" if finite else "n/a",
                 f"{len(finite)} of {len(vals)}" if len(finite) != len(vals) else str(len(vals)),
                 "1.00 (baseline)" if base is None else f"{C.median(ratios):.2f}" if ratios else "n/a",
                 f"{min(ratios):.2f} – {max(ratios):.2f}" if ratios else "", notes.get(case, "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired(runs: dict[str, list[dict]], case: str, value, baseline_of) -> float:
    """The median per-round ratio of ``case`` to its baseline (nan when never measurable)."""
    base = baseline_of(case)
    rs = [value(r) / value(b) for r, b in zip(runs[case], runs[base])]
    rs = [x for x in rs if not math.isnan(x)]
    return C.median(rs) if rs else math.nan


# ------------------------------------------------------------------------------------- Cityscapes size


def tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and each of its descendants, by pid."""
    import psutil

    out = {}
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def pipeline_cpu_ms(batches, n: int, batch: int, finish=None, warmup: int = 3) -> float:
    """CPU ms per sample that every process of an input pipeline spends while ``n`` batches are
    taken, after ``warmup`` (workers started, read-ahead filled); ``finish`` runs on each batch in
    the consumer (ours' to_device). The consumer is faster than any pipeline here, so the pipeline
    works without pause and what it does in the window is what the window takes (+- its few batches
    in flight)."""
    it = iter(batches)
    for i in range(warmup + n):
        if i == warmup:
            c0 = tree_cpu()
        b = next(it)
        if finish:
            finish(b)
    c1 = tree_cpu()
    del it, b
    time.sleep(1)  # let its loader workers exit
    return sum(v - c0.get(pid, 0.0) for pid, v in c1.items()) / (n * batch) * 1e3


def city_rows(args, cache: Path) -> tuple[dict[str, list[float]], dict[str, str], str]:
    """Loader CPU per sample of each pipeline at the Cityscapes size, in alternating rounds."""
    import torch

    import _ours as U
    import _recipe as R
    import plain_torch
    import ray_data

    size, n, nb = ((256, 512), 4, 4) if args.quick else (tuple(args.city_size), args.city_samples, 25)
    root, shards = city_data(cache, n, size)
    crop = (size[0] // 2, size[1] // 2)  # 512x1024 at 1024x2048
    cfg = U.load_config(C.REPO / "jobs/configs/cityscapes.yaml", [
        f"data.root={root}", f"shards.dir={shards['jpeg tiles']}", f"train.crop=[{crop[0]},{crop[1]}]"])
    check = label_check(cfg)
    t = cfg.train
    batch = t.batch_size
    aug = U.Augment(crop=crop, scale=tuple(t.scale), flip=t.flip)
    urls = {k: U.shard_paths(d, U.load_manifest(d), "train") for k, d in shards.items()}
    cpu = torch.device("cpu")
    torch.set_num_threads(1)

    def ours(kind: str):
        return U.train_stream(urls[kind], aug, batch, rank=0, world=1, seed=0, start=0, workers=1, pin_memory=False)

    def plain():
        train, _ = plain_torch.datasets(cfg)
        sampler = torch.utils.data.RandomSampler(train, replacement=True, num_samples=10**9)
        return plain_torch.loader(train, sampler, batch, 1, cpu, drop_last=True)

    def raydata() -> float:
        """A private local Ray per measurement, started and left to settle before the count starts;
        the shard list repeated into one long epoch, so no epoch restart falls in the window."""
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(PEERS), str(C.REPO)])}})
        try:
            time.sleep(3)
            c0, w0 = tree_cpu(), time.perf_counter()
            time.sleep(3)
            idle.append(sum(v - c0.get(p, 0.0) for p, v in tree_cpu().items()) / (time.perf_counter() - w0))
            ds = ray_data.dataset(urls["jpeg tiles"] * ((slow + 4) * batch // n + 1), R.train_transform(cfg, size),
                                  seed=0, map_batch=batch)
            return pipeline_cpu_ms(ds.iter_torch_batches(batch_size=batch, drop_last=True), slow, batch)
        finally:
            ray.shutdown()

    idle: list[float] = []  # CPU seconds per second of the idle local Ray (its daemons)
    slow = max(2, nb // 3)  # batches counted for the slower pipelines
    cases = {
        "ours: cityscapes.yaml shards (JPEG q90 256x256 tiles)": lambda: pipeline_cpu_ms(ours("jpeg tiles"), nb, batch),
        "ours, + to_device on this CPU": lambda: pipeline_cpu_ms(ours("jpeg tiles"), nb, batch,
                                                                 lambda b: U.to_device(b, aug, cpu)),
        "ours: PNG-photo shards (photo_encoding source)": lambda: pipeline_cpu_ms(ours("png"), nb, batch),
        "plain PyTorch: raw PNG files": lambda: pipeline_cpu_ms(plain(), slow, batch),
        "Ray Data: cityscapes.yaml shards": raydata,
    }
    res: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.repeats):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            res[name].append(cases[name]())
    notes = {
        "ours: cityscapes.yaml shards (JPEG q90 256x256 tiles)": "decode under the crop window, uint8 shipped; "
                                                                 "resample/pad/flip/normalise on the GPU",
        "ours, + to_device on this CPU": "the same with the device step on the CPU (a CPU-only node)",
        "ours: PNG-photo shards (photo_encoding source)": "the lossless source photos: the format's share",
        "plain PyTorch: raw PNG files": "PNG photo + labelIds decode, torchvision v2 resize/crop/flip, float32",
        "Ray Data: cityscapes.yaml shards": f"whole photo decoded, same v2 transforms; whole local Ray counted "
                                            f"(idle, its daemons: {C.median(idle) * 1e3:.0f} ms CPU per s)",
    }
    head = f"{size[0]}x{size[1]} -> {crop[0]}x{crop[1]} crop, scale {t.scale[0]}..{t.scale[1]}, batch {batch}; {check}"
    return res, notes, head


def city_tables(res: dict[str, list[float]], notes: dict[str, str]) -> tuple[str, dict[str, float]]:
    base = next(iter(res))
    lines = []
    for title, unit, conv, lower in (("Loader CPU per sample", "ms", lambda v: v, True),
                                     ("Images per second per core of loading", "img/s", lambda v: 1e3 / v, False)):
        head = ["case", f"median {unit}", "min – max", "n", "× ours, median", "ratio min – max", "note"]
        lines += [f"**{title}** ({'lower' if lower else 'higher'} is better)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, vals in res.items():
            v = [conv(x) for x in vals]
            r = [a / conv(b) for a, b in zip(v, res[base])]
            lines.append("| " + " | ".join([name, C.fmt(C.median(v)), f"{C.fmt(min(v))} – {C.fmt(max(v))}",
                                            str(len(v)), f"{C.median(r):.2f}", f"{min(r):.2f} – {max(r):.2f}",
                                            notes[name]]) + " |")
        lines.append("")
    ratios = {name: C.median([a / b for a, b in zip(vals, res[base])]) for name, vals in res.items()}
    return "\n".join(lines), ratios


# ------------------------------------------------------------------------------------- main


def main() -> None:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.0,
                   help="training seconds for 'val mIoU at a fixed budget' (default: the seconds ours, with the "
                        "same launcher, takes for all its steps in the same round)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations, every case (default 50)")
    p.add_argument("--smp-encoder", default="", help="smp encoder (default: smp_unet.ENCODER)")
    p.add_argument("--train-rounds", type=int, default=0,
                   help="rounds of the training cases (default --repeats; each round ~15 min on 2 quiet cores)")
    p.add_argument("--city-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    p.add_argument("--city-samples", type=int, default=8, help="synthetic scenes at the Cityscapes size")
    p.add_argument("--skip", action="append", default=[], choices=["train", "city"], help="leave out a section")
    p.add_argument("--case", action="append", default=[], choices=list(CASES),
                   help="train only these cases (repeatable; default all; a peer without its baseline gets no ratio)")
    args = p.parse_args()
    t_start = C.header("Against the peers: plain PyTorch, Ray Data ingest, smp.Unet", args)
    cache = C.cache_dir(args.cache)
    rounds = 1 if args.quick else (args.train_rounds or args.repeats)

    import smp_unet

    encoder = args.smp_encoder or smp_unet.ENCODER
    notes = {**{k: v for k, (_, v) in CASES.items()}}
    notes["smp.Unet"] = notes["smp.Unet"].replace("ENCODER", encoder)
    baseline_of = lambda case: CASES[case][0]  # noqa: E731
    if "train" not in args.skip:
        from unet_dist.config import load_config

        n_train, n_val, spp = (16, 8, 8) if args.quick else (200, 40, 64)
        root, shards = demo_data(cache, n_train, n_val, spp)
        cfg = load_config(None, [f"data.root={root}", f"shards.dir={shards}"])
        print(f"Demo data: {n_train} train / {n_val} val, {cfg.data.resize[0]}x{cfg.data.resize[1]}; plain peer: "
              f"{label_check(cfg)}\n")
        candidates = (encoder,) if args.quick else tuple(dict.fromkeys((*smp_unet.CANDIDATES, encoder)))
        fl = smp_unet.flops(tuple(cfg.train.crop), cfg.model.width, cfg.model.depth, candidates)
        print(f"**Model cost per training image at {cfg.train.crop[0]}x{cfg.train.crop[1]}** (forward + backward, "
              f"torch.utils.flop_counter)\n\n| model | GFLOP | × ours | parameters (M) |\n|---|---|---|---|")
        for name, (g, m) in fl.items():
            label = f"ours: U-Net width {cfg.model.width}, depth {cfg.model.depth}" if name == "ours" else \
                f"smp.Unet({name!r}){' (the peer)' if name == encoder else ''}"
            print(f"| {label} | {g:.2f} | {g / fl['ours'][0]:.2f} | {m:.2f} |")
        print()
        steps = ["train.steps=3", "train.warmup_steps=0", "train.eval_every=3", "train.checkpoint_every=3",
                 "train.log_every=1"] if args.quick \
            else [f"train.eval_every={args.eval_every}"]
        cases = [c for c in CASES if c in args.case or not args.case]
        runs: dict[str, list[dict]] = {case: [] for case in cases}
        with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
            import bench_launchers

            db = Path(tmp) / "mlflow.db"
            bench_launchers.init_mlflow(db)
            for r in range(rounds):
                for case in (cases if r % 2 == 0 else cases[::-1]):
                    sets = [f"data.root={root}", f"shards.dir={shards}", f"train.checkpoint_dir={tmp}/ckpt",
                            f"train.run_name=r{r}-{case.replace(' ', '').replace(',', '-').replace('.', '')}",
                            f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.log_model=false", "mlflow.registered_model=",
                            "mlflow.system_metrics=false", f"train.seed={r}", *steps]
                    run = launch(command(case, encoder), sets, timeout=300 if args.quick else 1800,
                                 expect=f"{smp_unet.BUILT} smp.Unet({encoder!r})" if case == "smp.Unet" else "")
                    runs[case].append(run)
                    print(f"  round {r + 1}, {case}: start-up {run['startup_s']:.1f} s, {run['steps']} steps in "
                          f"{run['loop_s']:.0f} s, final val mIoU {run['final']:.4f}, {TARGET} after "
                          f"{reached(run):.0f} s", flush=True)
        print()
        for case, rs in runs.items():  # the budget of each run: fixed, or its baseline's time in that round
            for r, run in enumerate(rs):
                run["budget_s"] = args.budget or runs.get(baseline_of(case) or case, rs)[r]["loop_s"]
        budget = f"{args.budget:.0f} s of training" if args.budget else "ours' training time for all steps"
        tables = [
            (f"Training seconds to val mIoU {TARGET}", "s", reached, True),
            (f"Seconds from launch to val mIoU {TARGET}", "s", lambda run: run["startup_s"] + reached(run), True),
            (f"val mIoU after {budget} (same round, same launcher; the last evaluation by then)", "mIoU",
             lambda run: at_budget(run, run["budget_s"]), False),
            (f"Final val mIoU ({next(iter(runs.values()))[0]['steps']} steps)", "mIoU", lambda run: run["final"], False),
            ("Training seconds for all steps (evaluations included)", "s", lambda run: run["loop_s"], True),
            ("Start-up: launch -> first line of the training loop", "s", lambda run: run["startup_s"], True),
            ("Launch -> first logged step", "s", lambda run: run["first_logged_s"], True),
        ]
        for title, unit, value, lower in tables:
            print(ratio_table(title, unit, runs, value, baseline_of, notes, lower))
        print("Ratios, peer / ours with the same launcher (medians of per-round ratios):")
        for case in [c for c in ("Ray Data", "plain PyTorch", "smp.Unet") if c in runs and baseline_of(c) in runs]:
            parts = [f"{name} **{paired(runs, case, value, baseline_of):.2f}**" for name, value in
                     (("seconds to 0.75", reached), ("mIoU at the budget", lambda run: at_budget(run, run["budget_s"])),
                      ("training seconds", lambda run: run["loop_s"]), ("start-up", lambda run: run["startup_s"]))]
            print(f"- {case}: " + ", ".join(parts))
        print()
    if "city" not in args.skip:
        res, city_notes, head = city_rows(args, cache)
        print(f"Cityscapes size: {head}\n")
        text, ratios = city_tables(res, city_notes)
        print(text)
        for name, r in list(ratios.items())[1:]:
            print(f"- loader CPU per sample, {name} / ours: **{r:.2f}**")
    C.footer(t_start)


if __name__ == "__main__":
    main()
