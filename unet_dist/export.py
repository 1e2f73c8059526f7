"""Export a trained U-Net to ONNX, checked, for onnxruntime, TensorRT and other runtimes.

``python -m unet_dist.export --model M --format onnx --out FILE [--opset N] [--log-to-run RUN_ID]``

M is a checkpoint (or run) directory, ``runs:/RUN_ID/PATH`` or ``models:/NAME/VERSION``. The graph
takes a normalised float32 image ``image [N, 3, H, W]`` (photo / 255 minus the ImageNet mean, over
its std, as :func:`unet_dist.data.decode.normalize`) with dynamic N, H and W and returns ``logits
[N, 19, H', W']``: the network itself (:meth:`UNet.body`), so H and W are what it takes as they are,
sides divisible by ``2 ** (depth - 1)`` for 'same' models, valid sizes for 'valid' ones (H' = H - 2
x margin). :class:`unet_dist.onnx_model.OnnxUNet` pads, tiles and crops around it, as for the
PyTorch model; the training config travels in the file's metadata. The file is checked with
``onnx.checker`` (full check, shape inference included) before it is written.

Example::

    python -m unet_dist.export --model runs/checkpoints/unet-demo --format onnx --out unet.onnx
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unet_dist import cli, model_source
from unet_dist.errors import UnetDistError

OPSET = 18


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m unet_dist.export", __doc__)
    model_source.add_argument(p)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="the file format (default: onnx)")
    p.add_argument("--out", required=True, type=cli.non_empty, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=cli.count, default=OPSET, metavar="N", help=f"ONNX opset (default: {OPSET})")
    p.add_argument("--log-to-run", metavar="RUN_ID", type=model_source.run_id,
                   help="also log the file to this MLflow run, as model_onnx/<name>")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if Path(args.out).is_dir():
        cli.fail("--out", f"{args.out} is a folder; expected a file name such as unet.onnx")
    model_source.check(args.model)
    return args


def export_onnx(model, cfg, path: Path, opset: int = OPSET) -> None:
    """Write ``model.body`` as a checked ONNX file with dynamic batch, height and width."""
    import onnx
    import torch

    from unet_dist.config import to_dict
    from unet_dist.onnx_model import INPUT, META_CONFIG, OUTPUT
    from unet_dist.unet_geometry import valid_input_size

    class Body(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.body(x)

    m = cfg.model
    side = valid_input_size(2 ** (m.depth + 1), m.depth) if m.padding == "valid" else 2 ** (m.depth + 1)
    example = torch.zeros(1, m.in_channels, side, side)
    axes = {0: "batch", 2: "height", 3: "width"}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.onnx.export(Body(model.float()).eval(), (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: axes, OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}},
                      opset_version=opset, dynamo=False)
    proto = onnx.load(str(tmp))
    onnx.helper.set_model_props(proto, {META_CONFIG: json.dumps(to_dict(cfg), sort_keys=True),
                                        "unet_dist.padding": m.padding, "unet_dist.depth": str(m.depth)})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: export(parse(argv)))


def export(args: argparse.Namespace) -> None:
    from unet_dist.serving.loading import load_model

    model, cfg = load_model(args.model, "cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_onnx(model, cfg, out, args.opset)
    except Exception as e:  # an opset the exporter or the checker refuses
        if isinstance(e, UnetDistError):
            raise
        raise UnetDistError(f"--opset {args.opset}: export failed ({str(e).splitlines()[0][:300]})") from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}, {cfg.model.padding} padding, "
          f"depth {cfg.model.depth}, width {cfg.model.width})")
    if args.log_to_run:
        from mlflow.tracking import MlflowClient

        from unet_dist import tracking_store

        MlflowClient(tracking_store.resolve()).log_artifact(args.log_to_run, str(out), "model_onnx")
        print(f"logged to MLflow run {args.log_to_run} as model_onnx/{out.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
