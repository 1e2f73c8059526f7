"""ONNX: onnxruntime (CPU) against PyTorch (CPU) predicting one 512x1024 photo, in one process.

    .venv/bin/python benchmarks/bench_onnx.py [--quick] [--repeats 5] [--threads N]

Both go through the same path (``unet_dist.segment.predict_logits``: normalised input, the 'same'
model's mirror padding, the 'valid' model's overlap-tile) and differ only in what runs the network:
``UNet`` in PyTorch eager mode, or the file ``python -m unet_dist.export`` writes, in an
onnxruntime ``InferenceSession`` (CPUExecutionProvider, default graph optimisations). Both use the
same number of threads (``--threads``, default: the cores). Models (fresh weights: the time does not
depend on them): the demo's (width 16, depth 4, 'same') and the paper's at width 16 (depth 5,
'valid', tiles of 572 pixels). The baseline of each ratio is PyTorch on the same model; each
repeat times PyTorch and onnxruntime back to back, after one warm-up call each.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODELS = {  # name -> (config overrides, tile)
    "demo (w16 d4 same)": (["model.width=16", "model.depth=4", "model.padding=same"], None),
    "paper depth, w16 (d5 valid, tiles 572)": (["model.width=16", "model.depth=5", "model.padding=valid"], 572),
}


def main() -> None:
    import numpy as np
    import torch

    from unet_dist.config import load_config
    from unet_dist.export import export_onnx
    from unet_dist.model import UNet
    from unet_dist.onnx_model import OnnxUNet
    from unet_dist.segment import predict_logits

    p = C.parser(__doc__.split("\n\n")[0], repeats=5)
    p.add_argument("--threads", type=int, default=0, help="compute threads for both (default: the cores)")
    args = p.parse_args()
    t0 = C.header("ONNX: onnxruntime vs PyTorch on CPU, one photo", args)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    h, w = (128, 256) if args.quick else (512, 1024)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, h, w), dtype=np.float32))
    tmp = Path(tempfile.mkdtemp())
    ratios = []
    for name, (sets, tile) in MODELS.items():
        cfg = load_config(None, [*sets, "model.batch_norm=false"])
        torch.manual_seed(0)
        model = UNet.from_config(cfg.model).eval()
        export_onnx(model, cfg, tmp / "m.onnx")
        ort = OnnxUNet(tmp / "m.onnx", threads=threads)
        a, b = predict_logits(model, x, tile), predict_logits(ort, x, tile)  # warm-up, and the parity
        agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
        times: dict[str, list[float]] = {"PyTorch": [], "onnxruntime": []}
        for _ in range(args.repeats):
            times["PyTorch"] += C.timed(lambda: predict_logits(model, x, tile), 1)
            times["onnxruntime"] += C.timed(lambda: predict_logits(ort, x, tile), 1)
        table = C.Table(f"{name}: latency of one {h}x{w} photo (logits for every pixel), {threads} threads",
                        "s", higher_is_better=False, baseline="PyTorch")
        table.add("PyTorch", times["PyTorch"], "UNet, eager")
        table.add("onnxruntime", times["onnxruntime"], f"max abs logit difference {(a - b).abs().max().item():.1e}, "
                                                       f"argmax agreement {agree:.6f}")
        table.print()
        ratios.append(f"- {name}: onnxruntime / PyTorch latency **{table.ratio('onnxruntime'):.2f}**")
    print("Ratios (medians of this run):")
    print("\n".join(ratios))
    C.footer(t0)


if __name__ == "__main__":
    main()
