"""What every rank settles together, so no rank is left waiting and all end the same way: one error
raised by all, rank 0's answer, BatchNorm statistics averaged, the first non-finite step, finite weights, and the final
weights digest each rank states.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from unet_dist.errors import UnetDistError
from unet_dist.train.progress import NO_STEP


class AllRanksError(UnetDistError):
    """Raised by every rank together after a check they agreed on: a retry would end the same way."""


def all_ok(ok: bool, message: str, world_size: int) -> None:
    """Raise the same error on every rank when any rank failed a check (no rank left waiting)."""
    if world_size > 1:
        messages = [None] * world_size
        dist.all_gather_object(messages, "" if ok else message)
        message = next((m for m in messages if m), "")
        ok = not message
    if not ok:
        raise AllRanksError(message)


def from_rank0(value, world_size: int, group=None):
    """Rank 0's ``value`` on every rank (a collective)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def average_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Average BatchNorm running statistics across ranks (each rank saw different batches), so
    evaluation, checkpoints and the final weights are the same on every rank."""
    if world_size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world_size)


def finite_state(model: torch.nn.Module) -> bool:
    """Weights and buffers all finite (this rank's answer)."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def finite_everywhere(model: torch.nn.Module, world_size: int, group=None) -> bool:
    """:func:`finite_state` on every rank (buffers differ by rank between averaging steps)."""
    finite = torch.tensor([float(finite_state(model))])
    if world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
    return finite.item() >= 1


def first_bad_step(first_bad: torch.Tensor, world_size: int) -> int | None:
    """The first step with a non-finite loss on any rank so far, or None: one host read (and one
    all-reduce), made at the steps the schedule reads the device."""
    if world_size > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    bad = int(first_bad.item())
    return None if bad == NO_STEP else bad


def weights_digest(model: torch.nn.Module) -> str:
    """A short sha256 of the state dict: every rank logs it at the end (DDP keeps replicas identical)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
