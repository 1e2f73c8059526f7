"""A cluster of Linux namespaces for multi-node tests: each "node" is a network namespace with its
own address, plus a mount and UTS namespace with its own /tmp, /dev/shm, scratch, host name and
/etc/hosts, all wired to one bridge that lives in a namespace of its own.

Why namespaces: two Ray nodes or torchrun agents on one host share an IP, a /tmp and a disk, so a
bug that shows only across machines (a path one node cannot see, a host name that resolves to the
wrong address) never shows. Here the nodes share nothing but the bridge and what a test mounts on
purpose (``shared=``: one host folder bound at /mnt/shared in every node, the NFS case).

Addresses come from 198.18.0.0/15 (the benchmarking range) and exist only inside the namespaces
made here; no namespace has a default route, so nothing leaves the bridge. :meth:`Cluster.close`
kills every process in the namespaces and deletes them, and the fixtures call it even after a failure.

Usage (as root)::

    with Cluster(tmp_path, ["node0", "node1"], services=True, shared=tmp_path / "nfs") as c:
        c.run("node0", ["hostname"])              # -> node0
        p = c.popen("node1", ["ray", "start", ...], log=tmp_path / "ray1.log")
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.18.0"  # a /24 of 198.18.0.0/15; the bridge namespace's own address is .1
SERVICES = "services"
BIN = Path(sys.executable).parent


def unavailable() -> str | None:
    """Why this machine cannot build a namespace cluster, or None when it can."""
    if os.geteuid() != 0:
        return "namespace cluster needs root (ip netns, veth, mount namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"namespace cluster needs `{tool}` (apt-get install iproute2 util-linux)"
    probe = f"udprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Node:
    name: str  # host name inside the node, and its key in the cluster
    ip: str
    netns: str
    root: Path  # on the host: this node's private files (tmp/, shm is tmpfs, scratch/)
    pid: int = 0  # the node's init process: commands join its namespaces with nsenter
    init: subprocess.Popen | None = field(default=None, repr=False)


class Cluster:
    """Nodes (and optionally a ``services`` node) on one bridge; see the module docstring.

    ``hostnames`` gives nodes a host name other than their key, and ``hosts`` replaces the line of a
    node's own /etc/hosts that names itself: ``hostnames={"twin0": "twin"}, hosts={"twin0": "127.0.1.1
    twin"}`` is a machine whose name resolves to a loopback address (Debian's default), not to the
    address it trains on. Other nodes still reach it by its key.
    """

    def __init__(self, root: Path, names: list[str], *, services: bool = False, shared: Path | None = None,
                 hosts: dict[str, str] | None = None, hostnames: dict[str, str] | None = None):
        self.root = Path(root)
        self.tag = uuid.uuid4().hex[:6]  # interface and namespace names must not clash across runs
        self.shared = Path(shared) if shared else None
        self.hosts_override = hosts or {}
        self.hostnames = hostnames or {}
        all_names = ([SERVICES] if services else []) + list(names)
        self.nodes: dict[str, Node] = {}
        for i, name in enumerate(all_names):
            ip = f"{SUBNET}.{2 if name == SERVICES else 10 + len([n for n in self.nodes if n != SERVICES])}"
            self.nodes[name] = Node(name, ip, f"ud{self.tag}-{i}", self.root / name)
        self.bridge_ns = f"ud{self.tag}-br"
        self._popens: list[subprocess.Popen] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------- build
    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = ["ip", *(["-n", ns] if ns else []), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")

    def _build(self) -> None:
        self._ip("netns", "add", self.bridge_ns)
        self._ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        self._ip("addr", "add", f"{SUBNET}.1/24", "dev", "br0", ns=self.bridge_ns)
        self._ip("link", "set", "br0", "up", ns=self.bridge_ns)
        self._ip("link", "set", "lo", "up", ns=self.bridge_ns)
        for i, node in enumerate(self.nodes.values()):
            self._ip("netns", "add", node.netns)
            # Both ends are born inside namespaces we own: nothing is ever added to the host's links.
            self._ip("link", "add", "eth0", "type", "veth", "peer", "name", f"v{i}", "netns", self.bridge_ns,
                     ns=node.netns)
            self._ip("link", "set", f"v{i}", "master", "br0", "up", ns=self.bridge_ns)
            self._ip("addr", "add", f"{node.ip}/24", "dev", "eth0", ns=node.netns)
            self._ip("link", "set", "eth0", "up", ns=node.netns)
            self._ip("link", "set", "lo", "up", ns=node.netns)
            for d in ("tmp", "scratch/home"):
                (node.root / d).mkdir(parents=True, exist_ok=True)
            hostname = self.hostnames.get(node.name, node.name)
            lines = ["127.0.0.1 localhost"] + [
                self.hosts_override.get(n.name, f"{n.ip} {n.name} {self.hostnames.get(n.name, '')}".strip())
                if n is node else f"{n.ip} {n.name}" for n in self.nodes.values()]
            (node.root / "hosts").write_text("\n".join(lines) + "\n")
            self._start_init(node, hostname)

    def _start_init(self, node: Node, hostname: str) -> None:
        """A long-lived process holding the node's mount and UTS namespaces (entered with nsenter)."""
        mounts = [
            "mount -t tmpfs -o size=1g tmpfs /dev/shm",  # Ray's object store lives here
            "mkdir -p /scratch /mnt/shared",
            f"mount --bind {shlex.quote(str(node.root / 'scratch'))} /scratch",
            f"mount --bind {shlex.quote(str(node.root / 'hosts'))} /etc/hosts",
        ]
        if self.shared is not None:
            self.shared.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {shlex.quote(str(self.shared))} /mnt/shared")
        mounts.append(f"mount --bind {shlex.quote(str(node.root / 'tmp'))} /tmp")  # last: sources may be in /tmp
        script = " && ".join([*mounts, f"hostname {shlex.quote(hostname)}", "echo $$", "exec sleep infinity"])
        # /scratch and /mnt/shared are created on the host's / if missing (empty mount points only).
        node.init = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = node.init.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"node {node.name} did not start: {node.init.stderr.read()}")
        node.pid = int(line)

    # ------------------------------------------------------------------------------------- use
    def ip(self, name: str) -> str:
        return self.nodes[name].ip

    def env(self, name: str, **extra: str) -> dict[str, str]:
        """A clean environment for a command on a node: this venv first on PATH, the node's own HOME."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "RAY_", "AWS_", "GLOO_", "NCCL_", "MASTER_", "TMP", "TEMP"))}
        env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME="/scratch/home", TMPDIR="/tmp",
                   RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        env.update(extra)
        return env

    def command(self, name: str, cmd: list[str], cwd: str | Path | None = None) -> list[str]:
        node = self.nodes[name]
        return ["nsenter", "-t", str(node.pid), "-n", "-m", "-u", f"--wd={cwd or '/'}", "--", *map(str, cmd)]

    def run(self, name: str, cmd: list[str], *, env: dict | None = None, cwd: str | Path | None = None,
            timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(name, cmd, cwd), env=env or self.env(name), capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{name}] {' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                 f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
        return proc

    def popen(self, name: str, cmd: list[str], *, log: Path, env: dict | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        """Start a long-running command on a node, stdout+stderr to ``log`` (a host path)."""
        out = open(log, "ab")
        proc = subprocess.Popen(self.command(name, cmd, cwd), env=env or self.env(name), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self._popens.append(proc)
        return proc

    def pids(self, name: str) -> list[int]:
        """Every process inside a node's network namespace (its init included)."""
        out = subprocess.run(["ip", "netns", "pids", self.nodes[name].netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def find(self, name: str, needle: str) -> list[int]:
        """Processes on a node whose command line contains ``needle``."""
        found = []
        for pid in self.pids(name):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline and pid != self.nodes[name].pid:
                found.append(pid)
        return found

    def kill_node(self, name: str, sig: int = signal.SIGKILL, keep_init: bool = True) -> None:
        """Kill every process on a node (a power cut), leaving its namespaces for a restart."""
        for pid in self.pids(name):
            if keep_init and pid == self.nodes[name].pid:
                continue
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait_port(self, name: str, port: int, host: str | None = None, timeout: float = 120) -> None:
        """Wait until a TCP port answers, connecting from inside ``name``."""
        code = (f"import socket,time,sys\nend=time.time()+{timeout}\n"
                f"while True:\n try:\n  socket.create_connection(({(host or self.ip(name))!r},{port}),1).close();break\n"
                f" except OSError:\n  time.sleep(0.3)\n  if time.time()>end: sys.exit(1)\n")
        self.run(name, [sys.executable, "-c", code], timeout=timeout + 10)

    # ------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        """Kill everything in the namespaces, then delete them (links and bridge go with them)."""
        for proc in self._popens:
            with _quiet():
                os.killpg(proc.pid, signal.SIGKILL)
        for node in self.nodes.values():
            for _ in range(3):
                pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    with _quiet():
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.2)
            if node.init is not None:
                with _quiet():
                    node.init.kill()
                    node.init.wait(timeout=10)
        for proc in self._popens:
            with _quiet():
                proc.wait(timeout=10)
        for ns in [n.netns for n in self.nodes.values()] + [self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, subprocess.TimeoutExpired))


# ------------------------------------------------------------------------------------- fixtures' parts
def require_namespaces() -> None:
    """Skip (saying why) where namespaces cannot be made; under CI=true that is a failure instead."""
    import pytest

    why = unavailable()
    if why is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


MLFLOW_PORT = 5000


def start_mlflow(cluster: Cluster) -> str:
    """A real MLflow server in the services node (sqlite + artifacts on its own disk, artifacts
    proxied so nodes need no shared folder for them). Returns the URI the nodes use."""
    log = cluster.root / "mlflow.log"
    env = cluster.env(SERVICES, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    host = cluster.ip(SERVICES)
    cluster.popen(SERVICES, [BIN / "mlflow", "server", "--host", host, "--port", str(MLFLOW_PORT), "--workers", "1",
                             "--backend-store-uri", "sqlite:////scratch/mlflow.db",
                             "--artifacts-destination", "/scratch/artifacts",
                             "--allowed-hosts", f"{SERVICES},{SERVICES}:{MLFLOW_PORT},{host},{host}:{MLFLOW_PORT}"],
                  log=log, env=env, cwd="/scratch")
    try:
        cluster.wait_port(SERVICES, MLFLOW_PORT, timeout=120)
    except AssertionError:
        raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}") from None
    return f"http://{SERVICES}:{MLFLOW_PORT}"


def mlflow_store(cluster: Cluster) -> str:
    """The services node's MLflow database, as the host reads it back (the server keeps running)."""
    return f"sqlite:///{cluster.nodes[SERVICES].root / 'scratch' / 'mlflow.db'}"


S3_PORT = 5001


def start_s3(cluster: Cluster) -> str:
    """moto's standalone S3 server in the services node (state in memory). Returns the endpoint the
    nodes use; give them ``AWS_ENDPOINT_URL`` = it plus dummy credentials (:func:`s3_env`)."""
    log = cluster.root / "s3.log"
    cluster.popen(SERVICES, [BIN / "moto_server", "-H", cluster.ip(SERVICES), "-p", str(S3_PORT)], log=log,
                  cwd="/scratch")
    try:
        cluster.wait_port(SERVICES, S3_PORT, timeout=60)
    except AssertionError:
        raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-3000:]}") from None
    return f"http://{SERVICES}:{S3_PORT}"


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for a node that keeps shards and checkpoints in the services node's S3."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1"}
