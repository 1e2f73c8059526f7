"""Which device a command runs on, checked before any work: ``--device`` of evaluate and predict,
and ``train.use_gpu`` for torchrun (this machine's CUDA) or Ray (the cluster's GPUs).

Why here and early: torch's own answers come late and as tracebacks ("Torch not compiled with CUDA
enabled" on the first tensor moved, "Distributed package doesn't have NCCL built in" in every rank).
"""
from __future__ import annotations

import argparse
import re

from unet_dist.errors import UnetDistError

DEVICES = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """An argparse type: the spelling of a device (whether it is there is :func:`resolve`'s job)."""
    name = text.strip().lower()
    if not _DEVICE_RE.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected {DEVICES}, got {text!r}")
    return name


def _no_cuda_reason(torch) -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"


def resolve(name: str, argument: str = "--device") -> str:
    """``auto`` -> ``cuda`` when a CUDA device is there, else ``cpu``; ``cuda``/``cuda:N`` only when
    that device is there."""
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UnetDistError(f"{argument}: {name}, but {_no_cuda_reason(torch)}; use --device cpu (or auto)")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UnetDistError(f"{argument}: {name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def check_torchrun_gpus(use_gpu: bool, local_world_size: int) -> None:
    """Under torchrun, on each machine: ``train.use_gpu`` needs CUDA, NCCL and a GPU per local rank."""
    if not use_gpu:
        return
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        raise UnetDistError(f"train.use_gpu: true, but {_no_cuda_reason(torch)}; "
                            "set train.use_gpu=false to train on CPUs (gloo)")
    if not dist.is_nccl_available():
        raise UnetDistError("train.use_gpu: true, but this torch has no NCCL; set train.use_gpu=false (gloo)")
    if local_world_size > torch.cuda.device_count():
        raise UnetDistError(f"train.use_gpu: true with {local_world_size} ranks on this machine, but it has "
                            f"{torch.cuda.device_count()} CUDA device(s); give torchrun --nproc-per-node "
                            f"{torch.cuda.device_count()} (NPROC=gpu)")


def check_ray_gpus(use_gpu: bool, workers: int, resources: dict) -> None:
    """Under Ray: ``train.use_gpu`` needs a GPU per worker in the cluster (``ray.cluster_resources()``),
    not on the driver, which may be a CPU-only head."""
    have = resources.get("GPU", 0)
    if use_gpu and have < workers:
        raise UnetDistError(f"train.use_gpu: true asks one GPU for each of train.workers={workers} workers, "
                            f"but the Ray cluster has {have:g} GPU(s); set train.use_gpu=false or use a GPU cluster")
