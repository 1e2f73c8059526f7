"""The one training loop. Ray Train and torchrun both call :func:`train` in every rank; what differs
between them (how a checkpoint is published, where the latest one is found) comes in a
:class:`~unet_dist.train.context.Context`, so the loop itself never asks which launcher started it.

What a run needs is built once (:mod:`~unet_dist.train.parts`), what changes as it trains is a small
:class:`~unet_dist.train.progress.Progress`, and :class:`~unet_dist.train.schedule.Schedule` decides
what follows each step. :func:`save` is the one place a checkpoint is written; where the time goes
(start-up, data wait, evaluation, checkpoints, the steps) is the goodput clock's, in ``p.observer``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from unet_dist.config import Config
from unet_dist.data.augment import to_device
from unet_dist.errors import UnetDistError
from unet_dist.scoring import evaluate_model
from unet_dist import checkpoint
from unet_dist.train import agree, parts, preemption, rank_state
from unet_dist.train import plan as job_plan
from unet_dist.train.context import Context
from unet_dist.train.observer import Observer
from unet_dist.train.parts import Parts, Trainable
from unet_dist.train.progress import NO_STEP, Progress, Window
from unet_dist.train.schedule import Due, Schedule
from unet_dist.train.summary import RunSummary, measured

log = logging.getLogger("unet_dist.train")


def train(cfg: Config, ctx: Context) -> RunSummary:
    """Train ``cfg.train.steps`` optimiser steps in this rank; returns the run summary."""
    plan = ctx.plan or job_plan.from_shards(cfg, run_id=ctx.run_id)
    observer = Observer(cfg, ctx, plan.run_dir)  # the goodput clock runs from ctx.started_at
    core = parts.trainable(cfg, ctx, plan)  # device, seeds, verified shards, model, optimiser, lr schedule
    progress = restore(core, ctx, observer)  # the newest checkpoint, if any; a refused one stops all ranks
    p = parts.build(cfg, ctx, plan, core, progress.step, observer,  # DDP, loss, stream from there, tracking
                    run_global_batch=progress.global_batch)
    run_steps(p, progress, Schedule.of(cfg.train))  # steps; evaluate and checkpoint when due
    return finish(p, progress)  # summary; rank 0 logs the model and closes the MLflow run


def restore(core: Trainable, ctx: Context, observer: Observer) -> Progress:
    """Continue from the launcher's newest checkpoint, if any; a refused one stops every rank together.
    The goodput ledger the checkpoint carries goes to ``observer``."""
    progress, error = Progress(), ""
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            try:
                state = checkpoint.load_state(ckpt_dir, map_location=core.device)
                checkpoint.load_weights(core.model, state["model"], str(ckpt_dir))
            except UnetDistError as e:
                error = str(e)
            else:
                core.optimizer.load_state_dict(state["optimizer"])
                core.scheduler.load_state_dict(state["scheduler"])
                written_by = rank_state.restore_rank_state(core.model, state, ctx.rank, ctx.world_size)
                if written_by != ctx.world_size and ctx.rank == 0:
                    log.warning("%s was written by a world of %s, this one has %d: the same global batches follow, "
                                "every rank starts from the mean of the saved ranks' BatchNorm statistics",
                                ckpt_dir, written_by or "unknown size", ctx.world_size)
                progress = Progress.restored(state)
                progress.resumed_from = str(ckpt_dir)
                observer.resumed_from(checkpoint.read_meta(ckpt_dir))
    agree.all_ok(not error, error, ctx.world_size)
    if ctx.rank == 0 and progress.resumed_from:
        log.info("resumed from %s at step %d", progress.resumed_from, progress.step)
    return progress


def run_steps(p: Parts, progress: Progress, schedule: Schedule) -> None:
    """Steps after the restored one up to ``train.steps``; stops early on a non-finite loss or weights,
    or a preemption."""
    p.model.train()
    t0 = time.perf_counter()
    progress.window = Window()
    if p.start_step >= schedule.steps and p.ctx.rank == 0:
        log.info("run already complete at step %d: nothing to train", p.start_step)
    progress.first_bad = torch.full((), NO_STEP, dtype=torch.int64, device=p.device)
    p.observer.steps_begin(p.tracker, p.start_step)  # start-up ends; a resume's goodput is reported
    for step in range(p.start_step + 1, schedule.steps + 1):
        if not _step(p, progress, step, schedule.at(step)):
            break
    _flush(p)  # the last checkpoint published before the run ends (a SIGTERM now changes nothing)
    preemption.steps_done()
    p.observer.steps_end()
    progress.loop_s = time.perf_counter() - t0


def _step(p: Parts, progress: Progress, step: int, due: Due) -> bool:
    """One optimiser step and what the schedule says follows it; False: the run stops here."""
    progress.step = step
    preemption.at_step(step)
    p.checkpointer.check()  # a background write that failed stops the run, as a synchronous one would
    bad = _optimizer_step(p, progress, due)
    if bad is not None:
        progress.status, progress.step = "non_finite_loss", bad
        if p.ctx.rank == 0:
            log.error("non-finite loss at step %d: stopping; the last good checkpoint is kept%s",
                      bad, f" (found at step {step})" if bad != step else "")
        return False
    if p.cfg.train.sample_log:
        _log_samples(p, step)
    if due.log:
        _log_train(p, progress, step)
    if not _evaluate_and_checkpoint(p, progress, step, due):
        return False
    if due.preempt_check and preemption.agreed(p.ctx.world_size, p.preempt_group):
        _checkpoint_preempted(p, progress, step)
        return False
    if due.change_check and p.ctx.group_change:
        return _checkpoint_before_change(p, progress, step)
    return True


def _optimizer_step(p: Parts, progress: Progress, due: Due) -> int | None:
    """One optimiser step over this rank's share of the step's micro-batches (``p.share`` of
    ``p.per_step``), with no host synchronisation. The loss is summed and a non-finite one recorded
    on the device; where the schedule reads the device, the record is read before the update: the
    first non-finite step (the same on every rank) is returned, and this step's update is not made,
    so no later checkpoint is ever written."""
    t, w = p.cfg.train, progress.window
    step_loss = None
    for micro in range(p.share):
        with p.observer.timed("data_wait"):
            batch = next(p.batches)
        images, target = to_device(batch, p.aug, p.device, t.channels_last)
        loss = _forward_backward(p, images, target, sync=micro == p.share - 1)
        step_loss = loss if step_loss is None else step_loss + loss
    w.loss_sum, w.loss_n = w.loss_sum + step_loss / p.share, w.loss_n + 1  # this rank's mean micro-batch loss
    # clamp takes the step as a kernel argument: no host-to-device copy
    progress.first_bad = torch.where(torch.isfinite(step_loss), progress.first_bad,
                                     progress.first_bad.clamp(max=progress.step))
    if due.read_device and (bad := agree.first_bad_step(progress.first_bad, p.ctx.world_size)) is not None:
        return bad
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), t.grad_clip)
    p.optimizer.step()
    p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=True)
    w.images += p.global_batch
    return None


def _forward_backward(p: Parts, images: torch.Tensor, target: torch.Tensor, sync: bool) -> torch.Tensor:
    """One micro-batch; DDP all-reduces the gradients of the last one (``sync``) only. Its loss is
    scaled by world / micro-batches per step: DDP's mean over the ranks then makes the gradient the
    mean over the step's micro-batches, however many each rank took. Returns the unscaled loss."""
    no_sync = contextlib.nullcontext() if sync or p.ctx.world_size == 1 else p.net.no_sync()
    with no_sync, torch.autocast(p.device.type, dtype=p.dtype or torch.float32, enabled=p.dtype is not None):
        logits = p.step_fn(images)
        loss = p.loss_fn(logits, target)  # the loss works in fp32
    (loss * (p.ctx.world_size / p.per_step)).backward()
    return loss.detach()


def _log_samples(p: Parts, step: int) -> None:
    """``train.sample_log``: the keys this rank trained ``step`` on, one JSON line, in a file of this
    rank's attempt (``rank<r>-of<world>-from<step>.jsonl``): which samples made each global batch,
    whatever the world size was."""
    ctx = p.ctx
    micro = list(range((step - 1) * p.per_step + ctx.rank, step * p.per_step, ctx.world_size))
    line = {"step": step, "rank": ctx.rank, "world": ctx.world_size, "from": p.start_step, "micro_batches": micro,
            "keys": [k for g in micro for k in p.stream.keys(g)]}
    folder = Path(p.cfg.train.sample_log)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{ctx.rank}-of{ctx.world_size}-from{p.start_step}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def _log_train(p: Parts, progress: Progress, step: int) -> None:
    """Mean loss, learning rate and images/s since the last line."""
    w = progress.window
    lr = p.scheduler.get_last_lr()[0]
    rate = w.images / max(time.perf_counter() - w.started, 1e-9)
    mean_loss = float(w.loss_sum) / max(w.loss_n, 1)  # the window's one host read of the loss
    p.tracker.metrics({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": rate}, step)
    p.observer.logged(step, rate)  # the Prometheus series and the goodput beacon
    if p.ctx.rank == 0:
        log.info("step %d/%d loss %.4f lr %.2e %.1f img/s", step, p.cfg.train.steps, mean_loss, lr, rate)
    progress.window = Window()


def _evaluate_and_checkpoint(p: Parts, progress: Progress, step: int, due: Due) -> bool:
    """Evaluate and save when due; False when the weights went non-finite."""
    if due.evaluate or due.checkpoint:
        agree.average_buffers(p.model, p.ctx.world_size)
    if due.evaluate:
        _evaluate(p, progress, step)
    if not due.checkpoint or _skip_while_busy(p, step, due):
        return True
    if not agree.finite_state(p.model):  # a finite loss can sit on overflowed BatchNorm statistics
        progress.status = "non_finite_weights"
        if p.ctx.rank == 0:
            log.error("non-finite weights at step %d: stopping; the last good checkpoint is kept", step)
        return False
    metrics = {"step": step, "best_miou": progress.best_miou, "status": "running" if not due.last else progress.status}
    if progress.last_scores:
        metrics["val_miou"] = progress.last_scores["miou"]
    save(p, progress, step, metrics)
    return True


def _skip_while_busy(p: Parts, step: int, due: Due) -> bool:
    """``train.checkpoint_when_busy: skip``: a scheduled checkpoint (not the last) due while rank 0's
    last one is still being written is not taken; every rank gets rank 0's answer."""
    if p.cfg.train.checkpoint_when_busy != "skip" or due.last or not p.checkpointer.background:
        return False
    skip = agree.from_rank0(p.checkpointer.busy, p.ctx.world_size, p.preempt_group)
    if skip and p.ctx.rank == 0:
        log.info("checkpoint at step %d skipped: the last one is still being written (train.checkpoint_when_busy: skip)",
                 step)
    return skip


def _evaluate(p: Parts, progress: Progress, step: int) -> None:
    """Val scores on every rank (each scores a share); rank 0 logs them with example pictures."""
    t, ctx = p.cfg.train, p.ctx
    with p.observer.timed("evaluation"):
        result = evaluate_model(p.model, p.val_urls, batch_size=t.batch_size, device=p.device, dtype=p.dtype,
                                rank=ctx.rank, world=ctx.world_size, limit=t.eval_batches,
                                keep_examples=4 if ctx.rank == 0 else 0)
    scores = progress.last_scores = result["scores"]
    p.tracker.evaluation(result, step)
    if ctx.rank == 0:
        log.info("step %d: val mIoU %.4f, pixel acc %.4f", step, scores["miou"], scores["pixel_acc"])
    p.model.train()
    best = progress.best_miou
    progress.best_miou = scores["miou"] if math.isnan(best) else max(best, scores["miou"])


def _checkpoint_now(p: Parts, progress: Progress, step: int, status: str) -> bool:
    """A checkpoint of ``step`` off the schedule (every rank calls it), unless this step was just
    saved. Buffers are not averaged, so a run resumed from it goes on exactly as one that never
    stopped; each rank's own are saved (rank_state.rank_state). False, with the run's status set,
    when the loss or the weights are not finite: such a step is never checkpointed."""
    finite = agree.finite_everywhere(p.model, p.ctx.world_size, p.preempt_group)  # buffers differ by rank here
    bad = agree.first_bad_step(progress.first_bad, p.ctx.world_size)
    if bad is not None or not finite:
        progress.status, progress.step = ("non_finite_loss", bad) if bad is not None else ("non_finite_weights", step)
        return False
    if progress.saved != step:
        save(p, progress, step, {"step": step, "best_miou": progress.best_miou, "status": status})
    return True


def _checkpoint_preempted(p: Parts, progress: Progress, step: int) -> None:
    """Every rank agreed to stop after ``step`` (a SIGTERM somewhere): checkpoint it and stop with
    status ``preempted``."""
    if p.ctx.rank == 0:
        log.info("preempted (%s): checkpoint at step %d, then stop", preemption.reason(), step)
    if _checkpoint_now(p, progress, step, preemption.STATUS):
        _flush(p)
        progress.status = preemption.STATUS
        if p.ctx.rank == 0:
            log.info("preemption checkpoint at step %d published %.2f s after the request",
                     step, preemption.seconds_since_request())


def _checkpoint_before_change(p: Parts, progress: Progress, step: int) -> bool:
    """Ray says the worker group is about to change: a node of this job is being drained (a spot
    reclaim notice), or an elastic group has room to grow. Checkpoint now and go on training; again
    while the notice lasts, at most every ``train.elastic_check_s``. When the node goes (or Ray
    grows the group, up to ~20 s + elastic_check_s after the room appears), Ray Train restarts the
    workers from the newest checkpoint, so the restart recomputes at most that much; if nothing
    changes, nothing is lost. (A drain counts against FailureConfig.max_preemption_failures, not
    max_failures.) False when the step could not be checkpointed (not finite: training stops)."""
    why = p.ctx.group_change()  # every rank: Ray's drain query is a barrier
    if p.ctx.rank == 0 and time.monotonic() - progress.change_saved_at < p.cfg.train.elastic_check_s:
        why = None  # saved for this notice a moment ago
    why = agree.from_rank0(why, p.ctx.world_size, p.preempt_group)
    if why is None:
        return True
    progress.change_saved_at = time.monotonic()
    if p.ctx.rank == 0:
        log.warning("%s: checkpoint at step %d, training goes on", why, step)
    saved = _checkpoint_now(p, progress, step, "running")
    if saved:
        _flush(p)  # the group may change any moment: this checkpoint in storage before the next step
    return saved


def save(p: Parts, progress: Progress, step: int, metrics: dict) -> None:
    """The one checkpoint save. Every rank calls it (gathering the ranks' own state is a collective);
    rank 0 takes the snapshot, in host memory, and ``p.checkpointer`` has the launcher publish it:
    in the background with ``train.checkpoint_async`` (train/checkpointer.py), else before this
    returns. A write still in flight is waited for first: at most one at a time. The checkpoint
    clock counts only the time the loop is held here."""
    ctx = p.ctx
    with p.observer.timed("checkpoint"):
        t0 = time.perf_counter()
        p.checkpointer.wait()  # the rule: a checkpoint due while the last one is in flight waits for it
        waited = time.perf_counter() - t0
        ranks = rank_state.gather_rank_states(p.model, ctx.world_size)
        snapshot = None
        if ctx.rank == 0:
            state = {"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
                     "scheduler": p.scheduler.state_dict(), **progress.saved_state(),
                     "rng": rank_state.rng_state(),
                     "ranks": ranks}  # each rank's RNG and BatchNorm statistics: an exact resume
            meta = checkpoint.meta(p.cfg, step=step, best_miou=progress.best_miou, run_id=p.plan.run_id,
                                   world_size=ctx.world_size, launcher=ctx.launcher,
                                   manifest_sha256=p.plan.manifest_sha256)
            state["global_batch"] = p.global_batch
            meta.update(status=metrics.get("status"), global_batch=p.global_batch, data_position=step * p.per_step,
                        goodput=p.observer.ledger(step))  # the ledger a resumed attempt carries on
            snapshot = p.checkpointer.snapshot(step, state, meta)  # in host memory when in the background
        where = p.checkpointer.save(metrics, snapshot)
        if ctx.rank == 0:
            progress.last_checkpoint = where
            log.info("checkpoint at step %d: the loop was held %.3f s (%.3f s of it waiting for the last one)%s",
                     step, time.perf_counter() - t0, waited, ", writing in the background"
                     if p.checkpointer.background else ", written")
    progress.saved = step


def _flush(p: Parts) -> None:
    """Every rank: the write in flight published (rank 0) and waited for (all), as checkpoint time."""
    with p.observer.timed("checkpoint"):
        p.checkpointer.flush()


def finish(p: Parts, progress: Progress) -> RunSummary:
    """The run summary; rank 0 logs the model (a finished run that trained) and closes the MLflow run."""
    ctx, step, status = p.ctx, progress.step, progress.status
    # Every rank states what it ends with: DDP keeps replicas identical, and this line shows it.
    log.info("rank %d final weights sha256 %s", ctx.rank, agree.weights_digest(p.model))
    stopped_cleanly = status in ("finished", preemption.STATUS)
    if not stopped_cleanly:
        ctx.report({"step": step - 1, "status": status, "best_miou": progress.best_miou}, None)
    steps = step if stopped_cleanly else step - 1
    model_uri, goodput = _close_run(p, progress, steps) if ctx.rank == 0 else (None, None)
    return RunSummary(
        status=status, steps=steps, best_miou=measured(progress.best_miou),
        val_miou=measured(progress.last_scores.get("miou")), loop_s=round(progress.loop_s, 1),
        world_size=ctx.world_size, resumed_from=progress.resumed_from, mlflow_run_id=p.plan.run_id,
        model_uri=model_uri, checkpoint=progress.last_checkpoint or progress.resumed_from, rank=ctx.rank,
        goodput=goodput)


def _close_run(p: Parts, progress: Progress, steps: int) -> tuple[str | None, dict]:
    """Rank 0: the model logged (a finished run that trained), the goodput report, the MLflow run
    closed; the model's URI and the report."""
    cfg, status = p.cfg, progress.status
    if status == "finished" and cfg.mlflow.log_model and p.plan.run_id and progress.step > p.start_step:
        p.tracker.model(p.model, cfg, parts.example_hw(cfg, p.crop), checkpoint=progress.last_checkpoint)
    if status == preemption.STATUS:  # resumable: not FAILED
        p.tracker.tags({"unet_dist.status": status, "unet_dist.preempted_at_step": progress.step})
    goodput = p.observer.end(p.tracker, steps, status)
    closed = p.tracker.close({"finished": "FINISHED", preemption.STATUS: "KILLED"}.get(status, "FAILED"))
    return (closed.model_uri if closed else None), goodput
