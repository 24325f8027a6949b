"""Strict validation against the real CRDs (tests/crd_schemas.py): what the chart renders and
`metaopt submit --k8s --dry-run` prints is valid, a planted unknown field and a planted wrong type
in each kind are refused, the CEL rules left unchecked are the ones listed, and a missing CRD
folder skips (fails under CI=true)."""

from __future__ import annotations

import copy

import helm_python
import pytest

from tests import crd_schemas
from tests.test_helm_chart import CHART, LARGE, render
from tests.test_k8s_submit import dry_run

# (kind, rendered object's key, a field path to plant a wrong type at, and the planted value)
PLANTS = {
    "RayCluster": ("RayCluster/demo-raycluster", ("spec", "workerGroupSpecs", 0, "replicas"), "three"),
    "RayJob": ("RayJob/demo-workers", ("spec", "shutdownAfterJobFinishes"), "yes"),
    "ServiceMonitor": ("ServiceMonitor/demo-learner", ("spec", "endpoints", 0, "port"), 9090),
    "PodMonitor": ("PodMonitor/demo-raycluster", ("spec", "podMetricsEndpoints"), {"port": "metrics"}),
}

# The CEL rules of these CRDs (ray.io/v1, monitoring.coreos.com/v1), which no library here
# evaluates (half compare with oldSelf, which needs the object's previous version): each sits on a
# field the chart and `metaopt submit` never set, checked below, so none applies to their objects.
UNCHECKED_CEL = {"RayCluster": 3, "RayJob": 9, "ServiceMonitor": 0, "PodMonitor": 0}


@pytest.fixture(scope="module")
def rendered():
    with helm_python.Chart.load(CHART) as chart:
        yield render(chart, LARGE)


@pytest.fixture(scope="module")
def submitted():
    """What `metaopt submit --k8s --dry-run` prints (a RayJob)."""
    return dry_run("--image", "img")


def test_the_chart_and_a_dry_run_submit_are_valid_against_the_crds(rendered, submitted):
    objects = [obj for obj in rendered.values() if obj.get("kind") in crd_schemas.KINDS]
    assert sorted({obj["kind"] for obj in objects}) == sorted(crd_schemas.KINDS)
    objects.append(submitted)
    for obj in objects:
        assert crd_schemas.schema_problems(obj) == [], obj["kind"]


@pytest.mark.parametrize("kind", crd_schemas.KINDS)
def test_a_planted_unknown_field_and_a_planted_wrong_type_are_refused(rendered, kind):
    key, path, wrong = PLANTS[kind]
    unknown = copy.deepcopy(rendered[key])
    unknown["spec"]["replicaz"] = 3
    assert any("spec.replicaz: unknown field" in p for p in crd_schemas.schema_problems(unknown))
    typed = copy.deepcopy(rendered[key])
    node = typed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = wrong
    where = kind + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    problems = crd_schemas.schema_problems(typed)
    assert any(p.startswith(f"{where}: ") for p in problems), problems


def test_the_cel_rules_left_to_the_api_server_sit_on_fields_no_object_of_ours_sets(rendered, submitted):
    objects = [obj for obj in rendered.values() if obj.get("kind") in crd_schemas.KINDS]
    objects.append(submitted)
    for kind, count in UNCHECKED_CEL.items():
        rules = crd_schemas.cel_rules(kind, next(o["apiVersion"] for o in objects if o["kind"] == kind))
        assert len(rules) == count, rules
        for path in {rule.split(":")[0].split("[]")[0] for rule in rules}:
            for obj in (o for o in objects if o["kind"] == kind):
                node = obj
                for part in path.strip(".").split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                assert node is None, f"{kind} sets {path}, which a CEL rule checks: {rules}"


def test_without_the_crds_a_test_skips_and_under_ci_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(crd_schemas, "FOLDER", tmp_path)
    crd_schemas._load.cache_clear()
    try:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="strict CRD validation needs ../shared/k8s-crds/"):
            crd_schemas.crd("RayJob", "ray.io/v1")
        monkeypatch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception, match="the RayJob CRD is not at"):
            crd_schemas.crd("RayJob", "ray.io/v1")
    finally:
        crd_schemas._load.cache_clear()
