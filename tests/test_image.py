"""Every container of the Kubernetes kit, run in the image built from the Dockerfile, as its pod runs it.

The `cpu-smoke` and `s3` overlays are rendered with `kubectl kustomize`; each container's command,
args, env (ConfigMaps from the render, Secrets with test values), volumes and securityContext become
a `podman run` (tests/podman_kit.py): UID 1000, read-only root, tmpfs for emptyDirs, all
capabilities dropped, no-new-privileges, the pod's memory/CPU limits. What the operators generate
(KubeRay's `ray start` and token variables, Kubeflow Trainer's PET_* variables) is added the way
they add it. Only the sizes are made tiny (`--set` arguments appended to the commands).

One podman network per module (tests/podman_kit.py), PostgreSQL from Debian's packages and the S3
server (moto) on the host's address in it, one Ray cluster, one MLflow server: the roles run one
after another in module fixtures, each test checks what one role did. `make test-image` runs this
module (pytest marker `image`); `make test` does not. Needs root, podman and the image's base
(`.ci/run` installs and makes them); a missing one is a failure, not a skip.
"""
from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, clean_env, free_port, served
from podman_kit import PODMAN, PodmanCluster, host_postgres, podman, quantity_bytes, quantity_cpus, service_names
from test_k8s import NAMESPACE, containers, external_secrets, pod_specs, render

pytestmark = [pytest.mark.image, pytest.mark.slow]

IMAGE = os.environ.get("UNET_IMAGE", "unet-dist:dev")
BUCKET = "unet-dist"  # the bucket k8s/components/s3 names
# Addresses in the podman network (the host is .1): fixed, so every /etc/hosts can name them up front.
IP = {"mlflow": 10, "ray-head": 11, "ray-worker": 12, "ray-job-submitter": 13, "serve": 14, "node": 15,
      "pytorch-master": 16, "pytorch-worker": 17, "synth": 20, "preprocess": 21, "preprocess-s3": 22}
# Tiny runs: what the tests append to the kit's own commands (`--set`), and nothing else.
TINY_TRAIN = ["train.steps=4", "train.warmup_steps=0", "train.eval_every=4", "train.checkpoint_every=2", "train.log_every=1"]
TINY_CITYSCAPES = ["shards.processes=2", "shards.samples_per_shard=4"]
# Containers of the kit that run the image and are not run here, and why.
NOT_RUN = {
    ("cpu-smoke", "RayJob/unet-tune-ray"):
        "the training RayJob's cluster (tests/test_k8s.py checks they are equal), entrypoint unet_dist.tune",
    ("cpu-smoke", "RayJob/unet-batch-predict-ray"):
        "the training RayJob's cluster, entrypoint unet_dist.batch_predict (on a Ray head: tests/test_batch_predict.py)",
}
# Of the s3 overlay, the role that differs most; its other pods differ only in --set paths.
S3_OVERLAY_RUNS = {"Job/unet-preprocess"}


def overlay_objects(overlay: str, app: str | None = None) -> list[dict]:
    return render(f"overlays/{overlay}" + (f"/{app}" if app else ""))


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    return next(o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


def config_maps(objects: list[dict]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: dict(o.get("data", {})) for o in objects if o["kind"] == "ConfigMap"}


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def sets(*assignments: str) -> list[str]:
    return [a for s in assignments for a in ("--set", s)]


class Kit:
    """What the roles share: the podman cluster, the host's folders and servers, and what was seen."""

    def __init__(self, cluster: PodmanCluster, shared: Path, s3_endpoint: str):
        self.cluster, self.shared, self.s3_endpoint = cluster, shared, s3_endpoint
        self.timings: dict[str, float] = {}  # role -> seconds from start to ready (or done)
        self.probes: list[tuple[str, str, bool, str]] = []  # (container, probe kind, passed, detail)
        self.ran: set[tuple[str, str, str]] = set()  # (overlay, kind/name, container)

    def mark(self, overlay: str, obj: dict, container: dict) -> None:
        self.ran.add((overlay, f"{obj['kind']}/{obj['metadata']['name']}", container["name"]))

    def check_probes(self, name: str, ip: str, container: dict) -> None:
        """Every probe the manifest gives this container, once, now that it is ready."""
        for kind in PROBES:
            if kind in container:
                ok, said = self.cluster.probe(name, ip, container, container[kind])
                self.probes.append((name, kind, ok, said))

    def mlflow(self, path: str, *, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, dict]:
        """A REST call to the MLflow container, as a pod calls it (by its Service name)."""
        host = service_names("mlflow", NAMESPACE)[-1]
        req = urllib.request.Request(f"http://{self.cluster.address(IP['mlflow'])}:5000{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json", "Host": f"{host}:5000"})
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, {}


def secret_values(postgres_password: str) -> dict[str, dict[str, str]]:
    """A value for every Secret of k8s/EXTERNAL_SECRETS (a new Secret there fails here until added)."""
    values = {
        "mlflow-postgres": {"username": "mlflow", "password": postgres_password},
        "mlflow-admin": {"username": "admin", "password": secrets.token_hex(16),
                         "flask-secret-key": secrets.token_hex(16)},
        "mlflow-client": {"username": "unet-jobs", "password": secrets.token_hex(16)},
        "ray-auth-token": {"auth_token": secrets.token_hex(32)},
        "unet-dist-s3": {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret"},
    }
    assert set(values) == external_secrets(), "give tests/test_image.py a test value for each Secret"
    return values


def free_subnet() -> str:
    """A /24 of 198.19.0.0/16 that no interface of this machine uses (runs of this module may overlap)."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for n in [os.getpid() % 240 + 10, *range(10, 250)]:
        if f"198.19.{n}." not in routes:
            return f"198.19.{n}"
    raise AssertionError("no free /24 in 198.19.0.0/16")


# --------------------------------------------------------------------------------------------
# The image and the cluster
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def image() -> str:
    """The image, built once per session with `make image` (layers cached: seconds when
    `make test-image` built it just before)."""
    if PODMAN is None:
        pytest.fail("podman is not installed: .ci/run installs it (apt-get install podman runc mmdebstrap eatmydata)")
    if os.geteuid() != 0:
        pytest.fail("the image tests run podman as root (the network bridge, PostgreSQL's system user)")
    proc = subprocess.run(["make", "-s", "image", f"IMAGE={IMAGE}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"make image failed (no base image? `make image-base`):\n{proc.stderr[-4000:]}"
    return IMAGE


@pytest.fixture(scope="module")
def kit(image, tmp_path_factory, request):
    """The podman network, the claim's folder, PostgreSQL and the S3 server on the host's address."""
    root = tmp_path_factory.mktemp("image-kit")
    shared = root / "shared"  # the PersistentVolumeClaim unet-dist-shared; fsGroup 1000 owns it
    shared.mkdir()
    os.chown(shared, 1000, 1000)
    shared.chmod(0o2775)
    pg_password = secrets.token_hex(16)
    smoke = overlay_objects("cpu-smoke")
    cluster = PodmanCluster(image=image, subnet=free_subnet(), config_maps=config_maps(smoke),
                            secrets=secret_values(pg_password), claims={"unet-dist-shared": shared})
    services = {o["metadata"]["name"] for o in smoke + overlay_objects("cpu-smoke", "serve") if o["kind"] == "Service"}
    backends = {"mlflow": IP["mlflow"], "mlflow-postgres": 1, "unet-serve": IP["serve"]}
    assert set(backends) == services, f"give tests/test_image.py an address for each Service: {services}"
    for service, n in {**backends, "unet-train-ray-head-svc": IP["ray-head"]}.items():
        cluster.hosts.update({name: cluster.address(n) for name in service_names(service, NAMESPACE)})
    kit = None
    try:
        cluster.create()
        pg_user = cluster.secrets["mlflow-postgres"]["username"]
        # outside pytest's root-only tmp tree: PostgreSQL runs as the `postgres` system user
        with host_postgres(cluster.gateway, Path(tempfile.mkdtemp(prefix="unet-pg-")), pg_user, pg_password, "mlflow"):
            port = free_port()
            with served([str(Path(sys.executable).parent / "moto_server"), "-H", cluster.gateway, "-p", str(port)],
                        root, f"http://{cluster.gateway}:{port}", "/moto-api/", clean_env(), timeout=60) as s3:
                kit = Kit(cluster, shared, s3)
                yield kit
    finally:
        cluster.destroy()
        if kit is not None:
            report(request, kit)


def say(request, *lines: str) -> None:
    """Lines in the test output even when it is captured (the measured times docs/cluster.md quotes)."""
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if writer and capture:
        with capture.global_and_fixture_disabled():
            for line in ("", *lines):
                writer.write_line(line)


def report(request, kit: Kit) -> None:
    """Each role's time from start to ready (or done)."""
    say(request, *(f"image role {role}: {seconds:.1f} s" for role, seconds in kit.timings.items()))


# --------------------------------------------------------------------------------------------
# Roles, in the order a user applies them
# --------------------------------------------------------------------------------------------

def run_job(kit: Kit, overlay: str, job: dict, *, extra_args: list[str] | tuple = (),
            cluster: PodmanCluster | None = None, timeout: float = 600) -> float:
    """A Job's pod: its init containers in order, then its container, each to exit 0."""
    cluster = cluster or kit.cluster
    spec = job["spec"]["template"]["spec"]
    t0 = time.monotonic()
    for c in containers(spec):
        is_main = c in spec["containers"]
        name = c["name"] if overlay == "cpu-smoke" else f"{c['name']}-{overlay}"
        args = [*c.get("args", []), *extra_args] if is_main else None
        proc = cluster.run(spec, c, name=name, ip=cluster.address(IP[name]), args=args, timeout=timeout)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        kit.mark(overlay, job, c)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def smoke_shards(kit) -> Path:
    """The cpu-smoke preprocess Job: its synth init container writes raw data to the volume, then
    the preprocess container turns it into shards there (jobs/configs/smoke.yaml, as written)."""
    job = find(overlay_objects("cpu-smoke"), "Job", "unet-preprocess")
    kit.timings["preprocess (cpu-smoke: synth + preprocess)"] = run_job(kit, "cpu-smoke", job)
    return kit.shared / "shards" / "smoke"


@pytest.fixture(scope="module")
def s3_shards(kit, tmp_path_factory) -> dict[str, bytes]:
    """The s3 overlay's preprocess Job against the S3 server: Cityscapes-layout raw data on its
    volume (a tiny synthetic set, as a user would copy theirs), shards written to the bucket."""
    objects = overlay_objects("s3")
    job = find(objects, "Job", "unet-preprocess")
    maps = config_maps(objects)
    assert maps["unet-dist-env"]["AWS_ENDPOINT_URL"].startswith("https://"), "the s3 component names an endpoint"
    maps["unet-dist-env"]["AWS_ENDPOINT_URL"] = kit.s3_endpoint  # what k8s/components/s3 tells a user to set
    raw = tmp_path_factory.mktemp("s3-claim")
    data_root = yaml.safe_load((REPO / "jobs" / "configs" / "cityscapes.yaml").read_text())["data"]["root"]
    target = raw / Path(data_root).relative_to("/mnt/shared")
    subprocess.run([sys.executable, "-m", "unet_dist.synth", "--layout", "cityscapes", "--out", str(target),
                    "--train", "4", "--val", "4", "--size", "64x128", "--processes", "1"],
                   check=True, capture_output=True, timeout=300, cwd=raw)
    subprocess.run(["chown", "-R", "1000:1000", str(raw)], check=True)
    s3 = s3_client(kit)
    s3.create_bucket(Bucket=BUCKET)
    cluster = copy.copy(kit.cluster)
    cluster.config_maps, cluster.claims = maps, {"unet-dist-shared": raw}
    kit.timings["preprocess (s3: to the bucket)"] = run_job(kit, "s3", job, extra_args=sets(*TINY_CITYSCAPES),
                                                           cluster=cluster)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="shards/").get("Contents", [])]
    return {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def s3_client(kit: Kit):
    import boto3

    keys = kit.cluster.secrets["unet-dist-s3"]
    return boto3.client("s3", endpoint_url=kit.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])


def start_deployment(kit: Kit, objects: list[dict], deployment: str, role: str) -> tuple[str, str]:
    """A Deployment's container, started and waited for by its own startup probe, then every probe
    it has tried once; returns its name and address."""
    obj = find(objects, "Deployment", deployment)
    spec = obj["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    ip = kit.cluster.address(IP[c["name"]])
    t0 = time.monotonic()
    name = kit.cluster.start(spec, c, name=c["name"], ip=ip)
    kit.cluster.wait_until(name, ip, c, c["startupProbe"], timeout=300)
    kit.timings[role] = time.monotonic() - t0
    kit.mark("cpu-smoke", obj, c)
    kit.check_probes(name, ip, c)
    return name, ip


@pytest.fixture(scope="module")
def mlflow_pod(kit) -> dict:
    """The MLflow Deployment's container on PostgreSQL, ready by its own startup probe; then, as
    docs/security.md tells an operator, the admin creates the jobs' user of the mlflow-client Secret."""
    name, _ = start_deployment(kit, overlay_objects("cpu-smoke"), "mlflow", "mlflow server")
    admin = tuple(kit.cluster.secrets["mlflow-admin"][k] for k in ("username", "password"))
    jobs = tuple(kit.cluster.secrets["mlflow-client"][k] for k in ("username", "password"))
    status, _ = kit.mlflow("/api/2.0/mlflow/users/create", auth=admin, body={"username": jobs[0], "password": jobs[1]})
    assert status == 200, kit.cluster.logs(name)[-6000:]
    return {"name": name, "admin": admin, "jobs": jobs}


def kuberay_start_command(group: dict, container: dict, *, head: bool) -> str:
    """The command KubeRay gives a Ray container without one: `ray start` with the group's
    rayStartParams, CPUs and memory from the container's limits, its default ports, `--block`."""
    params = dict(group.get("rayStartParams", {}))
    limits = container["resources"]["limits"]
    params.setdefault("num-cpus", str(math.ceil(quantity_cpus(limits["cpu"]))))
    params.setdefault("memory", str(quantity_bytes(limits["memory"])))
    params.setdefault("metrics-export-port", "8080")
    params.setdefault("dashboard-agent-listen-port", "52365")
    if not head:
        params.setdefault("address", f"unet-train-ray-head-svc.{NAMESPACE}.svc.cluster.local:6379")
    flags = " ".join(f"--{k}={v}" for k, v in params.items())
    return f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; ray start {'--head ' if head else ''}{flags} --block"


# KubeRay's probes for a Ray container without its own: recent operators with Ray >= 2.53 send one
# HTTP check to the dashboard agent; older ones (or older Ray) run wget commands inside the container.
def kuberay_probes(head: bool) -> list[tuple[str, dict]]:
    wget = "wget --tries 1 -T 2 -q -O- http://localhost:{}/api/{} | grep success"
    commands = [wget.format(52365, "local_raylet_healthz"), *([wget.format(8265, "gcs_healthz")] if head else [])]
    return [("readinessProbe (KubeRay, HTTP)", {"httpGet": {"path": "/api/healthz", "port": 52365}}),
            ("livenessProbe (older KubeRay, exec)", {"exec": {"command": ["bash", "-c", " && ".join(commands)]}})]


@pytest.fixture(scope="module")
def ray_cluster(kit, smoke_shards, mlflow_pod) -> dict:
    """The RayJob's head and worker containers with KubeRay's command, token and probes."""
    rayjob = find(overlay_objects("cpu-smoke", "ray"), "RayJob")
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    token = kit.cluster.secrets[cluster_spec["authOptions"]["secretName"]]["auth_token"]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # what KubeRay injects for authOptions token
    nodes = [("ray-head", cluster_spec["headGroupSpec"], True)]
    nodes += [("ray-worker", group, False) for group in cluster_spec["workerGroupSpecs"]]
    assert len(nodes) == 2 and cluster_spec["workerGroupSpecs"][0]["replicas"] == 1
    t0 = time.monotonic()
    for name, group, head in nodes:
        spec = group["template"]["spec"]
        (c,) = spec["containers"]
        assert "command" not in c and "args" not in c, "KubeRay generates the Ray container's command"
        kit.cluster.start(spec, c, name=name, ip=kit.cluster.address(IP[name]), env=auth,
                          command=["/bin/bash", "-lc"], args=[kuberay_start_command(group, c, head=head)])
        kit.mark("cpu-smoke", rayjob, c)
    for name, group, head in nodes:
        (c,) = group["template"]["spec"]["containers"]
        ip = kit.cluster.address(IP[name])
        probes = kuberay_probes(head)
        kit.cluster.wait_until(name, ip, c, probes[0][1], timeout=300)
        for kind, probe in probes:
            ok, said = kit.cluster.probe(name, ip, c, probe)
            kit.probes.append((name, kind, ok, said))
    kit.timings["ray head + worker"] = time.monotonic() - t0
    return {"rayjob": rayjob, "token": token}


@pytest.fixture(scope="module")
def ray_job(kit, ray_cluster) -> dict:
    """jobs/submit_ray.sh in the RayJob's submitter container, with the cluster's token, submitting
    the RayJob's entrypoint (module and --config from it, then the tiny sizes)."""
    rayjob = ray_cluster["rayjob"]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("unet_dist."), argv
    rest = argv[3:]
    config = rest.pop(rest.index("--config") + 1)
    rest.remove("--config")
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    ours = yaml.safe_load((REPO / "jobs" / "ray" / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"].items() <= ours["env_vars"].items(), "submit_ray.sh's runtime env differs"
    spec = rayjob["spec"]["submitterPodTemplate"]["spec"]
    (c,) = spec["containers"]
    env = {"RAY_ADDRESS": f"http://unet-train-ray-head-svc.{NAMESPACE}.svc.cluster.local:8265",
           "RAY_AUTH_TOKEN": ray_cluster["token"], "MODULE": argv[2].split(".", 1)[1], "CONFIG": config,
           "SUBMISSION_ID": "image-test-train"}
    t0 = time.monotonic()
    proc = kit.cluster.run(spec, c, name="ray-job-submitter", ip=kit.cluster.address(IP["ray-job-submitter"]), env=env,
                           command=["bash", "/app/jobs/submit_ray.sh"], args=[*rest, *TINY_TRAIN], timeout=900)
    kit.timings["ray job (submit to SUCCEEDED)"] = time.monotonic() - t0
    kit.mark("cpu-smoke", rayjob, c)
    status = podman("exec", "ray-head", "ray", "status", check=False).stdout
    for name in ("ray-head", "ray-worker"):  # done with Ray: its CPU goes to the next roles
        podman("stop", "--time", "10", name, check=False)
    run_name = yaml.safe_load((REPO / config.removeprefix("/app/")).read_text())["train"]["run_name"]
    return {"proc": proc, "status": status, "run_name": run_name}


@pytest.fixture(scope="module")
def serve_pod(kit, ray_job) -> dict:
    """The model server's Deployment serving the model the Ray job registered, ready by its probes."""
    name, ip = start_deployment(kit, overlay_objects("cpu-smoke", "serve"), "unet-serve", "model server")
    return {"name": name, "url": f"http://{ip}:8080"}


@pytest.fixture(scope="module")
def torchrun_job(kit, smoke_shards, mlflow_pod, serve_pod) -> subprocess.CompletedProcess:
    """The TrainJob's node: the TrainingRuntime's container with the TrainJob's command and
    resources, and the PET_* variables Kubeflow Trainer's torch plugin gives torchrun."""
    objects = overlay_objects("cpu-smoke", "trainjob")
    trainjob, runtime = find(objects, "TrainJob"), find(objects, "TrainingRuntime")
    trainer = trainjob["spec"]["trainer"]
    (node,) = [j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    spec = node["template"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    c = {**c, "resources": trainer.get("resourcesPerNode", c.get("resources", {}))}
    ip = kit.cluster.address(IP["node"])
    env = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
           "PET_NODE_RANK": "0", "PET_MASTER_ADDR": ip, "PET_MASTER_PORT": "29400"}
    podman("stop", "--time", "10", serve_pod["name"], check=False)  # done serving: the CPUs train
    t0 = time.monotonic()
    proc = kit.cluster.run(spec, c, name="node", ip=ip, env=env, command=trainer["command"],
                           args=[*sets(*TINY_TRAIN, "train.run_name=unet-smoke-torchrun", "mlflow.log_model=false")],
                           timeout=900)
    kit.timings["torchrun node (2 processes, to exit)"] = time.monotonic() - t0
    kit.mark("cpu-smoke", find(objects, "TrainingRuntime"), c)
    return proc


@pytest.fixture(scope="module")
def pytorchjob_run(kit, smoke_shards, mlflow_pod, torchrun_job) -> dict[str, tuple[int, str]]:
    """The PyTorchJob's Master and Worker containers, one torchrun process each, with what the
    Training Operator gives them: MASTER_ADDR (the master's Service), MASTER_PORT (its port), PET_*."""
    job = find(overlay_objects("cpu-smoke", "pytorchjob"), "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    master_host = f"{job['metadata']['name']}-master-0"
    kit.cluster.hosts[master_host] = kit.cluster.address(IP["pytorch-master"])
    size = sum(r["replicas"] for r in replicas.values())
    t0, names = time.monotonic(), {}
    for rank, role in enumerate(("Master", "Worker")):
        spec = replicas[role]["template"]["spec"]
        (c,) = spec["containers"]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "pytorchjob-port")
        env = {"MASTER_ADDR": master_host, "MASTER_PORT": str(port), "WORLD_SIZE": str(size), "RANK": str(rank),
               "PET_NNODES": str(size), "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"], "PET_NODE_RANK": str(rank)}
        (script,) = c["args"]  # bash -c '<torchrun ...>': the tiny sizes go at its end
        extra = shlex.join(sets(*TINY_TRAIN, "train.run_name=unet-smoke-pytorchjob", "mlflow.log_model=false"))
        name = f"pytorch-{role.lower()}"
        kit.cluster.start(spec, c, name=name, ip=kit.cluster.address(IP[name]), env=env, args=[f"{script} {extra}"])
        kit.mark("cpu-smoke", job, c)
        names[role] = name
        if role == "Master":  # a worker that finds no rendezvous store yet backs off, for up to 90 s here
            kit.cluster.wait_until(name, kit.cluster.address(IP[name]), c, {"tcpSocket": {"port": port}}, timeout=300)
    results = {role: (kit.cluster.wait(name, timeout=900), kit.cluster.logs(name)) for role, name in names.items()}
    kit.timings["PyTorchJob master + worker (1 process each, to exit)"] = time.monotonic() - t0
    return results


# --------------------------------------------------------------------------------------------
# What each role did
# --------------------------------------------------------------------------------------------

def test_preprocess_job_writes_shards_to_the_shared_volume(smoke_shards):
    manifest = json.loads((smoke_shards / "manifest.json").read_text())
    tars = sorted(p.name for p in smoke_shards.glob("*.tar"))
    assert any(t.startswith("train-") for t in tars) and any(t.startswith("val-") for t in tars), tars
    assert (smoke_shards / "quantizer.json").is_file()
    assert all(p.stat().st_uid == 1000 for p in smoke_shards.iterdir()), "written by UID 1000"
    assert manifest


def test_preprocess_job_of_the_s3_overlay_writes_shards_to_the_bucket(s3_shards):
    names = {k.rsplit("/", 1)[-1] for k in s3_shards}
    assert "manifest.json" in names, sorted(s3_shards)
    assert any(n.startswith("train-") and n.endswith(".tar") for n in names), sorted(s3_shards)
    assert all(k.startswith("shards/cityscapes/") for k in s3_shards)


def test_mlflow_server_container_starts_with_basic_auth_on_postgresql(kit, mlflow_pod):
    assert kit.mlflow("/api/2.0/mlflow/experiments/search?max_results=1")[0] == 401
    assert kit.mlflow("/api/2.0/mlflow/experiments/search?max_results=1", auth=mlflow_pod["jobs"])[0] == 200
    secret = kit.cluster.secrets["mlflow-postgres"]
    tables = subprocess.run(["psql", "-h", kit.cluster.gateway, "-d", "mlflow", "-tAc", "select count(*) from users"],
                            capture_output=True, text=True,
                            env={**os.environ, "PGUSER": secret["username"], "PGPASSWORD": secret["password"]})
    assert tables.returncode == 0 and int(tables.stdout) == 2, tables.stderr  # admin + jobs' user, in PostgreSQL


def test_ray_head_and_worker_containers_train_a_job_to_succeeded(kit, ray_job):
    proc = ray_job["proc"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SUCCEEDED" in out, out[-6000:]
    assert re.search(r"\b2 node", ray_job["status"]) or ray_job["status"].count("node_") >= 2, ray_job["status"]
    run_dir = kit.shared / "checkpoints" / ray_job["run_name"]
    checkpoints = [p for p in run_dir.rglob("checkpoint*") if p.is_dir()]
    assert checkpoints, f"no checkpoint under {run_dir}: {sorted(map(str, run_dir.rglob('*')))[:20]}"


def test_mlflow_server_records_the_ray_run_and_its_model(kit, mlflow_pod, ray_job):
    jobs = mlflow_pod["jobs"]
    experiment = yaml.safe_load((REPO / "jobs" / "configs" / "smoke.yaml").read_text())["mlflow"]
    status, got = kit.mlflow(f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment['experiment']}",
                             auth=jobs)
    assert status == 200, got
    status, found = kit.mlflow("/api/2.0/mlflow/runs/search", auth=jobs,
                               body={"experiment_ids": [got["experiment"]["experiment_id"]]})
    (run,) = found["runs"]
    assert run["info"]["status"] == "FINISHED"
    assert {m["key"] for m in run["data"]["metrics"]} >= {"train/loss"}
    query = urllib.parse.urlencode({"filter": f"name='{experiment['registered_model']}'"})
    status, versions = kit.mlflow(f"/api/2.0/mlflow/model-versions/search?{query}", auth=jobs)
    assert status == 200 and versions["model_versions"][0]["run_id"] == run["info"]["run_id"]
    assert any((kit.shared / "mlflow-artifacts").rglob("*")), "artifacts proxied to the shared volume"


def png_b64(photo: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_serve_container_answers_ping_and_returns_a_mask_for_a_photo(serve_pod):
    with urllib.request.urlopen(serve_pod["url"] + "/ping", timeout=10) as r:
        assert r.status == 200
    photo = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    body = {"dataframe_split": {"columns": ["image"], "data": [[png_b64(photo)]]}}
    req = urllib.request.Request(serve_pod["url"] + "/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        (prediction,) = json.loads(r.read())["predictions"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))
    assert mask.shape == (64, 96) and mask.dtype == np.uint8 and mask.max() < 19


def test_torchrun_container_trains_two_processes(kit, torchrun_job):
    out = torchrun_job.stdout + torchrun_job.stderr
    assert torchrun_job.returncode == 0, out[-6000:]
    ranks = dict(re.findall(r"rank (\d+) final weights sha256 (\w+)", out))
    assert set(ranks) == {"0", "1"} and len(set(ranks.values())) == 1, out[-3000:]
    assert list((kit.shared / "checkpoints" / "unet-smoke-torchrun").glob("checkpoint_step-*"))


def test_pytorchjob_master_and_worker_containers_train_together(kit, pytorchjob_run):
    ranks = {}
    for role, (code, log) in pytorchjob_run.items():
        assert code == 0, f"{role} exited {code}:\n{log[-5000:]}"
        ranks.update(re.findall(r"rank (\d+) final weights sha256 (\w+)", log))
    assert set(ranks) == {"0", "1"} and len(set(ranks.values())) == 1, ranks
    assert list((kit.shared / "checkpoints" / "unet-smoke-pytorchjob").glob("checkpoint_step-*"))


# --------------------------------------------------------------------------------------------
# Across the roles: the probes, and that no container of the kit went unrun
# --------------------------------------------------------------------------------------------

def test_every_probe_in_the_manifests_succeeds_inside_its_container(kit, mlflow_pod, ray_cluster, serve_pod):
    failed = [p for p in kit.probes if not p[2]]
    assert not failed, failed
    expected = set()
    for overlay, app in (("cpu-smoke", None), ("cpu-smoke", "serve")):
        for obj in overlay_objects(overlay, app):
            for _, spec in pod_specs(obj):
                for c in containers(spec):
                    if "unet-dist" in c["image"]:
                        expected |= {(c["name"], k) for k in PROBES if k in c}
    assert expected <= {(name, kind) for name, kind, _, _ in kit.probes}, expected
    assert {n for n, *_ in kit.probes} >= {"ray-head", "ray-worker"}


def test_every_container_of_the_kit_that_runs_the_image_was_run_in_it(kit, smoke_shards, s3_shards, ray_job,
                                                                       serve_pod, torchrun_job, pytorchjob_run):
    everything = set()
    for overlay in ("cpu-smoke", "s3"):
        for app in (None, "ray", "trainjob", "pytorchjob", "serve", "batch", *(("tune",) if overlay == "cpu-smoke" else ())):
            for obj in overlay_objects(overlay, app):
                for _, spec in pod_specs(obj):
                    everything |= {(overlay, f"{obj['kind']}/{obj['metadata']['name']}", c["name"])
                                   for c in containers(spec) if "unet-dist" in c["image"]}
    not_run = everything - kit.ran
    explained = {x for x in not_run if (x[0], x[1]) in NOT_RUN or (x[0] == "s3" and x[1] not in S3_OVERLAY_RUNS)}
    assert not_run == explained, f"containers of the kit that no test runs in the image: {sorted(not_run - explained)}"


# --------------------------------------------------------------------------------------------
# The build itself
# --------------------------------------------------------------------------------------------

def dependency_layer(image: str) -> str:
    """The id of the layer the Dockerfile's dependency step made (`pip install ... -c constraints.txt`)."""
    history = podman("history", "--no-trunc", "--format", "{{.ID}}\t{{.CreatedBy}}", image).stdout.splitlines()
    (layer,) = [line.split("\t")[0] for line in history if "pip install" in line and "constraints.txt" in line]
    return layer


def test_a_one_line_code_change_rebuilds_on_the_cached_dependency_layer(image, tmp_path, request):
    """The dependency layer (about 1.7 GB) survives an edit of the code: only the code layers are
    built again. The build context is what the Dockerfile copies, with one line added to the package."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "Makefile", "pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy2(REPO / name, context / name)
    for name in ("unet_dist", "jobs", "scripts"):
        shutil.copytree(REPO / name, context / name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(context / "unet_dist" / "__init__.py", "a") as f:
        f.write("# a one-line change\n")
    tag = f"unet-dist:rebuild-{os.getpid()}"
    t0 = time.monotonic()
    proc = subprocess.run(["make", "-s", "-C", str(context), "image", f"IMAGE={tag}"], capture_output=True, text=True,
                          timeout=900)
    seconds = time.monotonic() - t0
    try:
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert dependency_layer(tag) == dependency_layer(image), "the dependency layer was built again"
        assert podman("image", "inspect", "--format", "{{.Id}}", tag).stdout != podman(
            "image", "inspect", "--format", "{{.Id}}", image).stdout, "the code change did not reach the image"
    finally:
        podman("rmi", tag, check=False)
    say(request, f"image rebuild after a one-line code change: {seconds:.1f} s")
