"""What a run needs, built once per rank and never changed afterwards (the objects inside, such as the
model and the optimiser, change as they train; which objects they are does not).

Built in two halves around the restore, in this order on every rank: :func:`trainable` (device,
seeds, the verified shards, model, optimiser, learning-rate schedule), then the checkpoint loads into
them (``loop.restore``), then :func:`build` (DDP wrapper, loss, the train stream from the restored step,
tracking).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from unet_dist.config import Config
from unet_dist.data import shards
from unet_dist.data.augment import Augment
from unet_dist.data.stream import TrainBatches, train_stream
from unet_dist.data.stream import share as stream_share
from unet_dist.errors import UnetDistError
from unet_dist.losses import SegmentationLoss, class_weights
from unet_dist import unet_geometry as geometry
from unet_dist.model import UNet, margin
from unet_dist.tracking import NullLogger, RunLogger
from unet_dist.train import agree, preemption, telemetry
from unet_dist.train.agree import AllRanksError
from unet_dist.train.checkpointer import Checkpointer
from unet_dist.train.context import Context
from unet_dist.train.observer import Observer
from unet_dist.train.plan import JobPlan

log = logging.getLogger("unet_dist.train")


@dataclass(frozen=True)
class Trainable:
    """The model and what updates it: what a checkpoint restores into."""

    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


@dataclass(frozen=True)
class Parts(Trainable):
    cfg: Config
    ctx: Context
    plan: JobPlan
    start_step: int  # the step restored (0: a fresh run)
    net: torch.nn.Module  # the DDP wrapper (the model itself in a world of one)
    step_fn: Callable  # net, compiled when train.compile
    loss_fn: torch.nn.Module
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    crop: tuple[int, int]  # label crop
    aug: Augment
    batches: Iterator  # this rank's train stream, from the restored step on
    stream: TrainBatches  # the stream's samples: the keys of any micro-batch (train.sample_log)
    val_urls: list[str]
    tracker: RunLogger | NullLogger  # rank 0's MLflow run; NullLogger elsewhere
    global_batch: int  # the run's, whatever the world size (global_batch)
    per_step: int  # micro-batches per optimiser step over all ranks
    share: int  # how many of them this rank takes
    preempt_group: object  # the process group the preemption flag is agreed on
    observer: Observer  # the goodput clock and the Prometheus series (train/observer.py)
    checkpointer: Checkpointer  # publishes checkpoints, in the background or not (train/checkpointer.py)


def trainable(cfg: Config, ctx: Context, plan: JobPlan) -> Trainable:
    """Device, seeds, the verified shards, model, optimiser and schedule: the same on every rank."""
    t = cfg.train
    device = device_for(cfg, ctx)
    torch.manual_seed(t.seed)  # same initial weights on every rank
    np.random.seed(t.seed + ctx.rank)
    if device.type == "cpu" and ctx.launcher != "torchrun":
        torch.set_num_threads(max(1, t.cpus_per_worker))
    verify_shards(plan, ctx)
    model = UNet.from_config(cfg.model).to(device)
    optimizer = make_optimizer(cfg, model)
    return Trainable(device, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)))


def build(cfg: Config, ctx: Context, plan: JobPlan, core: Trainable, start_step: int, observer: Observer,
          run_global_batch: int = 0) -> Parts:
    """The rest, once the checkpoint is restored into ``core``: the stream resumes where it left off.
    ``run_global_batch``: the global batch the restored checkpoint was trained with (0: none)."""
    t, device = cfg.train, core.device
    batch = global_batch(cfg, ctx, run_global_batch)
    per_step = batch // t.batch_size
    if t.channels_last:
        core.model.to(memory_format=torch.channels_last)
    net = DistributedDataParallel(core.model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world_size > 1 else core.model
    step_fn = torch.compile(net) if t.compile else net
    weight = class_weights(plan.manifest).to(device) if t.class_weights else None
    loss_fn = SegmentationLoss(weight, dice=t.dice)
    crop = label_crop(cfg)
    aug = Augment(crop=crop, scale=tuple(t.scale), flip=t.flip,
                  margin=margin(cfg.model.depth) if cfg.model.padding == "valid" else 0)
    loader = train_stream(  # a pure function of its position: it resumes where the restored step left off
        shards.shard_paths(cfg.shards.dir, plan.manifest, "train"), aug, t.batch_size, rank=ctx.rank,
        world=ctx.world_size, seed=t.seed, start=start_step, per_step=per_step, workers=t.loader_workers,
        pin_memory=device.type == "cuda", prefetch=cfg.shards.prefetch)
    preempt_group = preemption.cpu_group()
    tracker = open_tracker(cfg, ctx, plan, start_step, batch, device.type)
    if ctx.rank == 0:
        log.info("training %d steps from step %d: world %d, global batch %d (%d micro-batches of %d, %s a rank), "
                 "crop %s, device %s", t.steps, start_step, ctx.world_size, batch, per_step, t.batch_size,
                 _shares(per_step, ctx.world_size), crop, device)
    return Parts(**vars(core), cfg=cfg, ctx=ctx, plan=plan, start_step=start_step, net=net, step_fn=step_fn,
                 loss_fn=loss_fn, dtype=amp_dtype(cfg, device), crop=crop, aug=aug, batches=iter(loader),
                 stream=loader.dataset, val_urls=shards.shard_paths(cfg.shards.dir, plan.manifest, "val"),
                 tracker=tracker, global_batch=batch, per_step=per_step,
                 share=stream_share(per_step, ctx.rank, ctx.world_size), preempt_group=preempt_group, observer=observer,
                 checkpointer=Checkpointer(ctx, t.checkpoint_async, persist=tracker.persist))


def global_batch(cfg: Config, ctx: Context, run_global_batch: int = 0) -> int:
    """Images per optimiser step, the same at any world size so that an elastic group (or a resume at
    another size) trains on the same global batches: ``train.global_batch``, else the run's own (its
    checkpoint's), else ``batch_size x accumulation x`` the world size it starts with (under Ray
    ``train.workers``, the most an elastic group has). Every rank gets the same answer, and the same
    error when the world is larger than the step's micro-batches."""
    t = cfg.train
    starting_world = t.workers if ctx.launcher == "ray" else ctx.world_size
    batch = t.global_batch or run_global_batch or t.batch_size * t.accumulation * starting_world
    if batch % t.batch_size:
        raise AllRanksError(f"train.batch_size={t.batch_size} does not divide the run's global batch of {batch} "
                            "(from its checkpoint): set train.global_batch, or a batch_size that divides it")
    if batch // t.batch_size < ctx.world_size:
        raise AllRanksError(f"world size {ctx.world_size} is larger than the {batch // t.batch_size} micro-batches "
                            f"of a step (global batch {batch} / train.batch_size {t.batch_size}): some ranks "
                            "would have no data; raise train.global_batch or start fewer ranks")
    return batch


def _shares(per_step: int, world: int) -> str:
    counts = sorted({stream_share(per_step, r, world) for r in range(world)}, reverse=True)
    return " or ".join(map(str, counts))


def open_tracker(cfg: Config, ctx: Context, plan: JobPlan, start_step: int, global_batch: int,
                 device_type: str) -> RunLogger | NullLogger:
    """Rank 0's handle on the MLflow run (NullLogger elsewhere); a new run also logs what it starts from."""
    tracker = NullLogger()
    if ctx.rank == 0 and plan.run_id:
        tracker = RunLogger(cfg, plan.run_id, resumed=start_step > 0, spool_dir=plan.run_dir,
                            on_depth=lambda n: telemetry.current().set({"unet_tracking_spool_depth": n}))
    if start_step == 0:
        tags = {"launcher": ctx.launcher, "world_size": ctx.world_size, "device": device_type,
                "global_batch": global_batch}
        tracker.run_inputs(cfg, tags, plan.manifest_text, plan.manifest_sha256)
    return tracker


def verify_shards(plan: JobPlan, ctx: Context) -> None:
    """Shard hashes checked once (rank 0) before any step is taken; a mismatch stops every rank."""
    error = ""
    if ctx.rank == 0:
        try:
            for split in ("train", "val"):
                shards.verify_shards(plan.cfg.shards.dir, plan.manifest, split)
        except UnetDistError as e:
            error = str(e)
    agree.all_ok(not error, error, ctx.world_size)


def device_for(cfg: Config, ctx: Context) -> torch.device:
    if cfg.train.use_gpu:
        if not torch.cuda.is_available():
            raise UnetDistError("train.use_gpu is true but no CUDA device is visible to this worker")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        if t.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if t.schedule == "poly":
            return (1 - progress) ** 0.9
        return 1.0

    return factor


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def label_crop(cfg: Config) -> tuple[int, int]:
    """The training label crop; in 'valid' mode the largest crop the network maps exactly (the config
    schema has already refused a crop too small for the depth)."""
    h, w = cfg.train.crop
    if cfg.model.padding == "same":
        return h, w
    return geometry.valid_crop(h, cfg.model.depth), geometry.valid_crop(w, cfg.model.depth)


def example_hw(cfg: Config, crop: tuple[int, int]) -> tuple[int, int]:
    """The logged model's input example: the training crop, with the context a 'valid' U-Net needs."""
    if cfg.model.padding == "valid":
        m = margin(cfg.model.depth)
        return crop[0] + 2 * m, crop[1] + 2 * m
    return crop
