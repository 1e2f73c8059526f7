"""The Kubernetes kit renders, validates offline and holds together.

Every kustomization under k8s/ is rendered with the real `kubectl kustomize`; built-in objects (and
the pod templates inside custom resources) are checked against the Kubernetes OpenAPI schema by
`kubernetes-validate`; custom resources are checked for the fields their operators need; names,
Services, config files, entry points and security settings are cross-checked across each
deployment (an overlay's infrastructure plus its launchers, as they are applied together).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUBE_VERSION = "1.32"  # the oldest API we target; kubectl here is v1.32
NAMESPACE = "unet-dist"
UID = 1000
MLFLOW_URI = f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"
LAUNCHERS = ("ray", "trainjob", "pytorchjob", "tune", "batch")
APPS = (*LAUNCHERS, "serve")  # sub-kustomizations applied on their own: the launchers and serving
# shared-gpu: gpu, queued on Kueue, scraped by Prometheus; spot-gpu: gpu with elastic training
OVERLAYS = ("cpu-smoke", "gpu", "s3", "shared-gpu", "spot-gpu")
SHARED_VOLUME = ("cpu-smoke", "gpu", "shared-gpu", "spot-gpu")  # s3: shards, checkpoints and artifacts in a bucket
ELASTIC = ("ray", "pytorchjob")  # the launchers spot-gpu makes elastic (it has no TrainJob)
CLUSTER_KITS = ("cluster/kueue",)  # cluster-scoped objects a cluster admin applies once
CLUSTER_SCOPED = {"Namespace", "ClusterQueue", "ResourceFlavor", "WorkloadPriorityClass"}
KUEUE_API, MONITORING_API = "kueue.x-k8s.io/v1beta2", "monitoring.coreos.com/v1"
# Custom kinds that hold no pods (queues, quotas, scrape targets)
WITHOUT_PODS = {"LocalQueue", "ClusterQueue", "ResourceFlavor", "WorkloadPriorityClass", "PodMonitor"}
# What `python -m unet_dist.X` may name: the project's entry points.
ENTRY_POINTS = {"preprocess", "train", "evaluate", "predict", "demo", "synth", "tune", "batch_predict", "export"}
BUILT_IN = {"v1", "apps/v1", "batch/v1", "networking.k8s.io/v1"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|(^|_)KEY($|_)", re.IGNORECASE)
# A resource quantity, as the API server parses it (the OpenAPI schema only says "string").
QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?$")

KUBECTL = shutil.which("kubectl")


def apps(overlay: str) -> tuple[str, ...]:
    """The sub-kustomizations an overlay has: the s3 variant packages no sweep (docs/sweeps.md),
    spot-gpu no TrainJob (its launchers are the elastic ones)."""
    return tuple(x for x in APPS if not (overlay == "s3" and x == "tune") and not (overlay == "spot-gpu" and x == "trainjob"))


def kustomizations() -> list[str]:
    dirs = ["base", *(f"base/{x}" for x in APPS)]
    for overlay in OVERLAYS:
        dirs += [f"overlays/{overlay}", *(f"overlays/{overlay}/{x}" for x in apps(overlay))]
    return dirs + list(CLUSTER_KITS)


_RENDERED: dict[str, list[dict]] = {}


def render(rel: str) -> list[dict]:
    """The objects `kubectl kustomize k8s/<rel>` renders (once per session)."""
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH: cannot render the kustomizations (CI has it)")
    if rel not in _RENDERED:
        proc = subprocess.run([KUBECTL, "kustomize", str(K8S / rel)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize k8s/{rel} failed:\n{proc.stderr}"
        _RENDERED[rel] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _RENDERED[rel]


def deployment(overlay: str) -> list[dict]:
    """Everything one overlay applies: its infrastructure, all its launchers and serving."""
    return [obj for rel in (f"overlays/{overlay}", *(f"overlays/{overlay}/{x}" for x in apps(overlay))) for obj in render(rel)]


def walk(node, path=()):
    """Every (path, value) in a nested structure."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def where(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_specs(obj: dict) -> list[tuple[tuple, dict]]:
    """Every pod spec in an object, built-in or custom: a mapping that holds a `containers` list."""
    return [(p, v) for p, v in walk(obj) if isinstance(v, dict) and isinstance(v.get("containers"), list)]


def pod_templates(obj: dict) -> list[tuple[tuple, dict]]:
    """Every pod template ({metadata, spec}) in an object: the parent of each pod spec."""
    found = []
    for path, spec in pod_specs(obj):
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if path and path[-1] == "spec" and isinstance(parent, dict):
            found.append((path[:-1], parent))
    return found


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def command_strings(obj: dict) -> list[str]:
    """The commands an object runs: container command/args, RayJob entrypoint, TrainJob trainer."""
    out = []
    for path, value in walk(obj):
        if path and path[-1] in ("command", "args") and isinstance(value, list):
            out.append(" ".join(map(str, value)))
        elif path and path[-1] == "entrypoint" and isinstance(value, str):
            out.append(value)
    return out


@pytest.mark.parametrize("rel", kustomizations())
def test_every_kustomization_renders_into_the_namespace(rel):
    objects = render(rel)
    assert objects, f"k8s/{rel} renders nothing"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], f"k8s/{rel}: {where(obj)} is cluster-scoped"
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"k8s/{rel}: {where(obj)} is not in {NAMESPACE}"


@pytest.mark.parametrize("rel", kustomizations())
def test_built_in_objects_validate_against_the_kubernetes_schema(rel):
    built_in = [o for o in render(rel) if o["apiVersion"] in BUILT_IN]
    for obj in built_in:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"k8s/{rel}: {where(obj)} at {'.'.join(map(str, e.path))}: {e.message}")
    unknown = {o["apiVersion"] for o in render(rel)} - BUILT_IN - {"ray.io/v1", "trainer.kubeflow.org/v1alpha1",
                                                                   "kubeflow.org/v1", KUEUE_API, MONITORING_API}
    assert not unknown, f"k8s/{rel}: unexpected API versions {unknown}"


@pytest.mark.parametrize("rel", kustomizations())
def test_pod_templates_inside_custom_resources_validate_as_pod_templates(rel):
    custom = [o for o in render(rel) if o["apiVersion"] not in BUILT_IN]
    for obj in custom:
        templates = pod_templates(obj)
        assert templates or obj["kind"] in {"TrainJob", *WITHOUT_PODS}, f"{where(obj)}: no pod template found"
        for path, template in templates:
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            try:
                kubernetes_validate.validate(wrapped, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"k8s/{rel}: {where(obj)} {'.'.join(map(str, path))} at "
                            f"{'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_carry_the_fields_their_operators_require(overlay):
    by_kind = {}
    for obj in deployment(overlay):
        by_kind.setdefault(obj["kind"], []).append(obj)
    launchers = {"RayJob", "PyTorchJob"} | ({"TrainJob", "TrainingRuntime"} if "trainjob" in apps(overlay) else set())
    assert launchers <= set(by_kind), overlay

    for job in by_kind["RayJob"]:
        spec = job["spec"]
        assert job["apiVersion"] == "ray.io/v1"
        assert spec["entrypoint"].startswith(("python -m unet_dist.train ", "python -m unet_dist.tune ",
                                              "python -m unet_dist.batch_predict "))
        env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
        assert env_vars["MLFLOW_TRACKING_URI"] == MLFLOW_URI
        assert not {"pip", "conda", "uv", "working_dir"} & set(yaml.safe_load(spec["runtimeEnvYAML"]))
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        cluster = spec["rayClusterSpec"]
        assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
        assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())
        assert cluster["workerGroupSpecs"], "RayJob needs at least one worker group"
        for group in cluster["workerGroupSpecs"]:
            assert group["groupName"] and group["template"]["spec"]["containers"]
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    runtimes = {r["metadata"]["name"]: r for r in by_kind.get("TrainingRuntime", [])}
    for job in by_kind.get("TrainJob", []):
        assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        ref = job["spec"]["runtimeRef"]
        assert ref["name"] == "torch-distributed"
        if ref.get("kind") == "TrainingRuntime":
            assert ref["name"] in runtimes, f"TrainJob names a TrainingRuntime {ref['name']} that is not defined"
        trainer = job["spec"]["trainer"]
        assert trainer["numNodes"] >= 1 and trainer["command"][0] == "torchrun"
        assert not [e for e in trainer.get("env", []) if e["name"].startswith("PET_")], "PET_* are reserved"
    for runtime in runtimes.values():
        assert runtime["spec"]["mlPolicy"]["torch"] is not None
        jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        node = [j for j in jobs if j["name"] == "node"]
        assert node, "the Torch plugin drives the replicated job named 'node'"
        assert node[0]["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
        assert [c["name"] for c in node[0]["template"]["spec"]["template"]["spec"]["containers"]] == ["node"]

    for job in by_kind["PyTorchJob"]:
        assert job["apiVersion"] == "kubeflow.org/v1"
        replicas = job["spec"]["pytorchReplicaSpecs"]
        elastic = job["spec"].get("elasticPolicy")
        if elastic:  # Worker pods only; the operator sets PET_NNODES=min:max and the rendezvous on worker-0
            assert set(replicas) == {"Worker"} and elastic["rdzvBackend"] == "c10d"
            assert 1 <= elastic["minReplicas"] <= replicas["Worker"]["replicas"] <= elastic["maxReplicas"]
        else:
            assert set(replicas) <= {"Master", "Worker"} and "Master" in replicas
            assert replicas["Master"]["replicas"] == 1
        for role, rs in replicas.items():
            assert rs["restartPolicy"] == "OnFailure", role
            names = [c["name"] for c in rs["template"]["spec"]["containers"]]
            assert "pytorch" in names, f"PyTorchJob {role}: the operator needs a container named 'pytorch'"


def test_spot_gpu_launchers_are_elastic_with_the_global_batch_of_the_full_size():
    """Ray: 4 to 8 workers (train.min_workers=4, one pod of two); torchrun: --nnodes=1:2 through the
    elasticPolicy, train.global_batch pinned to the full size's 8 GPUs x 4 images."""
    from unet_dist.config import load_config

    cfg = load_config(REPO / "jobs" / "configs" / "cityscapes.yaml")
    full = cfg.train.batch_size * cfg.train.accumulation * cfg.train.workers
    [ray] = [o for o in render("overlays/spot-gpu/ray") if o["kind"] == "RayJob"]
    assert "--set train.min_workers=4" in ray["spec"]["entrypoint"] and cfg.train.workers == 8
    [group] = ray["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2 and group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    [job] = [o for o in render("overlays/spot-gpu/pytorchjob") if o["kind"] == "PyTorchJob"]
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 1 and job["spec"]["elasticPolicy"]["maxReplicas"] == 2
    assert job["spec"]["nprocPerNode"] == "4"
    args = " ".join(job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"])
    assert f"--set train.global_batch={full}" in args and "--nnodes" not in args and "--master-addr" not in args


SHUTDOWN_TIMEOUT = "--shutdown-timeout=110"  # docs/preemption.md: ranks get this long to checkpoint


def torchrun_commands(objects: list[dict]) -> list[tuple[str, str, int | None]]:
    """(object, torchrun command line, the pod's grace period) for every torchrun a render starts:
    a TrainJob's trainer command (grace period from its TrainingRuntime) and each PyTorchJob role."""
    grace = {r["metadata"]["name"]: node["template"]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")
             for r in objects if r["kind"] == "TrainingRuntime"
             for node in r["spec"]["template"]["spec"]["replicatedJobs"] if node["name"] == "node"}
    out = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "TrainJob":
            out.append((name, " ".join(obj["spec"]["trainer"]["command"]), grace.get(obj["spec"]["runtimeRef"]["name"])))
        elif obj["kind"] == "PyTorchJob":
            for role, rs in obj["spec"]["pytorchReplicaSpecs"].items():
                pod = rs["template"]["spec"]
                out.append((f"{name} {role}", " ".join(pod["containers"][0].get("args", [])),
                            pod.get("terminationGracePeriodSeconds")))
    return out


@pytest.mark.parametrize("rel", ["base/trainjob", "base/pytorchjob",
                                 *(f"overlays/{o}/{x}" for o in OVERLAYS for x in ("trainjob", "pytorchjob") if x in apps(o))])
def test_every_torchrun_render_keeps_the_shutdown_timeout_within_the_grace_period(rel):
    """docs/preemption.md promises it on every training pod: without it torchrun SIGKILLs the ranks
    30 s after SIGTERM, before a large checkpoint is written."""
    found = torchrun_commands(render(rel))
    assert found, f"k8s/{rel} starts no torchrun"
    for name, command, grace in found:
        assert SHUTDOWN_TIMEOUT in command, f"k8s/{rel}: {name} runs torchrun without {SHUTDOWN_TIMEOUT}: {command}"
        assert grace is not None and grace > 110, f"k8s/{rel}: {name}: grace period {grace} s is not above 110 s"


def external_secrets() -> set[str]:
    lines = (K8S / "EXTERNAL_SECRETS").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_object_is_defined(overlay):
    objects = deployment(overlay)
    defined: dict[str, set[str]] = {}
    for o in objects:
        defined.setdefault(o["kind"], set()).add(o["metadata"]["name"])
    pvcs, config_maps = defined.get("PersistentVolumeClaim", set()), defined.get("ConfigMap", set())
    secrets_ok = defined.get("Secret", set()) | external_secrets()
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    problems = []
    for obj in objects:
        for path, v in walk(obj):
            if not isinstance(v, dict):
                continue
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                problems.append(f"{where(obj)}: PVC {v['persistentVolumeClaim']['claimName']}")
            for key in ("secretKeyRef", "secretRef"):
                if key in v and v[key]["name"] not in secrets_ok:
                    problems.append(f"{where(obj)}: Secret {v[key]['name']} (not defined, not in k8s/EXTERNAL_SECRETS)")
            if "secret" in v and isinstance(v["secret"], dict) and v["secret"].get("secretName") not in secrets_ok:
                problems.append(f"{where(obj)}: Secret volume {v['secret'].get('secretName')}")
            for key in ("configMapKeyRef", "configMapRef"):
                if key in v and v[key]["name"] not in config_maps:
                    problems.append(f"{where(obj)}: ConfigMap {v[key]['name']}")
            if "configMap" in v and isinstance(v["configMap"], dict) and v["configMap"].get("name") not in config_maps:
                problems.append(f"{where(obj)}: ConfigMap volume {v['configMap'].get('name')}")
        if obj["kind"] == "StatefulSet" and obj["spec"]["serviceName"] not in services:
            problems.append(f"{where(obj)}: serviceName {obj['spec']['serviceName']}")
        # Volume mounts name volumes of their own pod (or the StatefulSet's claim templates).
        claim_templates = {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])}
        for path, spec in pod_specs(obj):
            volumes = {v["name"] for v in spec.get("volumes", [])} | claim_templates
            for c in containers(spec):
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        problems.append(f"{where(obj)}: container {c['name']} mounts unknown volume {m['name']}")
    # Every Service selects some pod template of the deployment.
    pod_labels = [(t.get("metadata") or {}).get("labels", {}) for o in objects for _, t in pod_templates(o)]
    for name, svc in services.items():
        selector = svc["spec"].get("selector", {})
        if not any(selector.items() <= labels.items() for labels in pod_labels):
            problems.append(f"Service/{name}: selector {selector} matches no pod template")
    # Host names in URLs and commands point at defined Services, on ports they expose.
    for obj in objects:
        text = yaml.safe_dump(obj)
        for host, port in re.findall(r"(?:https?://|@)([a-z0-9][a-z0-9.-]*):(\d+)", text):
            labels = host.split(".")
            in_cluster = len(labels) == 1 or ".svc" in host or labels[1] == NAMESPACE
            if host == "localhost" or not in_cluster:
                continue
            if len(labels) > 1:
                assert labels[1] == NAMESPACE, f"{where(obj)}: {host} is outside namespace {NAMESPACE}"
            svc = services.get(labels[0])
            if svc is None:
                problems.append(f"{where(obj)}: {host}:{port} names no Service")
            elif int(port) not in {p["port"] for p in svc["spec"]["ports"]}:
                problems.append(f"{where(obj)}: Service {labels[0]} has no port {port}")
    assert not problems, "dangling references:\n" + "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_name_real_entry_points_and_config_files(overlay):
    from unet_dist import config as config_module

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY\s+jobs\s+\S*jobs/?\s*$", dockerfile, re.M), "the image must carry jobs/ at /app/jobs"
    assert re.search(r"^WORKDIR\s+/app\s*$", dockerfile, re.M)
    seen_modules, seen_configs = set(), set()
    for obj in deployment(overlay):
        for command in command_strings(obj):
            for module in re.findall(r"-m\s+unet_dist\.(\w+)", command):
                assert module in ENTRY_POINTS, f"{where(obj)}: unet_dist.{module} is not an entry point"
                seen_modules.add(module)
            for config in re.findall(r"--config[= ](\S+)", command):
                assert config.startswith("/app/jobs/configs/"), f"{where(obj)}: --config {config} is not in the image's jobs/configs"
                assert (REPO / "jobs" / "configs" / Path(config).name).is_file(), f"{where(obj)}: {config} does not exist"
                seen_configs.add(Path(config).name)
                # the config and the command's --set overrides pass the config's own checks
                config_module.load_config(REPO / "jobs" / "configs" / Path(config).name, re.findall(r"--set[= ](\S+)", command))
            for search in re.findall(r"--search[= ](\S+)", command):
                assert search.startswith("/app/jobs/sweeps/"), f"{where(obj)}: --search {search} is not in the image's jobs/sweeps"
                assert (REPO / "jobs" / "sweeps" / Path(search).name).is_file(), f"{where(obj)}: {search} does not exist"
    assert {"preprocess", "train", "batch_predict", *(("tune",) if "tune" in apps(overlay) else ())} <= seen_modules
    assert seen_configs == ({"smoke.yaml"} if overlay == "cpu-smoke" else {"cityscapes.yaml"})


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_entry_point_modules_exist(module):
    pkg = REPO / "unet_dist"
    assert (pkg / f"{module}.py").is_file() or (pkg / module / "__main__.py").is_file(), \
        f"python -m unet_dist.{module} has no unet_dist/{module}.py nor unet_dist/{module}/__main__.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_unprivileged_as_uid_1000_with_resources(overlay):
    problems = []
    for obj in deployment(overlay):
        for path, spec in pod_specs(obj):
            at = f"{where(obj)} {'.'.join(map(str, path))}"
            sc = spec.get("securityContext", {})
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") != UID:
                problems.append(f"{at}: pod securityContext needs runAsNonRoot: true, runAsUser: {UID}")
            for c in containers(spec):
                csc = c.get("securityContext", {})
                if csc.get("allowPrivilegeEscalation") is not False or csc.get("capabilities", {}).get("drop") != ["ALL"]:
                    problems.append(f"{at}: container {c['name']} needs allowPrivilegeEscalation: false, drop ALL")
                if csc.get("privileged") or csc.get("runAsUser") == 0:
                    problems.append(f"{at}: container {c['name']} is privileged or root")
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(res.get(part, {})):
                        problems.append(f"{at}: container {c['name']} lacks {part} for cpu and memory")
                    bad = {k: v for k, v in res.get(part, {}).items() if not QUANTITY.match(str(v))}
                    if bad:
                        problems.append(f"{at}: container {c['name']} has malformed {part} {bad}")
                gpu = [res.get(part, {}).get("nvidia.com/gpu") for part in ("requests", "limits")]
                if gpu[0] is not None and gpu[0] != gpu[1]:
                    problems.append(f"{at}: container {c['name']}: GPU requests must equal limits")
        if obj["kind"] == "TrainJob":
            res = obj["spec"]["trainer"].get("resourcesPerNode", {})
            if not all({"cpu", "memory"} <= set(res.get(p, {})) for p in ("requests", "limits")):
                problems.append(f"{where(obj)}: trainer.resourcesPerNode needs cpu/memory requests and limits")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_is_written_in_the_manifests(overlay):
    for obj in deployment(overlay):
        assert obj["kind"] != "Secret", f"{where(obj)}: Secrets are created by hand (k8s/EXTERNAL_SECRETS)"
        for path, v in walk(obj):
            if isinstance(v, dict) and "name" in v and "value" in v and path and path[-2:-1] == ("env",):
                assert not SECRET_NAME.search(v["name"]), f"{where(obj)}: env {v['name']} has a plaintext value"
            if path and path[-1] == "runtimeEnvYAML":
                names = (yaml.safe_load(v) or {}).get("env_vars", {})
                assert not [n for n in names if SECRET_NAME.search(n)], f"{where(obj)}: secret in runtimeEnvYAML"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_log_to_the_mlflow_service_everywhere(overlay):
    objects = deployment(overlay)
    uris = []
    for obj in objects:
        for path, v in walk(obj):
            if path and path[-1] == "MLFLOW_TRACKING_URI" and isinstance(v, str):
                uris.append((where(obj), v))
            if isinstance(v, dict) and v.get("name") == "MLFLOW_TRACKING_URI" and "value" in v:
                uris.append((where(obj), v["value"]))
            if path and path[-1] == "runtimeEnvYAML":
                uris.append((where(obj), yaml.safe_load(v)["env_vars"].get("MLFLOW_TRACKING_URI")))
    assert uris and all(u == MLFLOW_URI for _, u in uris), uris
    # Each training/preprocess container gets it, from its env or the shared ConfigMap.
    env_cm = next(o for o in objects if o["kind"] == "ConfigMap" and "MLFLOW_TRACKING_URI" in o.get("data", {}))
    for obj in objects:
        if obj["kind"] in ("RayJob", "PyTorchJob", "TrainingRuntime", "Job"):
            for _, spec in pod_specs(obj):
                for c in spec["containers"]:
                    if c["name"] == "ray-job-submitter":
                        continue
                    refs = {e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e}
                    assert env_cm["metadata"]["name"] in refs, f"{where(obj)}: {c['name']} misses the MLflow URI"
    mlflow = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "mlflow")
    assert [p["port"] for p in mlflow["spec"]["ports"]] == [5000]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_uses_postgres_the_shared_volume_and_its_service_names(overlay):
    objects = deployment(overlay)
    server = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    script = " ".join(command_strings(server))
    assert "mlflow server" in script and "--serve-artifacts" in script and "--workers" in script
    assert re.search(r"--backend-store-uri \"?postgresql://\$\{POSTGRES_USER\}:\$\{POSTGRES_PASSWORD\}@mlflow-postgres:5432/", script)
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert '--artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}"' in script
    where_to = env["MLFLOW_ARTIFACTS_DESTINATION"]["value"]
    assert where_to.startswith("s3://" if overlay == "s3" else "/mnt/shared/"), where_to
    allowed = set(re.search(r'--allowed-hosts "([^"]+)"', script).group(1).split(","))
    for host in ("mlflow", f"mlflow.{NAMESPACE}", f"mlflow.{NAMESPACE}.svc", f"mlflow.{NAMESPACE}.svc.cluster.local"):
        assert {host, f"{host}:5000"} <= allowed, host
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] in external_secrets()
    db = next(o for o in objects if o["kind"] == "StatefulSet")
    db_env = {e["name"]: e for e in db["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in db_env["POSTGRES_PASSWORD"]["valueFrom"] and db["spec"]["volumeClaimTemplates"]
    headless = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == db["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", SHARED_VOLUME)
def test_data_shards_and_checkpoints_live_on_the_shared_volume(overlay):
    objects = deployment(overlay)
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "unet-dist-shared"
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "cpu-smoke" else ["ReadWriteMany"])
    # Every container of the project's image (entry points, Ray nodes, MLflow) mounts the claim
    # at /mnt/shared; only KubeRay's job submitter and the model server, which just talk HTTP, do without.
    checked = 0
    for obj in objects:
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "serve":
            continue
        for _, spec in pod_specs(obj):
            claims = {v["name"] for v in spec.get("volumes", [])
                      if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
            for c in containers(spec):
                if "unet-dist" not in c["image"] or c["name"] == "ray-job-submitter":
                    continue
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert mounts.get("/mnt/shared") in claims, f"{where(obj)}: {c['name']} does not mount the PVC at /mnt/shared"
                checked += 1
    assert checked >= 2 + len(apps(overlay))  # preprocess, MLflow and at least one pod per launcher
    # The configs those pods run keep every path there.
    from unet_dist.config import load_config

    for name in ("cityscapes.yaml", "pairs.yaml", "smoke.yaml"):
        cfg = load_config(REPO / "jobs" / "configs" / name)
        for path in (cfg.data.root, cfg.shards.dir, cfg.train.checkpoint_dir):
            assert path.startswith("/mnt/shared/"), f"jobs/configs/{name}: {path} is not on the shared volume"


def test_s3_overlay_keeps_shards_checkpoints_and_artifacts_in_the_bucket_and_mounts_no_shared_volume():
    objects = deployment("s3")
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]  # raw data for the one preprocess pod
    env_cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "unet-dist-env")
    assert env_cm["data"]["AWS_ENDPOINT_URL"].startswith("http") and env_cm["data"]["AWS_REGION"]
    assert "unet-dist-s3" in external_secrets()
    trainers = 0
    for obj in objects:
        commands = " ".join(command_strings(obj))
        for _, spec in pod_specs(obj):
            for c in containers(spec):
                if "unet-dist" not in c["image"] or c["name"] in ("ray-job-submitter", "serve"):
                    continue  # the model server reads the model through MLflow, which proxies the bucket
                secrets = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
                assert "unet-dist-s3" in secrets, f"{where(obj)}: {c['name']} lacks the S3 credentials"
                claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
                if obj["kind"] in ("RayJob", "TrainingRuntime", "PyTorchJob", "Deployment"):
                    assert not claims, f"{where(obj)}: {c['name']} mounts a volume claim"
                    trainers += obj["kind"] != "Deployment"
        if "unet_dist.train" in commands or "unet_dist.preprocess" in commands:
            assert "shards.dir=s3://" in commands, where(obj)
        if "unet_dist.train" in commands:
            assert "train.checkpoint_dir=s3://" in commands, where(obj)
    assert trainers >= 5  # Ray head + workers, the TrainingRuntime's node, PyTorchJob master + worker


def test_gpu_overlay_requests_gpus_and_cpu_smoke_requests_none():
    def gpus(overlay):
        total = {}
        for obj in deployment(overlay):
            for _, v in walk(obj):
                if isinstance(v, dict) and "limits" in v and isinstance(v["limits"], dict) and "nvidia.com/gpu" in v["limits"]:
                    total[obj["kind"]] = total.get(obj["kind"], 0) + int(v["limits"]["nvidia.com/gpu"])
        return total

    assert gpus("cpu-smoke") == {}
    gpu = gpus("gpu")
    assert set(gpu) == {"RayJob", "TrainJob", "TrainingRuntime", "PyTorchJob"}, gpu
    by_kind = {o["kind"]: o for o in deployment("gpu")}
    ray = by_kind["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    ray_gpus = ray["replicas"] * int(ray["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    trainer = by_kind["TrainJob"]["spec"]["trainer"]
    trainjob_gpus = trainer["numNodes"] * int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    assert trainer["numProcPerNode"] == int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    pt = by_kind["PyTorchJob"]["spec"]
    pt_gpus = sum(rs["replicas"] * int(rs["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                  for rs in pt["pytorchReplicaSpecs"].values())
    from unet_dist.config import load_config

    workers = load_config(REPO / "jobs" / "configs" / "cityscapes.yaml").train.workers
    assert ray_gpus == trainjob_gpus == pt_gpus == workers, (ray_gpus, trainjob_gpus, pt_gpus, workers)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_the_image_that_the_image_component_names(overlay):
    """One image for every role but PostgreSQL. A container added by a patch that runs after the
    image component keeps a bare `unet-dist`, which a node would try to pull from Docker Hub."""
    (entry,) = yaml.safe_load((K8S / "components" / "image" / "kustomization.yaml").read_text())["images"]
    ours = f"{entry['newName']}:{entry['newTag']}"
    for obj in deployment(overlay):
        for _, spec in pod_specs(obj):
            for c in containers(spec):
                assert c["image"] == ours or c["image"].startswith("postgres:"), \
                    f"{where(obj)}: container {c['name']} runs {c['image']}, not {ours}"


def test_dockerfile_builds_a_non_root_image_with_pinned_dependencies():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest"), f"pin the base image: {base}"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root USER"
    assert users[-1].split(":")[0] in (str(UID), "app")
    assert re.search(rf"useradd[^\n]*--uid {UID}", text)
    assert re.search(r"pip install[^\n]*-c constraints\.txt", text)
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "data", "shards", "runs", "mlruns"} <= ignored
    assert "jobs" not in ignored and "unet_dist" not in ignored


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_preprocess_job_waits_for_real_data_but_not_for_synthetic(overlay):
    job = next(o for o in deployment(overlay) if o["kind"] == "Job" and o["metadata"]["name"] == "unet-preprocess")
    assert job["spec"]["suspend"] is (overlay != "cpu-smoke")
    init = job["spec"]["template"]["spec"].get("initContainers", [])
    if overlay == "cpu-smoke":  # the synthetic data is written first, to the config's data.root
        assert [c["command"][-1] for c in init] == ["unet_dist.synth"]
        assert "/mnt/shared/data/synth" in init[0]["args"]
    else:
        assert not init


@pytest.mark.parametrize("overlay", SHARED_VOLUME)
def test_sweep_rayjob_is_the_training_cluster_with_pods_labelled_tune(overlay):
    (train,) = [o for o in render(f"overlays/{overlay}/ray") if o["kind"] == "RayJob"]
    (sweep,) = [o for o in render(f"overlays/{overlay}/tune") if o["kind"] == "RayJob"]
    assert sweep["metadata"]["name"] != train["metadata"]["name"]
    assert sweep["spec"]["entrypoint"].startswith("python -m unet_dist.tune --config ")
    assert "--search /app/jobs/sweeps/" in sweep["spec"]["entrypoint"]
    labels = [(t.get("metadata") or {}).get("labels", {}) for _, t in pod_templates(sweep)]
    assert len(labels) == 3 and all(lab["app.kubernetes.io/component"] == "tune" for lab in labels)

    def without_labels(spec):
        return yaml.safe_load(re.sub(r"app\.kubernetes\.io/component: \w+", "", yaml.safe_dump(spec)))

    assert without_labels(sweep["spec"]["rayClusterSpec"]) == without_labels(train["spec"]["rayClusterSpec"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_batch_rayjob_is_the_training_cluster_with_pods_labelled_batch(overlay):
    (train,) = [o for o in render(f"overlays/{overlay}/ray") if o["kind"] == "RayJob"]
    (batch,) = [o for o in render(f"overlays/{overlay}/batch") if o["kind"] == "RayJob"]
    assert batch["metadata"]["name"] == "unet-batch-predict-ray" != train["metadata"]["name"]
    argv = batch["spec"]["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "unet_dist.batch_predict"]
    from unet_dist import batch_predict

    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": MLFLOW_URI}):  # what runtimeEnvYAML gives the job
        args = batch_predict.parse(argv[3:])
    assert args.model.startswith("models:/") and args.input != args.out
    if overlay == "s3":
        assert args.input.startswith("s3://") and args.out.startswith("s3://")
    else:
        assert args.input.startswith("/mnt/shared/") and args.out.startswith("/mnt/shared/")
    labels = [(t.get("metadata") or {}).get("labels", {}) for _, t in pod_templates(batch)]
    assert len(labels) == 3 and all(lab["app.kubernetes.io/component"] == "batch" for lab in labels)

    def without_labels(spec):
        return yaml.safe_load(re.sub(r"app\.kubernetes\.io/component: \w+", "", yaml.safe_dump(spec)))

    assert without_labels(batch["spec"]["rayClusterSpec"]) == without_labels(train["spec"]["rayClusterSpec"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_server_serves_the_registered_model_from_mlflow_with_probes(overlay):
    from unet_dist.config import load_config

    objects = deployment(overlay)
    server = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "unet-serve")
    template = server["spec"]["template"]
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "serve"
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "unet-dist"
    (c,) = template["spec"]["containers"]
    script = " ".join(command_strings(server))
    assert "mlflow models serve" in script and "--env-manager local" in script and "--host 0.0.0.0" in script
    env = {e["name"]: e.get("value") for e in c["env"]}
    config = "smoke.yaml" if overlay == "cpu-smoke" else "cityscapes.yaml"
    registered = load_config(REPO / "jobs" / "configs" / config).mlflow.registered_model
    assert env["MODEL_URI"].startswith(f"models:/{registered}/"), (env["MODEL_URI"], registered)
    assert {e["configMapRef"]["name"] for e in c["envFrom"]} == {"unet-dist-env"}  # MLFLOW_TRACKING_URI
    assert int(env["UNET_SERVE_MAX_PIXELS"]) > 0
    assert c["readinessProbe"]["httpGet"]["path"] == "/ping" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/home/app"}
    svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "unet-serve")
    assert svc["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    port = next(p for p in c["ports"] if p["name"] == svc["spec"]["ports"][0]["targetPort"])
    assert f"--port {port['containerPort']}" in script
