"""The one training loop. Ray Train and torchrun both call :func:`train` in every rank; what differs
between them (how a checkpoint is published, where the latest one is found) comes in a
:class:`Context`, so the loop itself never asks which launcher started it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from unet_dist import labels, viz
from unet_dist.config import Config, dump_yaml, to_dict
from unet_dist.data import shards
from unet_dist.data.loader import Augment, to_device
from unet_dist.data.stream import train_stream
from unet_dist.errors import UnetDistError
from unet_dist.evaluate import evaluate_model
from unet_dist.model import UNet, margin, output_size
from unet_dist.tracking import NullLogger, RunLogger, file_sha256, git_commit
from unet_dist.train import checkpoint, preemption

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


def class_weights(manifest: dict) -> torch.Tensor:
    """Weights 1 / ln(1.02 + p_c) from the train pixel histogram (rare classes weigh more, bounded)."""
    counts = np.asarray(manifest["class_pixels"]["train"][: labels.NUM_CLASSES], dtype=np.float64)
    p = counts / max(1.0, counts.sum())
    w = 1.0 / np.log(1.02 + p)
    return torch.tensor(w / w[counts > 0].mean() if (counts > 0).any() else w, dtype=torch.float32)


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


NO_STEP = 2**62  # "no non-finite loss yet" in the device-side first-bad-step tracker


def _first_bad_step(first_bad: torch.Tensor, ctx: Context) -> int | None:
    """The first step with a non-finite loss on any rank since the start, or None: one host read
    (and one all-reduce), made at check steps only."""
    if ctx.world_size > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad = int(first_bad.item())
    return None if bad == NO_STEP else bad


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


def _save(step: int, cfg: Config, ctx: Context, model, optimizer, scheduler, metrics: dict, best: float):
    """Every rank calls this; rank 0 writes the checkpoint and the launcher publishes it."""
    ranks = checkpoint.gather_rank_states(model, ctx.world_size)
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="unet-ckpt-") as tmp:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "best_miou": best,
            "rng": checkpoint.rng_state(),
            "ranks": ranks,  # each rank's RNG and BatchNorm statistics: an exact resume
        }
        manifest = Path(cfg.shards.dir) / "manifest.json"
        meta = {
            "step": step,
            "steps_total": cfg.train.steps,
            "best_miou": best,
            "config": to_dict(cfg),
            "mlflow_run_id": ctx.run_id,
            "world_size": ctx.world_size,
            "launcher": ctx.launcher,
            "status": metrics.get("status"),
            "data_position": step * cfg.train.accumulation,  # micro-batches each rank has taken
            "shards_manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
            "quantizer": str(Path(cfg.shards.dir) / "quantizer.json"),
        }
        checkpoint.write(Path(tmp), state, meta)
        ctx.report(metrics, Path(tmp))


def train(cfg: Config, ctx: Context) -> dict:
    """Train ``cfg.train.steps`` optimiser steps in this rank; returns the run summary (rank 0)."""
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
    start_step, best, error = 0, float("nan"), ""
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            try:
                state = checkpoint.load_state(ckpt_dir, map_location=device)
                checkpoint.load_weights(model, state["model"], str(ckpt_dir))
            except UnetDistError as e:  # a refused checkpoint: every rank stops together
                error = str(e)
            else:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                exact = checkpoint.restore_rank_state(model, state, ctx.rank, ctx.world_size)
                if not exact and ctx.rank == 0:
                    log.warning("%s was written by another world size: the resume is not exact", ckpt_dir)
                start_step, best = int(state["step"]), float(state["best_miou"])
                ctx.resumed_from = str(ckpt_dir)
    _all_ranks_ok(not error, error, ctx, device)
    if ctx.rank == 0 and ctx.resumed_from:
        log.info("resumed from %s at step %d", ctx.resumed_from, start_step)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.world_size > 1 else model
    step_fn = torch.compile(net) if t.compile else net

    weight = class_weights(manifest).to(device) if t.class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=labels.IGNORE)
    dtype = amp_dtype(cfg, device)
    crop = label_crop(cfg)
    aug = Augment(crop=crop, scale=tuple(t.scale), flip=t.flip,
                  margin=margin(cfg.model.depth) if cfg.model.padding == "valid" else 0)
    train_urls = shards.shard_paths(cfg.shards.dir, manifest, "train")
    val_urls = shards.shard_paths(cfg.shards.dir, manifest, "val")
    batches = iter(train_stream(
        train_urls, aug, t.batch_size, rank=ctx.rank, world=ctx.world_size, seed=t.seed,
        start=start_step * t.accumulation, workers=t.loader_workers, pin_memory=device.type == "cuda"))
    preempt_group = preemption.cpu_group()

    tracker = RunLogger(cfg, ctx.run_id, resumed=start_step > 0) if ctx.rank == 0 and ctx.run_id else NullLogger()
    global_batch = t.batch_size * t.accumulation * ctx.world_size
    if start_step == 0:
        tracker.tags({
            "launcher": ctx.launcher, "world_size": ctx.world_size, "device": device.type,
            "global_batch": global_batch, "git_commit": git_commit() or "none",
            "shards_manifest_sha256": file_sha256(Path(cfg.shards.dir) / "manifest.json"),
        })
        tracker.metrics({"global_batch": global_batch}, step=0)
        tracker.artifact(Path(cfg.shards.dir) / "manifest.json", "data")
        quantizer = Path(cfg.shards.dir) / "quantizer.json"
        if quantizer.is_file():
            tracker.artifact(quantizer, "data")
            tracker.image(viz.quantizer_picture(json.loads(quantizer.read_text())), "data/kmeans_clusters.png")
        tracker.text(dump_yaml(cfg), "config.yaml")
    if ctx.rank == 0:
        log.info("training %d steps from step %d: world %d, global batch %d, crop %s, device %s",
                 t.steps, start_step, ctx.world_size, global_batch, crop, device)

    def run_eval(step: int) -> dict:
        result = evaluate_model(model, val_urls, batch_size=t.batch_size, device=device, dtype=dtype,
                                rank=ctx.rank, world=ctx.world_size, limit=t.eval_batches,
                                keep_examples=4 if ctx.rank == 0 else 0)
        scores = result["scores"]
        tracker.metrics({"val/miou": scores["miou"], "val/pixel_acc": scores["pixel_acc"],
                         "val/mean_acc": scores["mean_acc"],
                         **{f"val_iou/{n}": v for n, v in zip(labels.CLASS_NAMES, scores["iou"])}}, step)
        if ctx.rank == 0:
            tag = f"step_{step:07d}"
            ex = result["examples"]
            if ex:
                tracker.image(viz.prediction_grid(ex["images"], ex["labels"], ex["preds"]),
                              f"eval/predictions_{tag}.png")
            tracker.image(viz.confusion_heatmap(result["confusion"], labels.CLASS_NAMES),
                          f"eval/confusion_{tag}.png")
            log.info("step %d: val mIoU %.4f, pixel acc %.4f", step, scores["miou"], scores["pixel_acc"])
        model.train()
        return scores

    model.train()
    t0 = time.perf_counter()
    # Loss and the first non-finite step stay on the device and are read only at check steps (log,
    # eval, checkpoint, last): no host synchronisation in the steps between (docs/input_pipeline.md).
    zero = torch.zeros((), device=device)
    window_t, window_images, loss_sum, loss_n = time.perf_counter(), 0, zero, 0
    first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=device)
    last_scores: dict = {}
    status = "finished"
    step = saved = start_step
    if start_step >= t.steps and ctx.rank == 0:
        log.info("run already complete at step %d: nothing to train", start_step)
    for step in range(start_step + 1, t.steps + 1):
        for micro in range(t.accumulation):
            images, target = to_device(next(batches), aug, device, t.channels_last)
            sync = contextlib.nullcontext() if micro == t.accumulation - 1 or ctx.world_size == 1 else net.no_sync()
            with sync, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = step_fn(images)
                loss = loss_fn(logits.float(), target) / t.accumulation
            loss.backward()
            step_loss = loss.detach() if micro == 0 else step_loss + loss.detach()
        loss_sum = loss_sum + step_loss
        loss_n += 1
        first_bad = torch.where(torch.isfinite(step_loss), first_bad, first_bad.clamp(max=step))  # scalar: no copy
        last = step == t.steps
        check = step % t.log_every == 0 or step % t.checkpoint_every == 0 or last or bool(
            t.eval_every and step % t.eval_every == 0)
        if check:  # before this step's update: a non-finite loss never reaches a checkpoint
            bad = _first_bad_step(first_bad, ctx)
            if bad is not None:
                status = "non_finite_loss"
                if ctx.rank == 0:
                    log.error("non-finite loss at step %d: stopping; the last good checkpoint is kept"
                              "%s", bad, f" (found at step {step})" if bad != step else "")
                step = bad
                break
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_images += global_batch

        if step % t.log_every == 0 or last:
            mean_loss = loss_sum.item() / max(loss_n, 1)  # the window's one host read of the loss
            elapsed = time.perf_counter() - window_t
            lr = scheduler.get_last_lr()[0]
            rate = window_images / max(elapsed, 1e-9)
            tracker.metrics({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": rate}, step)
            if ctx.rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.1f img/s", step, t.steps, mean_loss, lr, rate)
            window_t, window_images, loss_sum, loss_n = time.perf_counter(), 0, zero, 0

        if (t.eval_every and step % t.eval_every == 0) or step % t.checkpoint_every == 0 or last:
            average_buffers(model, ctx.world_size)
        if (t.eval_every and step % t.eval_every == 0) or last:
            last_scores = run_eval(step)
            best = last_scores["miou"] if math.isnan(best) else max(best, last_scores["miou"])
        if step % t.checkpoint_every == 0 or last:
            if not _finite_state(model):  # a finite loss can sit on overflowed BatchNorm statistics
                status = "non_finite_weights"
                if ctx.rank == 0:
                    log.error("non-finite weights at step %d: stopping; the last good checkpoint is kept", step)
                break
            metrics = {"step": step, "best_miou": best, "status": "running" if not last else status}
            if last_scores:
                metrics["val_miou"] = last_scores["miou"]
            _save(step, cfg, ctx, model, optimizer, scheduler, metrics, best)
            saved = step
        if not last and preemption.agreed(ctx.world_size, preempt_group):
            finite = torch.tensor([float(_finite_state(model))])  # buffers differ by rank here: agree
            if ctx.world_size > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=preempt_group)
            if _first_bad_step(first_bad, ctx) is not None or finite.item() < 1:
                status = "non_finite_loss"  # never checkpoint a step that was not finite
                break
            status = preemption.STATUS
            if ctx.rank == 0:
                log.info("preempted (%s): checkpoint at step %d, then stop", preemption.reason(), step)
            if saved != step:  # no averaging here: the run must go on as if never stopped
                _save(step, cfg, ctx, model, optimizer, scheduler,
                      {"step": step, "best_miou": best, "status": status}, best)
            if ctx.rank == 0:
                log.info("preemption checkpoint at step %d published %.2f s after the request",
                         step, preemption.seconds_since_request())
            break

    wall = time.perf_counter() - t0
    # Every rank states what it ends with: DDP keeps replicas identical, and this line shows it.
    log.info("rank %d final weights sha256 %s", ctx.rank, weights_digest(model))
    summary = {"status": status, "steps": step if status in ("finished", preemption.STATUS) else step - 1,
               "wall_s": round(wall, 1), "best_miou": best,
               "val_miou": last_scores.get("miou", float("nan")), "world_size": ctx.world_size,
               "resumed_from": ctx.resumed_from, "mlflow_run_id": ctx.run_id}
    if status not in ("finished", preemption.STATUS):
        ctx.report({"step": step - 1, "status": status, "best_miou": best}, None)
    if ctx.rank == 0:
        if status == "finished" and cfg.mlflow.log_model and ctx.run_id and step > start_step:
            summary["model_uri"] = tracker.model(model, cfg, crop_for_example(cfg, crop))
        if status == preemption.STATUS:  # resumable: not FAILED
            tracker.tags({"unet_dist.status": status, "unet_dist.preempted_at_step": step})
        tracker.close({"finished": "FINISHED", preemption.STATUS: "KILLED"}.get(status, "FAILED"))
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

