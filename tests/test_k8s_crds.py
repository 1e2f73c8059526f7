"""Every rendered custom resource validates against its operator's real CRD, pruning included.

The upstream CRDs are vendored in tests/crds/ (repository, tag and commit in tests/crds/SOURCES.md).
The API server prunes fields that a structural schema does not declare, silently: a typo or a
field from another operator version would be dropped without an error. So every object schema
that declares `properties` (and does not say `x-kubernetes-preserve-unknown-fields`) is closed
here with `additionalProperties: false`, and an unknown field fails the test with its path.
"""
from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from test_k8s import BUILT_IN, CLUSTER_KITS, kustomizations, render, where

CRDS = Path(__file__).resolve().parent / "crds"
CRD_FILES = sorted(p for p in CRDS.rglob("*.yaml"))


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the served version's openAPIV3Schema, closed against pruning."""
    out = {}
    for path in CRD_FILES:
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                out[(f"{group}/{version['name']}", kind)] = closed(version["schema"]["openAPIV3Schema"])
    return out


def closed(schema: dict) -> dict:
    """A JSON Schema equivalent of a structural CRD schema, with undeclared fields rejected."""
    schema = copy.deepcopy(schema)

    def visit(node, top: bool):
        if isinstance(node, list):
            for item in node:
                visit(item, False)
            return
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        if top:  # apiVersion, kind and metadata are checked by the API server itself
            node.setdefault("properties", {})
        for key, value in node.items():
            if key in ("properties", "patternProperties", "definitions"):
                for sub in value.values():
                    visit(sub, False)
            elif key in ("items", "additionalProperties", "not"):
                visit(value, False)
            elif key in ("allOf", "anyOf", "oneOf"):
                visit(value, False)

    visit(schema, True)
    return schema


def errors(obj: dict) -> list[str]:
    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft7Validator(schema, format_checker=None)
    return sorted(f"{where(obj)} at {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(obj))


def test_vendored_crds_cover_every_custom_kind_and_name_their_source():
    sources = (CRDS / "SOURCES.md").read_text()
    for folder in {p.parent.name for p in CRD_FILES}:
        assert folder in sources, f"tests/crds/{folder} is not described in tests/crds/SOURCES.md"
    rendered = {(o["apiVersion"], o["kind"]) for rel in kustomizations() for o in render(rel)
                if o["apiVersion"] not in BUILT_IN}
    assert rendered, "no custom resources rendered"
    assert rendered <= set(crd_schemas()), f"no vendored CRD for {rendered - set(crd_schemas())}"


def test_pruning_check_catches_an_unknown_field():
    """The closed schema rejects what the API server would drop (guards the checker itself)."""
    job = next(o for o in render("base/ray") if o["kind"] == "RayJob")
    assert not errors(job)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParamz"] = {}
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    found = errors(bad)
    assert any("rayStartParamz" in e for e in found) and any("imagePullPolicyy" in e for e in found), found


@pytest.mark.parametrize("rel", kustomizations())
def test_every_custom_resource_validates_against_its_crd_without_pruned_fields(rel):
    problems = [e for o in render(rel) if o["apiVersion"] not in BUILT_IN for e in errors(o)]
    assert not problems, "\n".join(problems)


def job_deadlines(obj: dict) -> list[int | None]:
    """The deadline(s) that stop a hung job of each kind, as its operator reads them."""
    spec = obj["spec"]
    if obj["kind"] in ("Job", "RayJob", "TrainJob"):  # TrainJob: Trainer >= 2.2
        return [spec.get("activeDeadlineSeconds")]
    if obj["kind"] == "PyTorchJob":
        return [spec.get("runPolicy", {}).get("activeDeadlineSeconds")]
    return []


@pytest.mark.parametrize("rel", [rel for rel in kustomizations() if not rel.endswith("serve") and rel not in CLUSTER_KITS])
def test_every_job_kind_has_a_deadline_so_a_hung_job_ends(rel):
    """Every kustomization but the model server's (a Deployment, meant to run on) starts a job."""
    jobs = [o for o in render(rel) if o["kind"] in ("Job", "RayJob", "PyTorchJob", "TrainJob")]
    assert jobs, f"k8s/{rel}: renders no job"
    for obj in jobs:
        for deadline in job_deadlines(obj):
            assert isinstance(deadline, int) and 600 <= deadline <= 7 * 86400, \
                f"k8s/{rel}: {where(obj)} needs activeDeadlineSeconds (10 min .. 7 days), has {deadline}"
