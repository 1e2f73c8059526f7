"""The one training loop. Ray Train and torchrun both call :func:`train` in every rank; what differs
between them (how a checkpoint is published, where the latest one is found) comes in a
:class:`Context`, so the loop itself never asks which launcher started it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from unet_dist.config import Config
from unet_dist.data import shards
from unet_dist.data.loader import Augment, to_device
from unet_dist.data.stream import train_stream
from unet_dist.errors import UnetDistError
from unet_dist.evaluation import evaluate_model
from unet_dist.losses import SegmentationLoss, class_weights
from unet_dist.model import UNet, margin, output_size
from unet_dist.tracking import NullLogger, RunLogger
from unet_dist.train import checkpoint, preemption
from unet_dist.train.observer import Observer  # goodput + Prometheus (issue 26)

log = logging.getLogger("unet_dist.train")


@dataclass
class Context:
    """What a launcher tells the loop about the rank it runs in."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # ray | torchrun | single
    run_id: str | None  # MLflow run (rank 0 only needs it)
    # All ranks call report(metrics, dir_or_None) at the same steps; rank 0 passes a checkpoint dir.
    report: Callable[[dict, Path | None], None]
    # The newest checkpoint directory to resume from, or None; callable as a context manager.
    latest_checkpoint: Callable[[], contextlib.AbstractContextManager]
    resumed_from: str | None = field(default=None)
    # Ray: a reason when a node of this job is being drained (a spot reclaim), else None. Every rank
    # calls it at the same steps (it is a barrier across the workers).
    node_drain: Callable[[], str | None] | None = None
    # goodput (issue 26): this attempt's start, the launch's start (epoch s), the run directory
    started_at: float = field(default_factory=time.time)
    launched_at: float | None = None
    run_dir: str | Path | None = None


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
    """The training label crop; in 'valid' mode the largest crop the network maps exactly."""
    h, w = cfg.train.crop
    if cfg.model.padding == "same":
        return h, w
    m = margin(cfg.model.depth)

    def fit(size: int) -> int:
        for out in range(size, 0, -1):
            if output_size(out + 2 * m, cfg.model.depth, "valid") == out:
                return out
        raise UnetDistError(f"train.crop {cfg.train.crop}: too small for a valid-padding U-Net of depth {cfg.model.depth}")

    return fit(h), fit(w)


class AllRanksError(UnetDistError):
    """Raised by every rank together after a check they agreed on: a retry would end the same way."""


def _all_ranks_ok(ok: bool, message: str, ctx: Context, device: torch.device) -> None:
    """Raise the same error on every rank when any rank failed a check (no rank left waiting)."""
    if ctx.world_size > 1:
        messages = [None] * ctx.world_size
        dist.all_gather_object(messages, "" if ok else message)
        message = next((m for m in messages if m), "")
        ok = not message
    if not ok:
        raise AllRanksError(message)


def _verify(cfg: Config, ctx: Context, device: torch.device) -> dict:
    """Manifest read and shard hashes checked once (rank 0) before any step is taken."""
    try:
        manifest = shards.load_manifest(cfg.shards.dir)
        if ctx.rank == 0:
            for split in ("train", "val"):
                shards.verify_shards(cfg.shards.dir, manifest, split)
        error = ""
    except UnetDistError as e:
        manifest, error = {}, str(e)
    _all_ranks_ok(not error, error, ctx, device)
    return manifest


def average_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Average BatchNorm running statistics across ranks (each rank saw different batches), so
    evaluation, checkpoints and the final weights are the same on every rank."""
    if world_size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world_size)


def _finite_state(model: torch.nn.Module) -> bool:
    """Weights and buffers all finite; the same answer on every rank (replicas and buffers agree)."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


NO_STEP = 2**62  # "no non-finite loss yet" in the device-side first-bad-step tracker


@dataclass
class _Window:
    """Loss and throughput since the last train log line. The loss sum stays on the device (a
    0-dim tensor once the first step adds to it): it is read only when the line is logged."""

    started: float = field(default_factory=time.perf_counter)
    images: int = 0
    loss_sum: torch.Tensor | float = 0.0
    loss_n: int = 0


@dataclass
class Run:
    """One rank's run: what :func:`setup` builds, :func:`restore` fills in and :func:`prepare` adds."""

    cfg: Config
    ctx: Context
    device: torch.device
    manifest: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start_step: int = 0
    best: float = float("nan")  # best val mIoU so far
    # set by prepare()
    net: torch.nn.Module | None = None  # the DDP wrapper (or the model itself in a world of one)
    step_fn: Callable | None = None  # net, compiled when train.compile
    loss_fn: torch.nn.Module | None = None
    dtype: torch.dtype | None = None  # autocast dtype, None = fp32
    crop: tuple[int, int] = (0, 0)
    batches: Iterator | None = None
    val_urls: list[str] = field(default_factory=list)
    tracker: RunLogger | NullLogger = field(default_factory=NullLogger)
    global_batch: int = 0
    # progress
    step: int = 0
    status: str = "finished"
    last_scores: dict = field(default_factory=dict)
    window: _Window = field(default_factory=_Window)
    # the first step whose loss was not finite (NO_STEP: none yet), on the device; read at check steps
    first_bad: torch.Tensor | None = None
    aug: Augment | None = None
    wall_s: float = 0.0
    preempt_group: object = None  # the process group the preemption flag is agreed on
    saved: int = -1  # the last step checkpointed
    drain_saved: bool = False  # a checkpoint was taken for a node drain
    observer: Observer | None = None  # goodput clock + Prometheus (issue 26)


def train(cfg: Config, ctx: Context) -> dict:
    """Train ``cfg.train.steps`` optimiser steps in this rank; returns the run summary (rank 0)."""
    run = setup(cfg, ctx)
    restore(run)
    prepare(run)
    run_steps(run)
    return finish(run)


def setup(cfg: Config, ctx: Context) -> Run:
    """Device, seeds, the verified manifest, model, optimiser and schedule: the same on every rank."""
    t = cfg.train
    device = device_for(cfg, ctx)
    torch.manual_seed(t.seed)  # same initial weights on every rank
    np.random.seed(t.seed + ctx.rank)
    if device.type == "cpu" and ctx.launcher != "torchrun":
        torch.set_num_threads(max(1, t.cpus_per_worker))
    manifest = _verify(cfg, ctx, device)
    model = UNet.from_config(cfg.model).to(device)
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return Run(cfg, ctx, device, manifest, model, optimizer, scheduler, observer=Observer(cfg, ctx))


def restore(run: Run) -> None:
    """Continue from the launcher's newest checkpoint, if any; a refused one stops every rank together."""
    ctx, error = run.ctx, ""
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            try:
                state = checkpoint.load_state(ckpt_dir, map_location=run.device)
                checkpoint.load_weights(run.model, state["model"], str(ckpt_dir))
            except UnetDistError as e:
                error = str(e)
            else:
                run.optimizer.load_state_dict(state["optimizer"])
                run.scheduler.load_state_dict(state["scheduler"])
                exact = checkpoint.restore_rank_state(run.model, state, ctx.rank, ctx.world_size)
                if not exact and ctx.rank == 0:
                    log.warning("%s was written by another world size: the resume is not exact", ckpt_dir)
                run.start_step, run.best = int(state["step"]), float(state["best_miou"])
                ctx.resumed_from = str(ckpt_dir)
                run.observer.resumed_from(checkpoint.read_meta(ckpt_dir))  # observer: the carried ledger
    _all_ranks_ok(not error, error, ctx, run.device)
    if ctx.rank == 0 and ctx.resumed_from:
        log.info("resumed from %s at step %d", ctx.resumed_from, run.start_step)


def prepare(run: Run) -> None:
    """Wrap the model for DDP, open the train stream where the restored step left off, open tracking."""
    cfg, ctx, t, device = run.cfg, run.ctx, run.cfg.train, run.device
    if t.channels_last:
        run.model.to(memory_format=torch.channels_last)
    run.net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world_size > 1 else run.model
    run.step_fn = torch.compile(run.net) if t.compile else run.net
    weight = class_weights(run.manifest).to(device) if t.class_weights else None
    run.loss_fn = SegmentationLoss(weight, dice=t.dice)
    run.dtype = amp_dtype(cfg, device)
    run.crop = label_crop(cfg)
    aug = run.aug = Augment(crop=run.crop, scale=tuple(t.scale), flip=t.flip,
                            margin=margin(cfg.model.depth) if cfg.model.padding == "valid" else 0)
    run.val_urls = shards.shard_paths(cfg.shards.dir, run.manifest, "val")
    # The stream is a pure function of its position: it resumes where the restored step left off.
    run.batches = iter(train_stream(
        shards.shard_paths(cfg.shards.dir, run.manifest, "train"), aug, t.batch_size, rank=ctx.rank,
        world=ctx.world_size, seed=t.seed, start=run.start_step * t.accumulation, workers=t.loader_workers,
        pin_memory=device.type == "cuda", prefetch=cfg.shards.prefetch))
    run.preempt_group = preemption.cpu_group()
    run.global_batch = t.batch_size * t.accumulation * ctx.world_size
    if ctx.rank == 0 and ctx.run_id:
        run.tracker = RunLogger(cfg, ctx.run_id, resumed=run.start_step > 0)
    if run.start_step == 0:
        run.tracker.run_inputs(cfg, {"launcher": ctx.launcher, "world_size": ctx.world_size,
                                     "device": device.type, "global_batch": run.global_batch})
    if ctx.rank == 0:
        log.info("training %d steps from step %d: world %d, global batch %d, crop %s, device %s",
                 t.steps, run.start_step, ctx.world_size, run.global_batch, run.crop, device)


def run_steps(run: Run) -> None:
    """Steps after the restored one up to ``train.steps``; stops early on a non-finite loss or weights."""
    t, ctx = run.cfg.train, run.ctx
    run.model.train()
    t0 = time.perf_counter()
    run.window, run.step = _Window(), run.start_step
    if run.start_step >= t.steps and ctx.rank == 0:
        log.info("run already complete at step %d: nothing to train", run.start_step)
    run.first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=run.device)
    run.observer.steps_begin(run.tracker, run.start_step)  # observer: resume report, steps begin
    for step in range(run.start_step + 1, t.steps + 1):
        run.step = step
        preemption.at_step(step)
        bad = _optimizer_step(run)
        if bad is not None:
            run.status, run.step = "non_finite_loss", bad
            if ctx.rank == 0:
                log.error("non-finite loss at step %d: stopping; the last good checkpoint is kept%s",
                          bad, f" (found at step {step})" if bad != step else "")
            break
        _log_train(run, step)
        if not _evaluate_and_checkpoint(run, step):
            break
        if step < t.steps and preemption.agreed(ctx.world_size, run.preempt_group):
            _checkpoint_preempted(run, step)
            break
        if ctx.node_drain and step % t.log_every == 0 and step < t.steps and not run.drain_saved:
            if not _checkpoint_before_drain(run, step):
                break
    preemption.steps_done()
    run.observer.steps_end()  # observer: what follows the last step is "other"
    run.wall_s = time.perf_counter() - t0


def _check_step(cfg: Config, step: int) -> bool:
    """Steps at which the loop reads the device (log, eval, checkpoint, last); none between them."""
    t = cfg.train
    return (step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.steps
            or bool(t.eval_every and step % t.eval_every == 0))


def _first_bad_step(run: Run) -> int | None:
    """The first step with a non-finite loss on any rank so far, or None: one host read (and one
    all-reduce), made at check steps only."""
    first_bad = run.first_bad
    if run.ctx.world_size > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad = int(first_bad.item())
    return None if bad == NO_STEP else bad


def _optimizer_step(run: Run) -> int | None:
    """One optimiser step over ``train.accumulation`` micro-batches, with no host synchronisation.
    The loss is summed and a non-finite one recorded on the device; at check steps the record is
    read before the update: the first non-finite step (the same on every rank) is returned, and
    this step's update is not made, so no later checkpoint is ever written."""
    t, ctx, device, w = run.cfg.train, run.ctx, run.device, run.window
    for micro in range(t.accumulation):
        with run.observer.timed("data_wait"):  # observer
            batch = next(run.batches)
        images, target = to_device(batch, run.aug, device, t.channels_last)
        sync = contextlib.nullcontext() if micro == t.accumulation - 1 or ctx.world_size == 1 else run.net.no_sync()
        with sync, torch.autocast(device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
            logits = run.step_fn(images)
            loss = run.loss_fn(logits, target) / t.accumulation  # the loss works in fp32
        loss.backward()
        step_loss = loss.detach() if micro == 0 else step_loss + loss.detach()
    w.loss_sum = w.loss_sum + step_loss
    w.loss_n += 1
    # clamp takes the step as a kernel argument: no host-to-device copy
    run.first_bad = torch.where(torch.isfinite(step_loss), run.first_bad, run.first_bad.clamp(max=run.step))
    if _check_step(run.cfg, run.step):
        bad = _first_bad_step(run)
        if bad is not None:
            return bad
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    w.images += run.global_batch
    return None


def _log_train(run: Run, step: int) -> None:
    """Every ``train.log_every`` steps: mean loss, learning rate and images/s since the last line."""
    t, w = run.cfg.train, run.window
    if step % t.log_every and step != t.steps:
        return
    lr = run.scheduler.get_last_lr()[0]
    rate = w.images / max(time.perf_counter() - w.started, 1e-9)
    mean_loss = float(w.loss_sum) / max(w.loss_n, 1)  # the window's one host read of the loss
    run.tracker.metrics({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": rate}, step)
    run.observer.logged(step, rate)  # observer: Prometheus series, goodput beacon
    if run.ctx.rank == 0:
        log.info("step %d/%d loss %.4f lr %.2e %.1f img/s", step, t.steps, mean_loss, lr, rate)
    run.window = _Window()


def _evaluate_and_checkpoint(run: Run, step: int) -> bool:
    """Evaluate and save when due (always at the last step); False when the weights went non-finite."""
    t, ctx = run.cfg.train, run.ctx
    last = step == t.steps
    evaluate = bool(t.eval_every and step % t.eval_every == 0) or last
    save = step % t.checkpoint_every == 0 or last
    if evaluate or save:
        average_buffers(run.model, ctx.world_size)
    if evaluate:
        with run.observer.timed("evaluation"):  # observer
            run.last_scores = _evaluate(run, step)
        miou = run.last_scores["miou"]
        run.best = miou if math.isnan(run.best) else max(run.best, miou)
    if save:
        if not _finite_state(run.model):  # a finite loss can sit on overflowed BatchNorm statistics
            run.status = "non_finite_weights"
            if ctx.rank == 0:
                log.error("non-finite weights at step %d: stopping; the last good checkpoint is kept", step)
            return False
        metrics = {"step": step, "best_miou": run.best, "status": "running" if not last else run.status}
        if run.last_scores:
            metrics["val_miou"] = run.last_scores["miou"]
        with run.observer.timed("checkpoint"):  # observer
            _save(run, step, metrics)
        run.saved = step
    return True


def _checkpoint_now(run: Run, step: int, status: str) -> bool:
    """A checkpoint of ``step`` off the schedule (every rank calls it), unless this step was just
    saved. Buffers are not averaged, so a run resumed from it goes on exactly as one that never
    stopped; each rank's own are saved (checkpoint.rank_state). False, with the run's status set,
    when the loss or the weights are not finite: such a step is never checkpointed."""
    ctx = run.ctx
    finite = torch.tensor([float(_finite_state(run.model))])  # buffers differ by rank here: agree
    if ctx.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=run.preempt_group)
    bad = _first_bad_step(run)
    if bad is not None or finite.item() < 1:
        run.status, run.step = ("non_finite_loss", bad) if bad is not None else ("non_finite_weights", step)
        return False
    if run.saved != step:
        with run.observer.timed("checkpoint"):  # observer
            _save(run, step, {"step": step, "best_miou": run.best, "status": status})
        run.saved = step
    return True


def _checkpoint_preempted(run: Run, step: int) -> None:
    """Every rank agreed to stop after ``step`` (a SIGTERM somewhere): checkpoint it and stop with
    status ``preempted``."""
    if run.ctx.rank == 0:
        log.info("preempted (%s): checkpoint at step %d, then stop", preemption.reason(), step)
    if _checkpoint_now(run, step, preemption.STATUS):
        run.status = preemption.STATUS
        if run.ctx.rank == 0:
            log.info("preemption checkpoint at step %d published %.2f s after the request",
                     step, preemption.seconds_since_request())


def _checkpoint_before_drain(run: Run, step: int) -> bool:
    """Ray says a node of this job is being drained (a spot reclaim notice): checkpoint now and go
    on training. When the node goes, Ray Train restarts the workers from this checkpoint (counted
    against FailureConfig.max_preemption_failures, not max_failures); if it never goes, nothing is
    lost. False when the step could not be checkpointed (not finite: training stops)."""
    why = run.ctx.node_drain()
    if why is None:
        return True
    run.drain_saved = True
    if run.ctx.rank == 0:
        log.warning("%s: checkpoint at step %d, training goes on", why, step)
    return _checkpoint_now(run, step, "running")


def _evaluate(run: Run, step: int) -> dict:
    """Val scores on every rank (each scores a share); rank 0 logs them with example pictures."""
    t, ctx = run.cfg.train, run.ctx
    result = evaluate_model(run.model, run.val_urls, batch_size=t.batch_size, device=run.device, dtype=run.dtype,
                            rank=ctx.rank, world=ctx.world_size, limit=t.eval_batches,
                            keep_examples=4 if ctx.rank == 0 else 0)
    scores = result["scores"]
    run.tracker.evaluation(result, step)
    if ctx.rank == 0:
        log.info("step %d: val mIoU %.4f, pixel acc %.4f", step, scores["miou"], scores["pixel_acc"])
    run.model.train()
    return scores


def _save(run: Run, step: int, metrics: dict) -> None:
    """Every rank calls this; rank 0 writes the checkpoint and the launcher publishes it."""
    ctx = run.ctx
    ranks = checkpoint.gather_rank_states(run.model, ctx.world_size)
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="unet-ckpt-") as tmp:
        state = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "step": step,
            "best_miou": run.best,
            "rng": checkpoint.rng_state(),
            "ranks": ranks,  # each rank's RNG and BatchNorm statistics: an exact resume
        }
        meta = checkpoint.meta(run.cfg, step=step, best_miou=run.best, run_id=ctx.run_id,
                               world_size=ctx.world_size, launcher=ctx.launcher)
        meta.update(status=metrics.get("status"), data_position=step * run.cfg.train.accumulation,
                    goodput=run.observer.ledger(step))  # observer: the ledger the next attempt carries on
        checkpoint.write(Path(tmp), state, meta)
        ctx.report(metrics, Path(tmp))


def finish(run: Run) -> dict:
    """The run summary; rank 0 logs the model (a finished run that trained) and closes the MLflow run."""
    cfg, ctx, step, status = run.cfg, run.ctx, run.step, run.status
    # Every rank states what it ends with: DDP keeps replicas identical, and this line shows it.
    log.info("rank %d final weights sha256 %s", ctx.rank, weights_digest(run.model))
    stopped_cleanly = status in ("finished", preemption.STATUS)
    summary = {"status": status, "steps": step if stopped_cleanly else step - 1,
               "wall_s": round(run.wall_s, 1), "best_miou": run.best,
               "val_miou": run.last_scores.get("miou", float("nan")), "world_size": ctx.world_size,
               "resumed_from": ctx.resumed_from, "mlflow_run_id": ctx.run_id}
    if not stopped_cleanly:
        ctx.report({"step": step - 1, "status": status, "best_miou": run.best}, None)
    if ctx.rank == 0:
        if status == "finished" and cfg.mlflow.log_model and ctx.run_id and step > run.start_step:
            summary["model_uri"] = run.tracker.model(run.model, cfg, crop_for_example(cfg, run.crop))
        if status == preemption.STATUS:  # resumable: not FAILED
            run.tracker.tags({"unet_dist.status": status, "unet_dist.preempted_at_step": step})
        summary["goodput"] = run.observer.end(run.tracker, summary["steps"], status)  # observer: end report
        run.tracker.close({"finished": "FINISHED", preemption.STATUS: "KILLED"}.get(status, "FAILED"))
    return summary


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def crop_for_example(cfg: Config, crop: tuple[int, int]) -> tuple[int, int]:
    if cfg.model.padding == "valid":
        m = margin(cfg.model.depth)
        return crop[0] + 2 * m, crop[1] + 2 * m
    return crop

