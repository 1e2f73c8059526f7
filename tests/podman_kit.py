"""Run a container of the rendered Kubernetes kit with podman, as its pod runs it.

`PodmanCluster.run_args` turns one (pod spec, container) of `kubectl kustomize` output into a
`podman run` command line with the pod's own constraints: the UID/GID and fsGroup of its
securityContext, a read-only root, every capability dropped, no-new-privileges, tmpfs wherever it
mounts an emptyDir, the volume claims as bind mounts, its environment resolved from the rendered
ConfigMaps and the test's Secrets, command and args (with Kubernetes' `$(VAR)` expansion), memory
and CPU limits. Anything the manifests do not say (a volume type, a Secret) is an error here rather
than a guess, so the tests follow the manifests when they change.

The containers share a podman network of their own: an internal bridge on a /24 of 198.19.0.0/16
(the benchmarking range; tests/cluster uses 198.18), with no route out. The host is its .1: the
test's own servers (PostgreSQL, the S3 server) listen there, and Service names resolve to the
address of the container (or host) behind them through /etc/hosts entries, so the URLs in the
manifests work unchanged.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PODMAN = shutil.which("podman")
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity ("2Gi", "512Mi", "1000") in bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]i?|k)?", str(value))
    assert m, f"unsupported memory quantity {value!r}"
    return int(m.group(1)) * UNITS.get(m.group(2) or "", 1)


def quantity_cpus(value: str) -> float:
    """A Kubernetes CPU quantity ("2", "500m") in CPUs."""
    value = str(value)
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of command, args and env values (`$$(VAR)` stays literal)."""
    return re.sub(r"\$\$\(|\$\((\w+)\)",
                  lambda m: "$(" if m.group(1) is None else env.get(m.group(1), m.group(0)), text)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def service_names(service: str, namespace: str) -> list[str]:
    """The names a Service answers to inside the cluster."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


@dataclass
class PodmanCluster:
    """A podman network standing in for the cluster, and what its pods' references resolve to."""

    image: str
    subnet: str  # "198.19.N": the /24 of this cluster
    config_maps: dict[str, dict[str, str]]
    secrets: dict[str, dict[str, str]]
    claims: dict[str, Path]  # PersistentVolumeClaim name -> host folder
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address, in every container's /etc/hosts
    network: str = ""
    bridge: str = ""
    started: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def address(self, n: int) -> str:
        return f"{self.subnet}.{n}"

    # --- lifecycle -------------------------------------------------------------------------

    def create(self) -> None:
        """An internal bridge (no NAT, no route out) with the host at .1 so host and pods talk."""
        self.network = f"unet-image-{os.getpid()}"
        podman("network", "create", "--internal", "--disable-dns", "--subnet", f"{self.subnet}.0/24",
               "--gateway", self.gateway, self.network)
        self.bridge = json.loads(podman("network", "inspect", self.network).stdout)[0]["network_interface"]
        # The bridge exists before the first container so the host's servers can listen on .1 now;
        # an internal network gives the host no address on it, so it is added here.
        for ip_args in (["link", "add", self.bridge, "type", "bridge"],
                        ["addr", "add", f"{self.gateway}/24", "dev", self.bridge], ["link", "set", self.bridge, "up"]):
            subprocess.run(["ip", *ip_args], check=True)

    def destroy(self) -> None:
        for name in reversed(self.started):
            podman("rm", "--force", "--time", "5", name, check=False, timeout=60)
        if self.network:
            podman("network", "rm", "--force", self.network, check=False)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    # --- one container -------------------------------------------------------------------------

    def env(self, container: dict, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The container's environment: envFrom, then env (later wins), then what an operator adds."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config_maps[source["configMapRef"]["name"]])
            elif "secretRef" in source:
                env.update(self.secrets[source["secretRef"]["name"]])
            else:
                raise AssertionError(f"{container['name']}: unsupported envFrom {source}")
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
            elif "secretKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
            elif "configMapKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["configMapKeyRef"]
                env[var["name"]] = self.config_maps[ref["name"]][ref["key"]]
            else:
                raise AssertionError(f"{container['name']}: unsupported env source {var}")
        env.update(extra or {})
        return env

    def mounts(self, spec: dict, container: dict) -> list[str]:
        """emptyDir -> tmpfs (memory-backed at /dev/shm -> --shm-size), claim -> bind mount."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        args = []
        for mount in container.get("volumeMounts", []):
            volume, path = volumes[mount["name"]], mount["mountPath"]
            if "emptyDir" in volume:
                size = quantity_bytes(volume["emptyDir"].get("sizeLimit", "1Gi"))
                if path == "/dev/shm":
                    args += ["--shm-size", str(size)]
                else:  # Kubernetes makes emptyDirs world-writable, not noexec
                    args += ["--tmpfs", f"{path}:rw,exec,size={size},mode=1777"]
            elif "persistentVolumeClaim" in volume:
                host = self.claims[volume["persistentVolumeClaim"]["claimName"]]
                args += ["--volume", f"{host}:{path}:{'ro' if mount.get('readOnly') else 'rw'}"]
            else:
                raise AssertionError(f"{container['name']}: unsupported volume {volume}")
        return args

    def security(self, spec: dict, container: dict) -> list[str]:
        """The pod's and container's securityContext, as podman flags."""
        pod, own = spec.get("securityContext", {}), container.get("securityContext", {})
        uid, gid = own.get("runAsUser", pod.get("runAsUser")), own.get("runAsGroup", pod.get("runAsGroup"))
        assert uid not in (None, 0) and pod.get("runAsNonRoot", own.get("runAsNonRoot")), \
            f"{container['name']}: not run as a non-root UID"
        args = ["--user", f"{uid}:{gid if gid is not None else uid}"]
        if "fsGroup" in pod:
            args += ["--group-add", str(pod["fsGroup"])]
        if own.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if own.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        caps = own.get("capabilities", {})
        args += [f"--cap-drop={c}" for c in caps.get("drop", [])] + [f"--cap-add={c}" for c in caps.get("add", [])]
        assert not own.get("privileged"), f"{container['name']}: privileged"
        return args  # seccompProfile RuntimeDefault: podman's default profile

    def run_args(self, spec: dict, container: dict, *, name: str, ip: str, env: dict[str, str] | None = None,
                 command: list[str] | None = None, args: list[str] | None = None) -> list[str]:
        """`podman run` arguments for one container; ``command``/``args`` replace the manifest's
        (what an operator generates), ``env`` is added to it (what an operator injects)."""
        environment = self.env(container, env)
        command = container.get("command") if command is None else command
        args = container.get("args") if args is None else args
        out = ["--name", name, "--hostname", name, "--pull", "never", "--network", self.network, "--ip", ip,
               *self.security(spec, container), *self.mounts(spec, container)]
        out += [f"--add-host={host}:{address}" for host, address in self.hosts.items()]
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            out += ["--memory", str(quantity_bytes(limits["memory"]))]
        if "cpu" in limits:
            out += ["--cpus", str(min(quantity_cpus(limits["cpu"]), os.cpu_count() or 1))]
        if container.get("workingDir"):
            out += ["--workdir", container["workingDir"]]
        for key, value in environment.items():
            out += ["--env", f"{key}={value}"]
        if command:  # like Kubernetes: command replaces the image's ENTRYPOINT, args its CMD
            out += ["--entrypoint", json.dumps([expand(c, environment) for c in command])]
        out.append(self.image)
        out += [expand(a, environment) for a in (args or [])]
        return out

    def start(self, spec: dict, container: dict, **kw) -> str:
        """Start the container in the background (a Deployment's or a Ray node's pod)."""
        name = kw["name"]
        self.started.append(name)
        podman("run", "--detach", *self.run_args(spec, container, **kw))
        return name

    def run(self, spec: dict, container: dict, *, timeout: float, **kw) -> subprocess.CompletedProcess:
        """Run the container to its end (a Job's pod); the result holds its output and exit code."""
        name = kw["name"]
        self.started.append(name)
        try:
            return subprocess.run([PODMAN, "run", *self.run_args(spec, container, **kw)],
                                  capture_output=True, text=True, timeout=timeout)
        finally:
            podman("rm", "--force", "--time", "5", name, check=False)

    def wait(self, name: str, timeout: float) -> int:
        """Wait for a started container to exit; its exit code."""
        return int(podman("wait", name, timeout=timeout).stdout.strip())

    def logs(self, name: str) -> str:
        proc = podman("logs", name, check=False)
        return proc.stdout + proc.stderr

    def running(self, name: str) -> bool:
        proc = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
        return proc.stdout.strip() == "true"

    # --- probes -------------------------------------------------------------------------------

    def probe(self, name: str, ip: str, container: dict, probe: dict) -> tuple[bool, str]:
        """One try of a Kubernetes probe: exec inside the container, httpGet / tcpSocket from the
        host (the kubelet's side) to the pod's address. Returns (passed, what happened)."""
        if "exec" in probe:
            proc = podman("exec", name, *probe["exec"]["command"], check=False, timeout=30)
            return proc.returncode == 0, f"exec {probe['exec']['command']}: rc {proc.returncode} {proc.stderr[-500:]}"
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://{ip}:{port_number(container, get['port'])}{get.get('path', '/')}"
            req = urllib.request.Request(url, headers={h["name"]: h["value"] for h in get.get("httpHeaders", [])})
            try:
                with urllib.request.urlopen(req, timeout=probe.get("timeoutSeconds", 1) + 4) as r:
                    return 200 <= r.status < 400, f"GET {url}: {r.status}"
            except urllib.error.HTTPError as e:
                return 200 <= e.code < 400, f"GET {url}: {e.code}"
            except OSError as e:
                return False, f"GET {url}: {e}"
        if "tcpSocket" in probe:
            import socket

            try:
                socket.create_connection((ip, port_number(container, probe["tcpSocket"]["port"])), timeout=3).close()
                return True, "tcp ok"
            except OSError as e:
                return False, f"tcp: {e}"
        raise AssertionError(f"unsupported probe {probe}")

    def wait_until(self, name: str, ip: str, container: dict, probe: dict, timeout: float) -> float:
        """Probe until it passes (a startup/readiness wait); returns the seconds it took."""
        t0, said = time.monotonic(), ""
        while time.monotonic() - t0 < timeout:
            ok, said = self.probe(name, ip, container, probe)
            if ok:
                return time.monotonic() - t0
            if not self.running(name):
                break
            time.sleep(1)
        raise AssertionError(f"{name}: probe never passed ({said}); running={self.running(name)}\n"
                             f"{self.logs(name)[-6000:]}")


def port_number(container: dict, port) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    return next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)


@contextlib.contextmanager
def host_postgres(address: str, root: Path, user: str, password: str, database: str):
    """PostgreSQL from Debian's packages, as the `postgres` system user, listening on ``address``:5432
    with password logins from its /24 (the stand-in for the kit's mlflow-postgres StatefulSet)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert bins, "PostgreSQL is not installed (apt-get install postgresql; .ci/run does)"
    bindir = bins[-1].parent
    root.mkdir(parents=True, exist_ok=True)
    shutil.chown(root, "postgres", "postgres")
    data, sock = root / "data", root / "run"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, "postgres", "postgres")

    def as_postgres(*cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, text=True,
                       timeout=120, cwd=root)

    as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")
    subnet = address.rsplit(".", 1)[0] + ".0/24"
    with open(data / "pg_hba.conf", "a") as f:
        f.write(f"host all all {subnet} scram-sha-256\n")
    as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start",
                "-o", f"-c listen_addresses={address} -p 5432 -k {sock}")
    try:
        as_postgres(str(bindir / "createdb"), "-h", str(sock), "-U", user, database)
        yield f"postgresql://{user}@{address}:5432/{database}"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
