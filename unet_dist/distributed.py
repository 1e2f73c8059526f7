"""Small helpers for process groups, shared by the training launchers and the ``evaluate`` CLI."""
from __future__ import annotations

import os
from datetime import timedelta

TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")


def under_torchrun() -> bool:
    """True in a process that torchrun started (it sets all of ``TORCHRUN_VARS``)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_torchrun_group(backend: str) -> tuple[int, int]:
    """``init_process_group`` for a torchrun rank; returns (rank, world size).

    The store is prefixed with torchrun's restart count: the agent's TCPStore outlives a restart
    (torchrun shares its rendezvous store), so without the prefix a restarted group can read the
    gloo addresses of the ranks that died and fail to connect.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=30)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=True)
    prefix = f"unet_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world,
                            timeout=timeout)
    return rank, world
