"""Small helpers for process groups, shared by the training launchers and the ``evaluate`` CLI.

Which network interface the collectives use: gloo (and NCCL's bootstrap) otherwise take the address
the host name resolves to. On a machine with several NICs, or in a container, that is often another
network or a loopback address (Debian's ``127.0.1.1 <hostname>``), and ranks on other nodes time out
connecting to it. So unless the user set ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, the
launchers pin both to the interface holding the address they already trust: the route to
``MASTER_ADDR`` under torchrun, the node's Ray IP under Ray Train (:func:`pin_interface`).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from datetime import timedelta

log = logging.getLogger("unet_dist.network")
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")

TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")


def under_torchrun() -> bool:
    """True in a process that torchrun started (it sets all of ``TORCHRUN_VARS``)."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_torchrun_group(backend: str) -> tuple[int, int]:
    """``init_process_group`` for a torchrun rank; returns (rank, world size).

    The store is prefixed with torchrun's restart count: the agent's TCPStore outlives a restart
    (torchrun shares its rendezvous store), so without the prefix a restarted group can read the
    gloo addresses of the ranks that died and fail to connect. Without a shared store
    (jobs/torchrun_multi.sh) each round has a fresh store and no prefix: restart counts differ
    between a surviving agent and one that rejoined after its node crashed.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=30)
    pin_for_torchrun()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=True)
    prefix = f"unet_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') if agent_store else 'fresh'}"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world,
                            timeout=timeout)
    return rank, world


def interface_with_address(ip: str) -> str | None:
    """The interface that holds ``ip``, or None."""
    import psutil

    want = ipaddress.ip_address(ip)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == want:
                        return name
                except ValueError:
                    continue
    return None


def source_address_towards(host: str) -> str:
    """The local address the kernel's routing table picks to reach ``host`` (no packet is sent)."""
    family, _, _, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr[:2])
        return s.getsockname()[0]


def pin_interface(address: str, *, towards: bool, why: str) -> str | None:
    """Set GLOO/NCCL_SOCKET_IFNAME to the interface of ``address`` (towards=False: an address of this
    host; towards=True: the interface routing to that host). Leaves variables the user set alone and
    returns the interface in use, or None when none could be found (gloo then keeps its default)."""
    if any(os.environ.get(v) for v in IFNAME_VARS):
        chosen = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")
        log.info("network interface %s for collectives (set by the user)", chosen)
        return chosen
    try:
        local = source_address_towards(address) if towards else address
        name = interface_with_address(local)
    except (OSError, ValueError) as e:
        log.warning("could not find the interface for %s (%s): gloo/nccl pick their own", address, e)
        return None
    if name is None:
        log.warning("no interface holds %s: gloo/nccl pick their own", address)
        return None
    for v in IFNAME_VARS:
        os.environ[v] = name
    log.info("network interface %s (%s, %s) for collectives", name, local, why)
    return name


def pin_for_torchrun() -> str | None:
    """Under torchrun: the interface routing to ``MASTER_ADDR`` (the rendezvous host)."""
    master = os.environ["MASTER_ADDR"]
    return pin_interface(master, towards=True, why=f"route to MASTER_ADDR {master}")


if __name__ == "__main__":  # jobs/torchrun_multi.sh: this node's address on the way to MASTER_ADDR
    print(source_address_towards(sys.argv[1]))
