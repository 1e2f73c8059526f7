"""What the plain-PyTorch peer and the Ray Data peer share: unet_dist's training recipe (the same
U-Net, loss with class weights and Dice, AdamW, warm-up + cosine schedule, gradient clipping,
channels_last, initial weights), the augmentation written with torchvision's v2 transforms the way
torchvision's own segmentation reference writes it (random resize of the shorter side, flip, random
crop padded with the ignore label, float, normalise), one optimiser step, and the scoring.

Each peer puts these inside its own idiomatic outer loop: DDP under torchrun over a DataLoader, or
Ray Train over ``iter_torch_batches``. Progress lines use the words of unet_dist's loop
("training N steps from step 0", "step N: val mIoU X"), so the benchmark reads every run, ours
included, with one set of patterns.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchvision import tv_tensors
from torchvision.transforms import v2

import _ours as U


@dataclass
class Recipe:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: torch.nn.Module
    channels_last: bool
    clip: float
    dtype: torch.dtype | None  # autocast: bf16 on a GPU, None (fp32) on the CPU, as unet_dist decides


def config_from_args(description: str):
    """unet_dist's config from ``--config FILE`` and ``--set key=value`` (the same numbers as ours)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    return U.load_config(args.config, args.set)


def recipe(cfg, manifest: dict, device: torch.device) -> Recipe:
    """Model, optimiser, schedule and loss exactly as unet_dist's loop builds them from ``cfg``."""
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights as unet_dist's loop
    model = U.UNet.from_config(cfg.model).to(device)
    optimizer = U.make_optimizer(cfg, model)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    weight = U.class_weights(manifest).to(device) if t.class_weights else None
    precision = t.precision if t.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return Recipe(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, U.lr_lambda(cfg)),
                  U.SegmentationLoss(weight, dice=t.dice).to(device), t.channels_last, t.grad_clip,
                  torch.bfloat16 if precision == "bf16" else None)


def train_transform(cfg, size: tuple[int, int]) -> v2.Compose:
    """torchvision's segmentation reference recipe (``references/segmentation/presets.py``, v2 API)
    with this config's numbers: ``train.scale`` of the shorter side of a ``size`` image, the flip,
    a ``train.crop`` window (padded with the ignore label where the scaled image is smaller)."""
    t = cfg.train
    short = min(size)
    steps = [] if tuple(t.scale) == (1.0, 1.0) else [v2.RandomResize(round(t.scale[0] * short),
                                                                     round(t.scale[1] * short))]
    if t.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.RandomCrop(list(t.crop), pad_if_needed=True, fill={tv_tensors.Mask: U.IGNORE, "others": 0}))
    return v2.Compose(steps + _to_float())


def eval_transform() -> v2.Compose:
    return v2.Compose(_to_float())


def _to_float() -> list:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean=(U.MEAN / 255).tolist(), std=(U.STD / 255).tolist()), v2.ToPureTensor()]


def as_tv(photo: np.ndarray, ids: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """(H, W, 3) uint8 photo and (H, W) uint8 class ids -> torchvision's image and mask types."""
    return (tv_tensors.Image(torch.from_numpy(np.array(photo)).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(np.array(ids))))


def train_step(net: torch.nn.Module, r: Recipe, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One optimiser step: forward, loss, backward, clip, AdamW, schedule."""
    if r.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=r.dtype or torch.float32, enabled=r.dtype is not None):
        loss = r.loss_fn(net(images), target)
    loss.backward()
    if r.clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), r.clip)
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, dtype: torch.dtype | None) -> dict:
    """Val scores from the confusion matrix of this rank's share, summed over the ranks (exact for
    any split, as unet_dist scores)."""
    model.eval()
    conf = torch.zeros(U.NUM_CLASSES, U.NUM_CLASSES, dtype=torch.int64, device=device)
    for images, target in batches:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = model(images.to(device)).argmax(1)
        conf += U.confusion_matrix(pred, target.to(device), U.NUM_CLASSES, U.IGNORE)
    if dist.is_initialized():
        dist.all_reduce(conf)
    model.train()
    return U.scores(conf)


def save(r: Recipe, step: int, path: Path) -> None:
    """The checkpoint a plain script writes: model, optimiser and schedule state."""
    torch.save({"model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(),
                "scheduler": r.scheduler.state_dict(), "step": step}, path)


def due(cfg, step: int) -> tuple[bool, bool]:
    """(evaluate, checkpoint) at ``step``: unet_dist's schedule, both always at the last step."""
    t = cfg.train
    last = step == t.steps
    return bool(t.eval_every and step % t.eval_every == 0) or last, step % t.checkpoint_every == 0 or last


def say(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)
