"""`metaopt submit --k8s`: the KubeRay RayJob a job spec becomes, checked without a cluster
(none runs here): its pod templates against Kubernetes' own schemas, its entrypoint by running
the part that rebuilds the spec."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from metaopt.jobspec import JobSpecError, load_job_spec
from tests.k8s_validation import validate_objects

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "metaopt.cli", "submit"]


def dry_run(*args: str) -> dict:
    done = subprocess.run([*CLI, str(DATA / "e2e.yaml"), "--k8s", "--dry-run", "--job-id", "e2e-7", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rayjob = yaml.safe_load(done.stdout)
    validate_objects([rayjob])  # strictly, against KubeRay's CRD and the pod templates' schema
    return rayjob


def pod_templates(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"].get("rayClusterSpec")
    if cluster is None:
        return []
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def validate_pod_template(template: dict) -> None:
    """Kubernetes' schema for a pod template, strict (unknown fields refused)."""
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": template}, kubernetes_validate.latest_version(), strict=True)


def test_a_rayjob_brings_its_own_cluster_sized_by_the_spec():
    image = "registry.example/metaopt:cuda"
    job = dry_run("--image", image, "--namespace", "meta", "--env-secret", "s3-creds")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"] == "e2e-7" and job["metadata"]["namespace"] == "meta"
    assert job["metadata"]["labels"]["metaopt.io/job-id"] == "e2e-7"
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert len(workers) == 1 and workers[0]["replicas"] == workers[0]["maxReplicas"] == 2  # e2e.yaml
    for template in pod_templates(job):
        validate_pod_template(template)
        container = template["spec"]["containers"][0]
        assert container["image"] == image
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert container["securityContext"]["runAsNonRoot"] is True


def test_gpu_workers_ask_for_whole_gpus_and_an_existing_cluster_gets_no_cluster_spec(tmp_path):
    spec = yaml.safe_load((DATA / "e2e.yaml").read_text())
    spec["workers"] = {"count": 3, "cpus": 1.5, "gpus": 0.5}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run([*CLI, str(path), "--k8s", "--dry-run", "--image", "img"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resources = yaml.safe_load(done.stdout)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    limits = resources["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and limits["cpu"] == "1500m"
    validate_pod_template(resources)

    on_chart = dry_run("--image", "img", "--cluster", "meta-raycluster")
    assert on_chart["spec"]["clusterSelector"] == {"ray.io/cluster": "meta-raycluster"}
    assert "rayClusterSpec" not in on_chart["spec"] and "shutdownAfterJobFinishes" not in on_chart["spec"]


def test_the_entrypoint_carries_the_spec_as_validated_and_no_shell_syntax():
    """KubeRay pastes the entrypoint unquoted into its submitter's shell command (`... ray job
    submit ... -- ENTRYPOINT ; fi`): a pipe or && in it would run in that shell, not in the job."""
    entrypoint = dry_run("--image", "img")["spec"]["entrypoint"]
    words = entrypoint.split(" ")
    assert shlex.split(entrypoint) == words and not set(entrypoint) & set("|&;<>()$`\\\"'*?[]#~{}!")
    assert words[:2] == ["metaopt", "train"] and words[3:] == ["--job-id", "e2e-7", "--json"]
    assert load_job_spec(words[2]) == load_job_spec(DATA / "e2e.yaml")


def test_an_inline_spec_that_is_not_base64_of_yaml_is_refused():
    with pytest.raises(JobSpecError, match="the inline job spec is not base64 of YAML"):
        load_job_spec("base64:not*base64")


@pytest.mark.parametrize(("args", "code", "message"), [
    ((), 2, "--k8s needs --image"),
    (("--image", "img"), 1, "storage.root is not set"),  # e2e.yaml has none
])
def test_refusals_say_what_to_do(args, code, message):
    done = subprocess.run([*CLI, str(DATA / "e2e.yaml"), "--k8s", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code and message in done.stderr, done.stderr


def test_without_a_kubeconfig_the_error_says_so(tmp_path):
    spec = yaml.safe_load((DATA / "e2e.yaml").read_text())
    spec["storage"] = {"root": str(tmp_path / "store")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    done = subprocess.run([*CLI, str(path), "--k8s", "--image", "img"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 1 and "no Kubernetes configuration" in done.stderr, done.stderr
