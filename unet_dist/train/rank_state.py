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


def restore_rank_state(model: torch.nn.Module, state: dict, rank: int, world_size: int) -> bool:
    """Restore this rank's RNG and buffers; False when the checkpoint was made by another world size
    (then rank 0's RNG state is used and the resume is not exact)."""
    ranks = state.get("ranks")
    if not ranks or len(ranks) != world_size:
        set_rng_state(state["rng"])
        return False
    mine = ranks[rank]
    set_rng_state(mine["rng"])
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in mine["buffers"]:
                buf.copy_(mine["buffers"][name].to(buf.device))
    return True
