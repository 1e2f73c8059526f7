"""The shared-gpu kit passes Kueue's admission: every job queues, and the rules Kueue v0.19.2's
webhooks enforce (tests/crds/SOURCES.md, "Kueue") hold for every rendered job.

Each rule is a function that returns what breaks it in one object; each is run on the rendered
deployment (it must find nothing) and on a copy of a rendered job broken on purpose (it must find
the break), so a rule that can no longer fail is caught too. Schema validation of the Kueue and
PodMonitor objects is in tests/test_k8s_crds.py (every kustomization, against the vendored CRDs).
"""
from __future__ import annotations

import copy

import pytest

from test_k8s import CLUSTER_KITS, deployment, pod_specs, render, where

QUEUED = ("shared-gpu",)  # the overlays with k8s/components/kueue
JOB_KINDS = {"RayJob", "TrainJob", "PyTorchJob", "Job"}
QUEUE_LABEL, PRIORITY_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"
MAX_POD_SETS = 18  # jobframework.MaxPodSets
COUNTED = ("cpu", "memory")


def jobs(overlay: str) -> list[dict]:
    return [o for o in deployment(overlay) if o["kind"] in JOB_KINDS]


def cluster_objects() -> list[dict]:
    return [o for rel in CLUSTER_KITS for o in render(rel)]


# ---------------------------------------------------------------------------------------- the rules
def queue_label(job: dict, objects: list[dict]) -> list[str]:
    """The job names a LocalQueue of the deployment (Kueue manages only labelled jobs)."""
    queues = {o["metadata"]["name"] for o in objects if o["kind"] == "LocalQueue"}
    name = job["metadata"].get("labels", {}).get(QUEUE_LABEL)
    return [] if name in queues else [f"{where(job)}: {QUEUE_LABEL}={name!r} names no LocalQueue of {sorted(queues)}"]


def priority_class(job: dict, objects: list[dict]) -> list[str]:
    """An optional priority label names a WorkloadPriorityClass of the cluster kit."""
    classes = {o["metadata"]["name"] for o in cluster_objects() if o["kind"] == "WorkloadPriorityClass"}
    name = job["metadata"].get("labels", {}).get(PRIORITY_LABEL)
    return [] if name is None or name in classes else [f"{where(job)}: {PRIORITY_LABEL}={name!r} is not defined"]


def own_cluster(job: dict, objects: list[dict]) -> list[str]:
    """RayJob: a rayClusterSpec and no clusterSelector ("should not use an existing cluster";
    neither: "rayClusterSpec is required")."""
    if job["kind"] != "RayJob":
        return []
    spec = job["spec"]
    if spec.get("clusterSelector") and spec.get("rayClusterSpec") is not None:
        return [f"{where(job)}: clusterSelector with a rayClusterSpec: a kueue managed job should not use an existing cluster"]
    if spec.get("rayClusterSpec") is None:
        return [f"{where(job)}: rayClusterSpec is required for Kueue-managed jobs"]
    return []


def shutdown_after_finish(job: dict, objects: list[dict]) -> list[str]:
    """RayJob: shutdownAfterJobFinishes true (a finished job's cluster would hold the quota)."""
    if job["kind"] == "RayJob" and job["spec"].get("shutdownAfterJobFinishes") is not True:
        return [f"{where(job)}: shutdownAfterJobFinishes must be true"]
    return []


def no_autoscaling(job: dict, objects: list[dict]) -> list[str]:
    """RayJob: enableInTreeAutoscaling not true (Kueue admits a fixed gang)."""
    if job["kind"] == "RayJob" and (job["spec"].get("rayClusterSpec") or {}).get("enableInTreeAutoscaling") is True:
        return [f"{where(job)}: enableInTreeAutoscaling must not be true"]
    return []


def pod_set_count(job: dict, objects: list[dict]) -> list[str]:
    """RayJob: head + worker groups at most 18 PodSets."""
    if job["kind"] != "RayJob":
        return []
    n = 1 + len(job["spec"]["rayClusterSpec"].get("workerGroupSpecs", []))
    return [] if n <= MAX_POD_SETS else [f"{where(job)}: {n} PodSets, at most {MAX_POD_SETS}"]


def no_group_named_head(job: dict, objects: list[dict]) -> list[str]:
    """RayJob: no worker group named `head` (the head's PodSet has that name)."""
    if job["kind"] != "RayJob":
        return []
    names = [g["groupName"] for g in job["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])]
    return [f"{where(job)}: a worker group is named head"] if "head" in names else []


def counted_requests(job: dict, objects: list[dict]) -> list[str]:
    """Every container Kueue counts states its cpu and memory requests (GPU requests = limits)."""
    problems = []
    if job["kind"] == "TrainJob":  # its pods come from the runtime; the TrainJob's own resources win
        res = job["spec"]["trainer"].get("resourcesPerNode", {})
        if not set(COUNTED) <= set(res.get("requests", {})):
            problems.append(f"{where(job)}: trainer.resourcesPerNode lacks requests for {COUNTED}")
    for path, spec in pod_specs(job):
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            res = c.get("resources") or {}
            missing = set(COUNTED) - set(res.get("requests") or {})
            if missing:
                problems.append(f"{where(job)} {'.'.join(map(str, path))}: {c['name']} requests no {sorted(missing)}")
            gpu = [(res.get(p) or {}).get("nvidia.com/gpu") for p in ("requests", "limits")]
            if gpu[1] is not None and gpu[0] != gpu[1]:
                problems.append(f"{where(job)}: {c['name']} GPU requests must equal limits")
    return problems


def _break_label(o):
    o["metadata"]["labels"][QUEUE_LABEL] = "no-such-queue"


def _break_priority(o):
    o["metadata"]["labels"][PRIORITY_LABEL] = "urgent"


def _break_selector(o):
    o["spec"]["clusterSelector"] = {"ray.io/cluster": "shared"}


def _break_shutdown(o):
    o["spec"]["shutdownAfterJobFinishes"] = False


def _break_autoscaling(o):
    o["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = True


def _break_pod_sets(o):
    group = o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    o["spec"]["rayClusterSpec"]["workerGroupSpecs"] = [{**group, "groupName": f"g{i}"} for i in range(MAX_POD_SETS)]


def _break_head(o):
    o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] = "head"


def _break_requests(o):
    o["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"].pop("requests")


# rule -> (check, how to break it in the training RayJob)
RULES = {
    "queue label names a LocalQueue": (queue_label, _break_label),
    "priority class is defined": (priority_class, _break_priority),
    "RayJob brings its own cluster": (own_cluster, _break_selector),
    "RayJob shuts its cluster down": (shutdown_after_finish, _break_shutdown),
    "RayJob has no in-tree autoscaling": (no_autoscaling, _break_autoscaling),
    "RayJob has at most 18 PodSets": (pod_set_count, _break_pod_sets),
    "RayJob has no worker group named head": (no_group_named_head, _break_head),
    "counted containers request cpu and memory": (counted_requests, _break_requests),
}


@pytest.mark.parametrize("overlay", QUEUED)
@pytest.mark.parametrize("rule", RULES)
def test_every_job_passes_the_kueue_rule(overlay, rule):
    check, _ = RULES[rule]
    objects = deployment(overlay)
    found = jobs(overlay)
    assert {o["kind"] for o in found} == JOB_KINDS, "the RayJobs, TrainJob, PyTorchJob and preprocess Job"
    assert not [e for job in found for e in check(job, objects)]


@pytest.mark.parametrize("rule", RULES)
def test_the_kueue_rule_check_fails_on_a_job_that_breaks_it(rule):
    check, breaks = RULES[rule]
    objects = deployment("shared-gpu")
    (ray,) = [o for o in objects if o["kind"] == "RayJob" and o["metadata"]["name"] == "unet-train-ray"]
    broken = copy.deepcopy(ray)
    breaks(broken)
    assert not check(ray, objects) and check(broken, objects), rule


def test_without_a_cluster_spec_a_queued_rayjob_is_refused():
    ray = copy.deepcopy(next(o for o in deployment("shared-gpu") if o["kind"] == "RayJob"))
    del ray["spec"]["rayClusterSpec"]
    assert own_cluster(ray, []) == [f"{where(ray)}: rayClusterSpec is required for Kueue-managed jobs"]


def test_training_outranks_the_sweep_and_preprocessing_waits_in_a_held_queue():
    objects = deployment("shared-gpu")
    labels = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objects if o["kind"] in JOB_KINDS}
    value = {o["metadata"]["name"]: o["value"] for o in cluster_objects() if o["kind"] == "WorkloadPriorityClass"}
    assert value[labels["unet-train-ray"][PRIORITY_LABEL]] > value[labels["unet-tune-ray"][PRIORITY_LABEL]]
    queues = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "LocalQueue"}
    assert queues[labels["unet-preprocess"][QUEUE_LABEL]].get("stopPolicy") == "Hold"
    assert all(queues[lab[QUEUE_LABEL]].get("stopPolicy", "None") == "None"
               for name, lab in labels.items() if name != "unet-preprocess")
    # deleting a launcher to relaunch it keeps the queues and the PodMonitors
    for app in ("ray", "trainjob", "pytorchjob", "tune"):
        assert not [where(o) for o in render(f"overlays/shared-gpu/{app}")
                    if o["kind"] in ("LocalQueue", "PodMonitor", "NetworkPolicy")], app


def test_the_cluster_queue_covers_what_the_jobs_request_and_each_gang_fits_its_quota():
    """Every resource a job requests is covered by the ClusterQueue, and the largest job's GPU
    gang fits the queue's own quota plus what it may borrow (else it would wait for ever)."""
    cq = next(o for o in cluster_objects() if o["kind"] == "ClusterQueue")
    flavors = {o["metadata"]["name"] for o in cluster_objects() if o["kind"] == "ResourceFlavor"}
    [group] = cq["spec"]["resourceGroups"]
    assert {f["name"] for f in group["flavors"]} <= flavors
    quota = {r["name"]: r for f in group["flavors"] if f["name"] == "gpu-nodes" for r in f["resources"]}
    limit = quota["nvidia.com/gpu"]["nominalQuota"] + quota["nvidia.com/gpu"].get("borrowingLimit", 0)
    for job in jobs("shared-gpu"):
        for _, spec in pod_specs(job):
            for c in spec["containers"]:
                requests = (c.get("resources") or {}).get("requests") or {}
                assert set(requests) <= set(group["coveredResources"]), (where(job), requests)
        assert gang_gpus(job) <= limit, (where(job), gang_gpus(job), limit)
    assert max(gang_gpus(job) for job in jobs("shared-gpu")) == 8
    assert cq["spec"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "unet-dist"


def gang_gpus(job: dict) -> int:
    """The GPUs a job's pods request together (what Kueue admits at once)."""
    def per_pod(template: dict) -> int:
        return sum(int(((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu", 0))
                   for c in template["spec"]["containers"])

    spec = job["spec"]
    if job["kind"] == "RayJob":
        groups = spec["rayClusterSpec"]["workerGroupSpecs"]
        return per_pod(spec["rayClusterSpec"]["headGroupSpec"]["template"]) + \
            sum(g["replicas"] * per_pod(g["template"]) for g in groups)
    if job["kind"] == "TrainJob":
        return spec["trainer"]["numNodes"] * int(spec["trainer"]["resourcesPerNode"]["requests"].get("nvidia.com/gpu", 0))
    if job["kind"] == "PyTorchJob":
        return sum(rs["replicas"] * per_pod(rs["template"]) for rs in spec["pytorchReplicaSpecs"].values())
    return spec.get("parallelism", 1) * per_pod(spec["template"])
