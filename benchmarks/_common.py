"""Shared pieces of the benchmark scripts: arguments, cached synthetic data, medians and tables.

Every number a script prints is the median of >= 3 repeats, next to a ratio against a baseline
measured in the same run: the machines we run on are shared and noisy, so an absolute time alone
says little. Data is generated once per cache directory and reused by later runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def parser(description: str, repeats: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats, < 20 s: checks the script runs")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"repeats per measurement, >= 3; the median is reported (default {repeats})")
    p.add_argument("--cache", default=os.environ.get("UNET_BENCH_CACHE", ""),
                   help="where generated data is kept between runs (default $UNET_BENCH_CACHE or a temp dir)")
    return p


def cache_dir(arg: str) -> Path:
    d = Path(arg) if arg else Path(tempfile.gettempdir()) / "unet_dist_bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0,
          clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of ``clock`` (wall by default) for ``repeats`` calls of ``fn``, after ``warmup``
    untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def cpu_timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """CPU seconds of this process: the per-core cost, which other users of a shared machine move
    far less than the wall clock (they still share caches and memory)."""
    return timed(fn, repeats, warmup, clock=time.process_time)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def header(title: str, args) -> float:
    """Print the section title and the machine line; returns the start time."""
    import numpy
    import torch

    if args.repeats < 3:
        raise SystemExit("--repeats: expected >= 3 (medians of fewer runs say little on a shared machine)")
    if args.quick:
        args.repeats = 3
    print(f"\n## {title}\n")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: {os.cpu_count()} cores ({cpu_model()}), GPU: {gpu}, "
          f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}; "
          f"load average (1/5/15 min) at start {load()}; {'--quick' if args.quick else 'default run'}, "
          f"{args.repeats} repeats\n", flush=True)
    return time.perf_counter()


def footer(t0: float) -> None:
    print(f"\nload average at end {load()}; script wall time {time.perf_counter() - t0:.0f} s", flush=True)


@dataclass
class Table:
    """A markdown table of medians with a ratio column against one baseline row."""

    title: str
    unit: str  # of the value column, e.g. "images/s"
    higher_is_better: bool = True
    baseline: str | None = None  # row name the ratio column divides by; None: no ratio column
    rows: list[tuple[str, list[float], str]] = field(default_factory=list)

    def add(self, name: str, values: Sequence[float], note: str = "") -> float:
        self.rows.append((name, list(values), note))
        return median(values)

    def value(self, name: str) -> float:
        return next(median(v) for n, v, _ in self.rows if n == name)

    def ratio(self, name: str, base: str | None = None) -> float:
        return self.value(name) / self.value(base or self.baseline)

    def render(self) -> str:
        ratio_head = f"× {self.baseline}" if self.baseline else ""
        head = ["case", f"median {self.unit}", "min – max", "n"] + ([ratio_head] if self.baseline else []) + ["note"]
        lines = [f"**{self.title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, vals, note in self.rows:
            cells = [name, fmt(median(vals)), f"{fmt(min(vals))} – {fmt(max(vals))}", str(len(vals))]
            if self.baseline:
                cells.append(f"{self.ratio(name):.2f}")
            cells.append(note)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def print(self) -> None:
        print(self.render() + "\n", flush=True)


def fmt(v: float) -> str:
    if v != v:  # nan
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def goal_line(name: str, value: float, goal: str, met: bool) -> str:
    return f"- {name}: **{value:.2f}** (goal {goal}) — {'met' if met else 'NOT met'}"


def unet_flops(width: int, size: tuple[int, int]) -> tuple[float, float]:
    """FLOPs (forward, forward + backward) of one image through the U-Net, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unet_dist.model import UNet

    with torch.device("meta"):
        model = UNet(3, 19, width, 5, "same", True)
        x = torch.empty(1, 3, *size)
        fwd = FlopCounterMode(display=False)
        with fwd:
            model(x)
        train = FlopCounterMode(display=False)
        with train:
            model(x).sum().backward()
    return float(fwd.get_total_flops()), float(train.get_total_flops())


# ------------------------------------------------------------------------------------- data


def dataset(cache: Path, n_train: int, n_val: int) -> Path:
    """Synthetic pairs-layout images (256x512 JPEGs), written once and kept in the cache."""
    from unet_dist.synth import write_dataset

    root = cache / f"pairs-{n_train}-{n_val}"
    if not (root / "synth.json").is_file() or len(list((root / "train").glob("*.jpg"))) != n_train:
        t0 = time.perf_counter()
        write_dataset(root, "pairs", n_train, n_val, seed=0)
        print(f"(generated {n_train + n_val} synthetic pairs images in {time.perf_counter() - t0:.0f} s: {root})",
              flush=True)
    return root


def shards(cache: Path, root: Path, samples_per_shard: int) -> Path:
    """Shards of ``root`` at the source size (no resize), made once with the real preprocess job."""
    from unet_dist import preprocess
    from unet_dist.config import load_config
    from unet_dist.data.shards import MANIFEST

    out = cache / f"shards-{root.name}-{samples_per_shard}"
    if not (out / MANIFEST).is_file():
        cfg = load_config(None, [f"data.root={root}", f"shards.dir={out}", "data.resize=null",
                                 f"shards.samples_per_shard={samples_per_shard}"])
        preprocess.run(cfg)
    return out
