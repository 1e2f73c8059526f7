"""segmentation_models_pytorch's ``smp.Unet`` in this package's own pipeline and loop: the peer a user
who reaches for a model library would try. Everything but the network is unet_dist's: the shards,
the stream, the loop, the launcher (``python -m unet_dist.train``, here under torchrun), scoring
and checkpoints. The model factory is the one line swapped.

    torchrun --standalone --nproc_per_node=2 benchmarks/peers/smp_unet.py [--encoder NAME] \
        [--config FILE] [--set key=value ...]

``smp.Unet(encoder_name=ENCODER, encoder_weights=None, ...)``, smp's defaults otherwise (decoder
channels 256..16, BatchNorm): no pretrained weights, since nothing can be downloaded here. The
encoder is the smp encoder closest to our U-Net's cost: ``flops()`` counts forward + backward
FLOPs per training image of ours and of each candidate (benchmarks/bench_peers.py prints them).
smp needs timm and torchvision, and torchvision needs a CUDA build of torch here (see
benchmarks/peers/requirements.txt): the benchmark runs every case, ours included, on that torch.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ours as U  # noqa: E402

# The closest smp.Unet to ours by FLOPs (timm's RegNetX-200MF through smp's "tu-" encoders);
# CANDIDATES are the other light encoders compared in bench_peers.py's FLOPs table.
ENCODER = "tu-regnetx_002"
CANDIDATES = ("tu-regnetx_002", "tu-mobilenetv3_small_100", "tu-resnet10t", "resnet18", "resnet34")
BUILT = "peer model built:"


def make(model_cfg, encoder: str = ENCODER):
    import segmentation_models_pytorch as smp

    net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=model_cfg.in_channels,
                   classes=model_cfg.num_classes)
    # What unet_dist's scoring reads of a network: padding "same" (output = input size) and the
    # pooling depth (smp's 5 downsamplings: sides must divide by 32).
    net.padding, net.depth = "same", 6
    return net


def swap_model(encoder: str) -> None:
    """unet_dist builds its network with ``UNet.from_config(cfg.model)``: build smp.Unet instead,
    and say so (bench_peers.py checks the line, so a loop that stops calling it fails loudly)."""
    def build(cls, model_cfg):
        print(f"{BUILT} smp.Unet({encoder!r})", flush=True)
        return make(model_cfg, encoder)

    U.UNet.from_config = classmethod(build)


def flops(size: tuple[int, int], width: int, depth: int, encoders=CANDIDATES) -> dict[str, tuple[float, float]]:
    """{name: (GFLOP forward + backward per image at ``size``, million parameters)} for our U-Net
    (``width``, ``depth``, same padding) and smp.Unet with each encoder."""
    import warnings

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(model) -> tuple[float, float]:
        with FlopCounterMode(display=False) as f:
            model(torch.zeros(1, 3, *size)).sum().backward()
        return f.get_total_flops() / 1e9, sum(p.numel() for p in model.parameters()) / 1e6

    cfg = U.load_config(None, [f"model.width={width}", f"model.depth={depth}"])
    out = {"ours": count(U.UNet.from_config(cfg.model))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in encoders:
            out[name] = count(make(cfg.model, name))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    encoder = ENCODER
    if "--encoder" in args:
        i = args.index("--encoder")
        encoder = args[i + 1]
        del args[i:i + 2]
    sys.argv = [sys.argv[0], *args]
    swap_model(encoder)
    runpy.run_module("unet_dist.train", run_name="__main__", alter_sys=True)
