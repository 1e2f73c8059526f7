"""The cluster kit is locked: restricted pods, a closed network, authenticated Ray and MLflow.

Rendered with the real `kubectl kustomize` (see test_k8s.py). The Pod Security rules are the
"restricted" profile as Kubernetes documents it (kubernetes.io/docs/concepts/security/
pod-security-standards), baseline rules included; the NetworkPolicies are evaluated with the
NetworkPolicy semantics (a pod selected by any Ingress policy accepts only what some policy
allows) over every pair of pod roles, and compared with the allow-list in both directions.
"""
from __future__ import annotations

import itertools
import re

import pytest
import yaml

from test_k8s import OVERLAYS, containers, deployment, external_secrets, pod_templates, walk, where

COMPONENTS = {"mlflow", "postgres", "train", "evaluate", "serve", "preprocess", "tune", "batch"}
# Volume types the restricted profile allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
MLFLOW_CLIENTS = {"train", "tune", "batch", "evaluate", "serve"}


def restricted_violations(spec: dict) -> list[str]:
    """What keeps a pod spec from the restricted Pod Security level (empty: it is admitted)."""
    out = []
    for key in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        if spec.get(key) is (key != "hostUsers"):
            out.append(f"{key}: {spec[key]}")
    psc = spec.get("securityContext") or {}
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: type {sorted(kinds - RESTRICTED_VOLUMES)} is not allowed")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {s['name']}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for c in containers(spec) + spec.get("ephemeralContainers", []):
        csc, name = c.get("securityContext") or {}, c["name"]
        if csc.get("privileged"):
            out.append(f"{name}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = csc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        if (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))) is not True:
            out.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if csc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, is {seccomp}")
        se_type = (csc.get("seLinuxOptions") or psc.get("seLinuxOptions") or {}).get("type")
        if se_type not in (None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
            out.append(f"{name}: seLinuxOptions.type {se_type}")
        if csc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {csc['procMount']}")
        apparmor = (csc.get("appArmorProfile") or psc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{name}: appArmorProfile {apparmor}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
    return out


def all_pod_templates(overlay: str):
    for obj in deployment(overlay):
        for path, template in pod_templates(obj):
            yield obj, path, template


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_enforces_restricted_pod_security(overlay):
    ns = next(o for o in deployment(overlay) if o["kind"] == "Namespace")
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels.get("pod-security.kubernetes.io/warn", "restricted") == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_template_meets_the_restricted_profile(overlay):
    problems, checked = [], 0
    for obj, path, template in all_pod_templates(overlay):
        checked += 1
        problems += [f"{where(obj)} {'.'.join(map(str, path))}: {p}" for p in restricted_violations(template["spec"])]
    assert checked >= 9, checked  # mlflow, postgres, preprocess, 3 Ray, 2 PyTorchJob, 1 runtime
    assert not problems, "\n".join(problems)


def test_the_restricted_check_rejects_what_the_api_server_rejects():
    """Guards the checker: each change below makes a compliant pod non-compliant."""
    obj, _, template = next(all_pod_templates("cpu-smoke"))
    assert not restricted_violations(template["spec"])
    breaks = {
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        "escalation": lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "caps": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "seccomp": lambda s: s["securityContext"].pop("seccompProfile"),
        "nonroot": lambda s: s["securityContext"].pop("runAsNonRoot"),
        "hostPort": lambda s: s["containers"][0].setdefault("ports", []).append({"containerPort": 1, "hostPort": 1}),
    }
    for name, brk in breaks.items():
        spec = yaml.safe_load(yaml.safe_dump(template["spec"]))
        brk(spec)
        assert restricted_violations(spec), f"{name} was not caught"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_root_filesystems_are_read_only_with_writable_tmp_and_home(overlay):
    problems = []
    for obj, path, template in all_pod_templates(overlay):
        spec = template["spec"]
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        claims = {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])}
        for c in containers(spec):
            at = f"{where(obj)} {c['name']}"
            if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem must be true")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if mounts.get("/tmp") not in empty_dirs:
                problems.append(f"{at}: /tmp must be a writable emptyDir")
            if "unet-dist" in c["image"] and mounts.get("/home/app") not in empty_dirs:
                problems.append(f"{at}: $HOME (/home/app) must be a writable emptyDir")
            if c["image"].startswith("postgres"):
                if mounts.get("/var/run/postgresql") not in empty_dirs or not set(mounts.values()) & claims:
                    problems.append(f"{at}: PostgreSQL needs its socket dir and data volume writable")
    assert not problems, "\n".join(problems)


# --- NetworkPolicies -----------------------------------------------------------------------------

def matches(selector: dict | None, labels: dict) -> bool:
    """Label selector semantics (matchLabels AND matchExpressions; {} matches everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        value, op = labels.get(e["key"]), e["operator"]
        if op == "In" and value not in e["values"] or op == "NotIn" and value in e["values"]:
            return False
        if op == "Exists" and e["key"] not in labels or op == "DoesNotExist" and e["key"] in labels:
            return False
    return True


def peer_allows(peer: dict, src: dict) -> bool:
    """One `from` entry: podSelector alone = this namespace; with namespaceSelector = those namespaces."""
    if "ipBlock" in peer:
        return False  # pod-to-pod flows only
    same_ns = src["namespace"] == "unet-dist"
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], src["namespace_labels"]):
            return False
    elif not same_ns:
        return False
    return matches(peer.get("podSelector"), src["labels"]) if "podSelector" in peer else True


def allowed(policies: list[dict], src: dict, dst_labels: dict, port: tuple[str, int]) -> bool:
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and matches(p["spec"]["podSelector"], dst_labels)]
    if not selecting:
        return True  # not isolated
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            from_ok = "from" not in rule or any(peer_allows(peer, src) for peer in rule["from"])
            ports = rule.get("ports")
            port_ok = not ports or any(p.get("port") in (port[0], port[1]) and p.get("protocol", "TCP") == "TCP"
                                       for p in ports)
            if from_ok and port_ok:
                return True
    return False


def pod(component: str | None, namespace: str = "unet-dist", **extra) -> dict:
    labels = {"app.kubernetes.io/name": "unet-dist", "app.kubernetes.io/component": component} if component else {}
    labels.update(extra)
    return {"labels": labels, "namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace}}


# Each role's pods and the ports they listen on (name, number).
RAY_PORTS = [("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("", 29500), ("", 23456), ("", 40000),
             ("metrics", 8080), ("metrics", 9400)]  # metrics: Ray's agent, torchrun's rank 0
DESTINATIONS = {
    "train-head": (pod("train", **{"ray.io/node-type": "head"}), RAY_PORTS),
    "train-worker": (pod("train", **{"ray.io/node-type": "worker"}), RAY_PORTS),
    "tune-head": (pod("tune", **{"ray.io/node-type": "head"}), RAY_PORTS),
    "tune-worker": (pod("tune", **{"ray.io/node-type": "worker"}), RAY_PORTS),
    "batch-head": (pod("batch", **{"ray.io/node-type": "head"}), RAY_PORTS),
    "batch-worker": (pod("batch", **{"ray.io/node-type": "worker"}), RAY_PORTS),
    "mlflow": (pod("mlflow"), [("http", 5000), ("", 8080)]),
    "postgres": (pod("postgres"), [("postgres", 5432), ("", 8080)]),
    "serve": (pod("serve"), [("http", 8080), ("metrics", 9090)]),
    "evaluate": (pod("evaluate"), [("", 8080)]),
    "preprocess": (pod("preprocess"), [("", 8080)]),
}
SOURCES = {
    **{c: pod(c) for c in COMPONENTS},
    "unlabelled pod in the namespace": pod(None),
    "pod in another namespace": pod("train", namespace="other"),
    "kuberay-operator": pod(None, namespace="ray-system", **{"app.kubernetes.io/name": "kuberay-operator"}),
    "prometheus": pod(None, namespace="monitoring", **{"app.kubernetes.io/name": "prometheus"}),
}
SCRAPED = ("shared-gpu",)  # the overlays with k8s/components/monitoring/scrape


def expected(src: str, dst: str, port: tuple[str, int], overlay: str) -> bool:
    """The allow-list of docs/security.md, written independently of the policies."""
    role = dst.split("-")[0]
    if src == "prometheus" and role in ("train", "tune"):
        return overlay in SCRAPED and port[0] == "metrics"
    if role in ("train", "tune", "batch") and src == role:
        return True  # Ray, NCCL/gloo, rendezvous: any port between a job's own pods
    if dst == "mlflow":
        return src in MLFLOW_CLIENTS and port[1] == 5000
    if dst == "postgres":
        return src == "mlflow" and port[1] == 5432
    if dst == "serve":
        return port[0] == "http"  # from anywhere
    if dst in ("train-head", "tune-head", "batch-head") and src == "kuberay-operator":
        return port[1] == 8265
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_listed_flows(overlay):
    policies = [o for o in deployment(overlay) if o["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), "no default deny"
    wrong = []
    for (src, src_pod), (dst, (dst_pod, ports)) in itertools.product(SOURCES.items(), DESTINATIONS.items()):
        for port in ports:
            want, got = expected(src, dst, port, overlay), allowed(policies, src_pod, dst_pod["labels"], port)
            if want != got:
                wrong.append(f"{src} -> {dst}:{port[0] or port[1]}: {'allowed' if got else 'denied'}, should be "
                             f"{'allowed' if want else 'denied'}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_carries_a_component_label_the_policies_know(overlay):
    for obj, path, template in all_pod_templates(overlay):
        labels = (template.get("metadata") or {}).get("labels") or {}
        assert labels.get("app.kubernetes.io/name") == "unet-dist", f"{where(obj)}: {labels}"
        assert labels.get("app.kubernetes.io/component") in COMPONENTS, f"{where(obj)}: {labels}"
    # The ports the policies open are the ports the pods listen on.
    by_component = {}
    for obj, _, template in all_pod_templates(overlay):
        comp = template["metadata"]["labels"]["app.kubernetes.io/component"]
        for c in template["spec"]["containers"]:
            by_component.setdefault(comp, set()).update(p["containerPort"] for p in c.get("ports", []))
    assert 5000 in by_component["mlflow"] and 5432 in by_component["postgres"]


# --- Authentication --------------------------------------------------------------------------------

def secret_ref(env: list[dict], name: str) -> str | None:
    for e in env:
        if e["name"] == name:
            return ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_require_a_token_from_an_external_secret(overlay):
    jobs = [o for o in deployment(overlay) if o["kind"] in ("RayJob", "RayCluster")]
    assert jobs
    for job in jobs:
        cluster = job["spec"].get("rayClusterSpec", job["spec"])
        auth = cluster.get("authOptions") or {}
        assert auth.get("mode") == "token", f"{where(job)}: authOptions.mode must be token"
        assert auth.get("secretName") in external_secrets(), f"{where(job)}: token Secret not in k8s/EXTERNAL_SECRETS"
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
        assert not [k for k in runtime_env.get("env_vars", {}) if k.startswith("RAY_AUTH")], where(job)
        for path, v in walk(job):
            if isinstance(v, dict) and str(v.get("name", "")).startswith("RAY_AUTH"):
                pytest.fail(f"{where(job)}: sets {v['name']} itself; KubeRay injects it from the Secret")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_runs_basic_auth_with_admin_and_auth_store_from_secrets(overlay):
    server = next(o for o in deployment(overlay) if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    container = server["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["args"])
    assert "--app-name basic-auth" in script
    ini = re.search(r"MLFLOW_AUTH_CONFIG_PATH=(\S+)", script).group(1)
    assert ini.startswith("/tmp/") and f"> {ini}" in script and "umask 077" in script
    assert re.search(r"database_uri = %s.*\"postgresql://\$\{POSTGRES_USER\}:\$\{POSTGRES_PASSWORD\}@mlflow-postgres:5432/", script)
    env = container["env"]
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                 "POSTGRES_PASSWORD"):
        assert secret_ref(env, name) in external_secrets(), f"{name} must come from a listed Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mlflow_client_pod_logs_in_with_credentials_from_a_secret(overlay):
    checked = 0
    for obj, path, template in all_pod_templates(overlay):
        if template["metadata"]["labels"]["app.kubernetes.io/component"] not in MLFLOW_CLIENTS:
            continue
        for c in template["spec"]["containers"]:
            if c["name"] == "ray-job-submitter":  # only talks to the Ray job server
                continue
            env = c.get("env", [])
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert secret_ref(env, name) in external_secrets(), f"{where(obj)} {c['name']}: {name}"
            checked += 1
    assert checked >= 5  # Ray head + workers, PyTorchJob Master + Worker, TrainingRuntime node
