"""Synthetic scenes: milliseconds per rendered scene at the sizes the generator writes, against the
256x256 render as baseline. Rendering is vectorised numpy: tens of milliseconds per 256x256 scene on
one core, where a per-pixel Python loop would take seconds (test_synth once asserted < 150 ms).

    .venv/bin/python benchmarks/bench_synth.py [--quick] [--repeats 5]

CPU seconds of this process (one thread), medians of the repeats after one warm-up render.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main() -> None:
    args = C.parser(__doc__.split("\n\n")[0], repeats=5).parse_args()
    t_start = C.header("Synthetic scenes: render time per scene", args)
    import numpy as np

    from unet_dist.synth import render_scene
    from unet_dist.synth.layouts import pairs_image

    rng = np.random.default_rng(1)
    cases = [("render 256x256", lambda: render_scene(rng, 256, 256), "baseline"),
             ("render 256x512 (cityscapes layout default)", lambda: render_scene(rng, 256, 512), ""),
             ("pairs image (256x256 photo, mask rendered at 2x)", lambda: pairs_image(rng), "")]
    if not args.quick:
        cases.append(("render 1024x2048 (Cityscapes size)", lambda: render_scene(rng, 1024, 2048), ""))
    table = C.Table("CPU time per scene", "ms", higher_is_better=False, baseline="render 256x256")
    for name, fn, note in cases:
        table.add(name, [s * 1000 for s in C.cpu_timed(fn, args.repeats, warmup=1)], note)
    table.print()
    print("Ratios (medians of this run):")
    for name, _, _ in table.rows[1:]:
        print(f"- {name}: {table.ratio(name):.2f} x the 256x256 render")
    C.footer(t_start)


if __name__ == "__main__":
    main()
