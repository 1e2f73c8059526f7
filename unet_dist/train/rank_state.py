"""What differs between ranks and an exact resume needs: the RNG states and the BatchNorm buffers.

Each rank draws its own random numbers and updates BatchNorm running statistics from its own
batches between the steps that average them, so a checkpoint keeps every rank's (gathered on rank
0) and a resume with the same world size gives each rank its own back. Training only: loading a
model for inference needs none of this (that is :mod:`unet_dist.checkpoint`).
"""
from __future__ import annotations

import numpy as np
import torch


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_state(model: torch.nn.Module) -> dict:
    """This rank's RNG states and buffers (BatchNorm running statistics)."""
    return {"rng": rng_state(),
            "buffers": {name: b.detach().cpu().clone() for name, b in model.named_buffers()}}


def gather_rank_states(model: torch.nn.Module, world_size: int) -> list[dict] | None:
    """Every rank's :func:`rank_state`, on rank 0 (None elsewhere). A collective: all ranks call it."""
    mine = rank_state(model)
    if world_size == 1:
        return [mine]
    import torch.distributed as dist

    states: list = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(mine, states, dst=0)
    return states


def restore_rank_state(model: torch.nn.Module, state: dict, rank: int, world_size: int) -> int | None:
    """Restore this rank's RNG and buffers; returns the world size that wrote the checkpoint (None:
    not recorded). From another world size (an elastic group that shrank or grew) every rank takes
    the mean of the saved ranks' buffers, what the next evaluation would have averaged, and rank 0's
    RNG; the batches are the same (the stream is dealt by step, not by rank), the BatchNorm running
    statistics are not bit for bit."""
    ranks = state.get("ranks")
    if ranks and len(ranks) == world_size:
        mine = ranks[rank]
        set_rng_state(mine["rng"])
        _copy_buffers(model, mine["buffers"])
        return world_size
    set_rng_state(state["rng"])
    if ranks:
        _copy_buffers(model, _mean_buffers([r["buffers"] for r in ranks]))
    return len(ranks) if ranks else None


def _mean_buffers(per_rank: list[dict]) -> dict:
    """Floating-point buffers averaged over the ranks; counters (num_batches_tracked) from rank 0."""
    return {name: torch.stack([b[name] for b in per_rank]).mean(0) if b0.is_floating_point() else b0
            for name, b0 in per_rank[0].items()}


def _copy_buffers(model: torch.nn.Module, buffers: dict) -> None:
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name].to(buf.device))
