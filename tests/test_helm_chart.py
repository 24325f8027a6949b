"""The Helm chart (helm/metaopt), rendered and linted offline with Helm's own Go SDK
(helm-python-sdk), every object validated by tests/k8s_validation.py.

What "validated" means for the CRD kinds (RayCluster, RayJob, ServiceMonitor, PodMonitor):
strictly against their real CRDs' schemas (KubeRay v1.7.0-rc.0, Prometheus Operator 0.93.0, from
../shared/k8s-crds/; tests/crd_schemas.py), with their embedded pod templates validated as core
PodTemplates too. Built-in kinds are validated strictly against the Kubernetes schemas.
"""

from __future__ import annotations

import base64
import json
import pathlib
import shutil

import helm_python
import pytest
import yaml

from metaopt.jobspec import parse_job_spec
from tests.k8s_validation import object_problems, validate_objects

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "metaopt"
NAMESPACE = "ml"

# A large install: 256 GPU workers (fixed size), an external Redis, TLS, object storage.
LARGE = {
    "job": {"id": "big-1", "spec": {
        "name": "big", "workers": {"count": 256, "cpus": 4, "gpus": 1},
        "storage": {"root": "s3://ml-metaopt/metaopt"},
    }},
    "token": {"existingSecret": "big-1-token", "key": "bearer"},
    "learner": {
        "resources": {"requests": {"cpu": "16", "memory": "64Gi"}, "limits": {"cpu": "32", "memory": "64Gi"}},
        "tls": {"enabled": True, "existingSecret": "big-1-learner-tls", "workersSecret": "big-1-worker-tls",
                "serverName": "learner.big-1.ml.example.com"},
        "nodeSelector": {"node-pool": "cpu-highmem"},
    },
    "rayCluster": {"workers": {
        "replicas": 256, "minReplicas": 256, "maxReplicas": 256,
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    }, "autoscalerOptions": {"upscalingMode": "Aggressive", "idleTimeoutSeconds": 300},
        "gcsFaultTolerance": {"enabled": True, "redisAddress": "ray-gcs.data.svc.cluster.local:6379",
                              "redisUsername": "ray", "existingSecret": "ray-gcs-redis"}},
    "rayJob": {"extraArgs": ["--count", "240"]},
    "redis": {"bundled": {"enabled": False}, "external": {
        "url": "rediss://metaopt@redis.data.svc.cluster.local:6380/3",
        "existingSecret": "metaopt-redis", "passwordKey": "redis-password"}},
    "storage": {"existingSecret": "metaopt-s3", "endpointUrl": "https://minio.storage.svc:9000",
                "region": "us-east-1"},
    "metrics": {"serviceMonitor": {"labels": {"release": "prom-ml"}},
                "podMonitor": {"enabled": True, "labels": {"release": "prom-ml"}}},
    "grafana": {"dashboards": {"folder": "metaopt", "namespace": "monitoring"}},
}


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict | None = None, name: str = "demo") -> dict[str, dict]:
    """Rendered objects by 'Kind/name' (NOTES.txt under 'NOTES')."""
    manifests = chart.render(values or {}, name=name, namespace=NAMESPACE)
    objects: dict[str, dict] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            objects["NOTES"] = {"text": text}
            continue
        for obj in yaml.safe_load_all(text):
            if obj:
                key = f"{obj['kind']}/{obj['metadata']['name']}"
                assert key not in objects, f"{key} rendered twice"
                objects[key] = obj
    return objects


def k8s_objects(objects: dict[str, dict]) -> list[dict]:
    return [obj for key, obj in objects.items() if key != "NOTES"]


def containers(obj: dict) -> list[dict]:
    """Every container of an object's pod templates (Deployment, RayCluster, RayJob)."""
    spec = obj.get("spec", {})
    templates = [spec.get("template"), spec.get("submitterPodTemplate"),
                 spec.get("headGroupSpec", {}).get("template")]
    templates += [group["template"] for group in spec.get("workerGroupSpecs", [])]
    return [c for t in templates if t for c in t["spec"]["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", {})
    assert not selector.get("matchExpressions"), "these tests read matchLabels only"
    return all(labels.get(k) == v for k, v in match.items())


def pod_labels(objects: dict[str, dict]) -> dict[str, dict]:
    """Pod labels by role, as they will be on the pods (KubeRay adds ray.io/cluster)."""
    learner = objects["Deployment/demo-learner"]["spec"]["template"]["metadata"]["labels"]
    redis = objects["Deployment/demo-redis"]["spec"]["template"]["metadata"]["labels"]
    cluster = objects["RayCluster/demo-raycluster"]
    ray_head = {**cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"],
                "ray.io/cluster": "demo-raycluster", "ray.io/node-type": "head"}
    ray_worker = {**cluster["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"],
                  "ray.io/cluster": "demo-raycluster", "ray.io/node-type": "worker"}
    other_cluster = {**ray_worker, "ray.io/cluster": "other-raycluster"}
    return {"learner": learner, "redis": redis, "ray_head": ray_head, "ray_worker": ray_worker,
            "other_cluster": other_cluster, "cli": {"metaopt.io/redis-client": "true"},
            "stranger": {"app": "x"}}


# --- renders, lints and validates ------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, LARGE], ids=["default", "large"])
def test_renders_and_every_object_validates(chart, values):
    objects = render(chart, values)
    kinds = {obj["kind"] for obj in k8s_objects(objects)}
    assert {"ConfigMap", "Deployment", "Service", "RayCluster", "RayJob", "ServiceMonitor",
            "NetworkPolicy"} <= kinds
    validate_objects(k8s_objects(objects))


@pytest.mark.parametrize("values", [{}, LARGE], ids=["default", "large"])
def test_lints_cleanly_in_strict_mode(values):
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); 2 and 3 are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_a_long_release_name_still_gives_names_kuberay_accepts(chart):
    name = "a" * 53  # the longest release name Helm allows
    objects = render(chart, {}, name=name)
    validate_objects(k8s_objects(objects))  # RayJob <= 47 and RayCluster <= 53 characters
    job = next(o for o in objects.values() if o.get("kind") == "RayJob")
    cluster = next(o for o in objects.values() if o.get("kind") == "RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


def test_a_release_name_that_starts_with_a_digit_is_refused_with_a_remedy(chart):
    with pytest.raises(helm_python.HelmRenderError, match="starts with a digit.*fullnameOverride"):
        chart.render({}, name="7jobs", namespace=NAMESPACE)
    validate_objects(k8s_objects(render(chart, {"fullnameOverride": "jobs7"}, name="7jobs")))


# --- the learner, the RayCluster and the RayJob ----------------------------------------------

def test_the_learner_serves_the_job_with_grpc_probes_and_a_service(chart):
    objects = render(chart)
    deployment = objects["Deployment/demo-learner"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (learner,) = containers(deployment)
    assert learner["command"] == ["metaopt"]
    assert learner["args"][:2] == ["serve-learner", "/etc/metaopt/job.yaml"]
    assert {"--port=50051", "--metrics-port=9090", "--health-port=50052", "--job-id=demo", "--host=0.0.0.0",
            "--token-file=/var/run/metaopt/token/token"} <= set(learner["args"])
    assert not any(a.startswith("--tls") for a in learner["args"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert learner[probe]["grpc"] == {"port": 50052}  # the plaintext health port
    assert learner["resources"]["requests"] and learner["resources"]["limits"]
    assert learner["securityContext"]["readOnlyRootFilesystem"] is True
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    service = objects["Service/demo-learner"]
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("grpc", 50051), ("metrics", 9090)}
    learner_pod = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": service["spec"]["selector"]}, learner_pod)


def test_the_raycluster_has_a_cpu_head_and_one_gpu_per_worker_pod(chart):
    cluster = render(chart, LARGE, name="demo")["RayCluster/demo-raycluster"]["spec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    assert "nvidia.com/gpu" not in json.dumps(head["template"]["spec"]["containers"][0]["resources"])
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "gpu"
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (256, 256, 256)
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    version = chart.metadata["appVersion"]
    assert worker["image"] == f"ghcr.io/metaopt/metaopt:{version}-cuda"  # deploy/Dockerfile.cuda
    assert head["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/metaopt/metaopt:{version}"
    assert group["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Aggressive"
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    # Every Ray pod reads the job spec and the token where the entrypoint says.
    for container in (head["template"]["spec"]["containers"][0], worker):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/etc/metaopt"] == "job" and mounts["/var/run/metaopt/token"] == "token"
        assert mounts["/var/run/metaopt/tls"] == "tls"


def test_gcs_fault_tolerance_keeps_the_head_s_state_in_the_bundled_redis_or_the_one_named(chart):
    assert "gcsFaultToleranceOptions" not in render(chart)["RayCluster/demo-raycluster"]["spec"]
    bundled = render(chart, {"rayCluster": {"gcsFaultTolerance": {"enabled": True}}})
    validate_objects(k8s_objects(bundled))
    assert bundled["RayCluster/demo-raycluster"]["spec"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "demo-redis:6379", "redisUsername": {"value": "metaopt"},
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "demo-redis", "key": "password"}}}}
    named = render(chart, LARGE)["RayCluster/demo-raycluster"]["spec"]["gcsFaultToleranceOptions"]
    assert named == {
        "redisAddress": "ray-gcs.data.svc.cluster.local:6379", "redisUsername": {"value": "ray"},
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "ray-gcs-redis", "key": "password"}}}}


def test_the_ray_version_is_the_one_in_the_images(chart):
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    locked = next(line.split("==")[1].strip() for line in lock if line.startswith("ray=="))
    assert render(chart)["RayCluster/demo-raycluster"]["spec"]["rayVersion"] == locked


def test_the_rayjob_starts_the_workers_on_the_chart_s_cluster(chart):
    objects = render(chart)
    job = objects["RayJob/demo-workers"]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": "demo-raycluster"}
    assert job["submissionMode"] == "K8sJobMode"
    assert job["entrypoint"] == ("metaopt workers /etc/metaopt/job.yaml --learner demo-learner:50051 "
                                 "--job-id demo --token-file /var/run/metaopt/token/token")
    assert job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_a_plugin_bundle_reaches_the_learner_and_the_workers(chart):
    """The learner fetches and verifies it (--plugins); Ray fetches it for the workers' job."""
    bundle = f"s3://ml-metaopt/metaopt/plugins/{'0' * 64}.zip"
    objects = render(chart, {"job": {"plugins": bundle}})
    validate_objects(k8s_objects(objects))
    learner = containers(objects["Deployment/demo-learner"])[0]
    assert f"--plugins={bundle}" in learner["args"]
    assert yaml.safe_load(objects["RayJob/demo-workers"]["spec"]["runtimeEnvYAML"]) == {"working_dir": bundle}
    assert "runtimeEnvYAML" not in render(chart)["RayJob/demo-workers"]["spec"]  # none without plugins


def test_tls_is_wired_into_the_learner_and_the_workers(chart):
    objects = render(chart, LARGE)
    (learner,) = containers(objects["Deployment/demo-learner"])
    assert {"--tls-cert=/var/run/metaopt/tls/tls.crt", "--tls-key=/var/run/metaopt/tls/tls.key",
            "--job-id=big-1"} <= set(learner["args"])
    assert not any(a.startswith("--tls-client-ca") for a in learner["args"])
    # The kubelet's gRPC probe cannot speak TLS: it asks the plaintext health port.
    assert learner["readinessProbe"]["grpc"] == {"port": 50052} and "--health-port=50052" in learner["args"]
    pod = objects["Deployment/demo-learner"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "big-1-learner-tls"
    assert volumes["token"]["secret"] == {"secretName": "big-1-token", "defaultMode": 0o440,
                                          "items": [{"key": "bearer", "path": "token"}]}
    entrypoint = objects["RayJob/demo-workers"]["spec"]["entrypoint"]
    assert entrypoint.endswith("--tls-ca /var/run/metaopt/tls/ca.crt "
                               "--tls-server-name learner.big-1.ml.example.com '--count' '240'")
    # Mutual TLS: the learner asks for client certificates, the workers bring theirs.
    mutual = render(chart, {**LARGE, "learner": {**LARGE["learner"], "tls": {**LARGE["learner"]["tls"],
                                                                          "mutual": True}}})
    (learner,) = containers(mutual["Deployment/demo-learner"])
    assert "--tls-client-ca=/var/run/metaopt/tls/ca.crt" in learner["args"]
    assert ("--tls-cert /var/run/metaopt/tls/tls.crt --tls-key /var/run/metaopt/tls/tls.key"
            in mutual["RayJob/demo-workers"]["spec"]["entrypoint"])
    validate_objects(k8s_objects(mutual))
    cluster = objects["RayCluster/demo-raycluster"]["spec"]
    ray_volumes = {v["name"]: v for v in cluster["workerGroupSpecs"][0]["template"]["spec"]["volumes"]}
    assert ray_volumes["tls"]["secret"]["secretName"] == "big-1-worker-tls"


# --- the job spec, Redis and object storage --------------------------------------------------

def job_spec(objects: dict[str, dict]) -> dict:
    return yaml.safe_load(objects["ConfigMap/demo-job"]["data"]["job.yaml"])


def test_the_job_spec_is_valid_and_gets_the_bundled_redis_as_its_job_store(chart):
    spec = job_spec(render(chart))
    parsed = parse_job_spec(spec)  # the learner's own validation
    assert parsed.storage.job_store == "redis://metaopt@demo-redis:6379/0"
    # A job store the user set is kept; a whole spec can come from a file (--set-file).
    own = render(chart, {"job": {"spec": {"storage": {"job_store": "redis://me@mine:6379/1"}}}})
    assert job_spec(own)["storage"]["job_store"] == "redis://me@mine:6379/1"
    quickstart = (ROOT / "examples" / "quickstart.yaml").read_text()
    from_file = job_spec(render(chart, {"job": {"specYaml": quickstart}}))
    assert from_file == {**yaml.safe_load(quickstart), "storage": {"job_store": "redis://metaopt@demo-redis:6379/0"}}


def test_an_external_redis_and_object_storage_come_from_secrets(chart):
    objects = render(chart, LARGE)
    spec = parse_job_spec(job_spec(objects))
    assert spec.storage.job_store == "rediss://metaopt@redis.data.svc.cluster.local:6380/3"
    assert spec.storage.root == "s3://ml-metaopt/metaopt" and spec.workers.count == 256
    assert not any(k.startswith(("Deployment/demo-redis", "Service/demo-redis", "NetworkPolicy/demo-redis"))
                   for k in objects)
    (learner,) = containers(objects["Deployment/demo-learner"])
    env = env_of(learner)
    assert env["METAOPT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "metaopt-redis",
                                                                          "key": "redis-password"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "metaopt-s3",
                                                                     "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "metaopt-s3"
    assert env["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL", "value": "https://minio.storage.svc:9000"}
    worker = containers(objects["RayCluster/demo-raycluster"])[1]
    assert "AWS_SECRET_ACCESS_KEY" in env_of(worker) and "METAOPT_REDIS_PASSWORD" not in env_of(worker)


def test_the_bundled_redis_takes_its_password_from_the_secret(chart):
    objects = render(chart)
    (redis,) = containers(objects["Deployment/demo-redis"])
    assert env_of(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "demo-redis",
                                                                            "key": "password"}
    assert "--user default off" in redis["args"][0] and "--user metaopt on" in redis["args"][0]
    (learner,) = containers(objects["Deployment/demo-learner"])
    assert env_of(learner)["METAOPT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "demo-redis",
                                                                                      "key": "password"}


@pytest.mark.parametrize("values", [{}, LARGE], ids=["default", "large"])
def test_no_secret_value_appears_outside_its_secret(chart, values):
    objects = render(chart, values)
    secrets = {k: o for k, o in objects.items() if k.startswith("Secret/")}
    if values is LARGE:
        assert secrets == {}, "with existing Secrets named, the chart must make none"
    else:
        assert set(secrets) == {"Secret/demo-token", "Secret/demo-redis"}
    values_in_secrets = [base64.b64decode(v).decode() for o in secrets.values() for v in o["data"].values()]
    assert all(len(v) >= 32 for v in values_in_secrets)
    for key, obj in objects.items():
        if key in secrets:
            continue
        text = json.dumps(obj)
        for secret in values_in_secrets:
            assert secret not in text and base64.b64encode(secret.encode()).decode() not in text, (
                f"a Secret's value appears in {key}")
    # Nothing secret travels as a plain value: variables named like secrets are references.
    for key, obj in objects.items():
        for container in containers(obj):
            for name, var in env_of(container).items():
                if any(word in name for word in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{key}: {name} is not from a Secret"


def test_generated_secrets_are_random_per_install(chart):
    first, second = render(chart), render(chart)
    assert first["Secret/demo-token"]["data"]["token"] != second["Secret/demo-token"]["data"]["token"]


# --- the values schema -----------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"rayCluster": {"workers": {"maxReplicas": "256"}}},
     "/rayCluster/workers/maxReplicas': got string, want integer"),
    ({"bogus": 1}, "additional properties 'bogus' not allowed"),
    ({"learner": {"tlss": {}}}, "additional properties 'tlss' not allowed"),
    ({"redis": {"external": {"url": "redis://metaopt:hunter2@redis:6379/0"}}}, "/redis/external/url"),
    ({"job": {"spec": {"storage": {"job_store": "redis://u:pw@redis:6379/0"}}}},
     "/job/spec/storage/job_store"),
    ({"learner": {"tls": {"enabled": True}}}, "/learner/tls/existingSecret"),
    ({"rayCluster": {"head": {"rayStartParams": {"num-gpus": 0}}}}, "num-gpus"),
    ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "/metrics/serviceMonitor/interval"),
    ({"job": {"id": "Big_Job"}}, "/job/id"),
    ({"job": {"plugins": "s3://bucket/my_tasks.py"}}, "/job/plugins"),  # a bundle is SHA256.zip
    ({"rayCluster": {"gcsFaultTolerance": {"redisAddress": "redis://r:6379"}}},
     "/rayCluster/gcsFaultTolerance/redisAddress"),
])
def test_the_schema_refuses_bad_values_and_names_them(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as refused:
        chart.validate_schema(values)
    assert message in str(refused.value)
    with pytest.raises(helm_python.HelmValuesError):  # `helm install` refuses them too
        chart.render(values, name="demo", namespace=NAMESPACE)


@pytest.mark.parametrize("values, message", [
    ({"redis": {"external": {"url": "redis://metaopt@r:6379/0", "existingSecret": "s"}}}, "not both"),
    ({"redis": {"bundled": {"enabled": False}, "external": {"url": "redis://metaopt@r:6379/0"}}},
     "redis.external.existingSecret is empty"),
    ({"learner": {"tls": {"enabled": True, "existingSecret": "t"}}}, "learner.tls.workersSecret"),
    ({"rayCluster": {"workers": {"replicas": 5, "minReplicas": 0, "maxReplicas": 4}}},
     "minReplicas <= replicas <= maxReplicas, got 0, 5, 4"),
    ({"redis": {"bundled": {"enabled": False},
                "external": {"url": "redis://metaopt@r:6379/0", "existingSecret": "s"}},
      "rayCluster": {"gcsFaultTolerance": {"enabled": True}}},
     "needs rayCluster.gcsFaultTolerance.redisAddress"),
])
def test_values_that_conflict_are_refused_with_the_remedy(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as refused:
        chart.render(values, name="demo", namespace=NAMESPACE)
    assert message in str(refused.value)


# --- network policies ------------------------------------------------------------------------

def test_only_the_job_s_ray_pods_reach_the_learner_and_only_prometheus_its_metrics(chart):
    objects = render(chart)
    policy, pods = objects["NetworkPolicy/demo-learner"]["spec"], pod_labels(objects)
    assert policy["policyTypes"] == ["Ingress"]
    assert [role for role, labels in pods.items() if selects(policy["podSelector"], labels)] == ["learner"]
    grpc_rule, metrics_rule = policy["ingress"]
    assert grpc_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    (peer,) = grpc_rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace only
    allowed = [role for role, labels in pods.items() if selects(peer["podSelector"], labels)]
    assert allowed == ["ray_head", "ray_worker"]
    assert metrics_rule["ports"] == [{"port": 9090, "protocol": "TCP"}]
    (prometheus,) = metrics_rule["from"]
    assert selects(prometheus["podSelector"], {"app.kubernetes.io/name": "prometheus"})
    assert not any(selects(prometheus["podSelector"], labels) for labels in pods.values())


@pytest.mark.parametrize("values, clients", [
    ({}, ["cli", "learner"]),
    ({"rayCluster": {"gcsFaultTolerance": {"enabled": True}}}, ["cli", "learner", "ray_head"]),  # its GCS
], ids=["default", "gcs-fault-tolerance"])
def test_only_the_learner_the_cli_and_a_fault_tolerant_ray_head_reach_redis(chart, values, clients):
    objects = render(chart, values)
    policy, pods = objects["NetworkPolicy/demo-redis"]["spec"], pod_labels(objects)
    assert [role for role, labels in pods.items() if selects(policy["podSelector"], labels)] == ["redis"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    allowed = sorted({role for peer in rule["from"] for role, labels in pods.items()
                      if selects(peer["podSelector"], labels)})
    assert allowed == clients


# --- Prometheus and Grafana ------------------------------------------------------------------

def test_the_servicemonitor_carries_the_release_label_and_finds_the_metrics_port(chart):
    default = render(chart)["ServiceMonitor/demo-learner"]
    assert default["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # Another Prometheus: its own label instead (null drops the default's key, Helm's rule).
    labels = {"release": None, "prometheus": "team-a"}
    objects = render(chart, {"metrics": {"serviceMonitor": {"labels": labels}}})
    monitor = objects["ServiceMonitor/demo-learner"]
    assert monitor["metadata"]["labels"]["prometheus"] == "team-a"
    assert "release" not in monitor["metadata"]["labels"]
    service = objects["Service/demo-learner"]
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    pod_monitor = render(chart, LARGE)["PodMonitor/demo-raycluster"]
    assert pod_monitor["metadata"]["labels"]["release"] == "prom-ml"
    assert pod_monitor["spec"]["selector"] == {"matchLabels": {"ray.io/cluster": "demo-raycluster"}}
    disabled = render(chart, {"metrics": {"serviceMonitor": {"enabled": False}}})
    assert "ServiceMonitor/demo-learner" not in disabled


DASHBOARDS = {"metaopt_overview.json": {"title": "metaopt overview", "uid": "metaopt-overview", "panels": [
                  {"type": "timeseries", "targets": [{"expr": "metaopt_meta_loss{job_id=~\"$job_id\"}",
                                                      "legendFormat": "{{job_id}}"}]}]},
              "Workers.json": {"title": "metaopt workers", "uid": "metaopt-workers", "panels": []}}


def test_every_dashboard_file_becomes_a_configmap_for_the_grafana_sidecar(chart, tmp_path):
    copy = tmp_path / "metaopt"
    shutil.copytree(CHART, copy)
    for shipped in (copy / "dashboards").glob("*.json"):  # only the samples, whose names are known
        shipped.unlink()
    for name, dashboard in DASHBOARDS.items():
        (copy / "dashboards" / name).write_text(json.dumps(dashboard, indent=2) + "\n")
    with helm_python.Chart.load(copy) as with_dashboards:
        values = {"grafana": {"dashboards": {"folder": "ML", "namespace": "monitoring"}}}
        objects = render(with_dashboards, values)
    maps = {k: o for k, o in objects.items()
            if o.get("metadata", {}).get("labels", {}).get("grafana_dashboard")}
    assert set(maps) == {"ConfigMap/demo-dashboard-metaopt-overview", "ConfigMap/demo-dashboard-workers"}
    for obj in maps.values():
        assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert obj["metadata"]["annotations"] == {"grafana_folder": "ML"}
        assert obj["metadata"]["namespace"] == "monitoring"
        ((name, text),) = obj["data"].items()
        # Verbatim: Grafana's {{job_id}} legends are not Helm templates.
        assert text.rstrip("\n") == (copy / "dashboards" / name).read_text().rstrip("\n")
    validate_objects(list(maps.values()))
    report = helm_python.lint(copy, {}, strict=True)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    # The chart's own dashboards (whatever is there now) each get one, too.
    shipped = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    own = render(chart)
    assert sorted(n for o in own.values() if o.get("kind") == "ConfigMap"
                  and "grafana_dashboard" in o["metadata"]["labels"] for n in o["data"]) == shipped


def test_the_chart_s_dashboards_are_copies_of_the_top_level_ones():
    top = {p.name: p.read_bytes() for p in (ROOT / "dashboards").glob("*.json")}
    in_chart = {p.name: p.read_bytes() for p in (CHART / "dashboards").glob("*.json")}
    assert in_chart == top, ("helm/metaopt/dashboards/ must hold copies of dashboards/*.json: "
                             "run `cp dashboards/*.json helm/metaopt/dashboards/` (and remove stale copies)")


# --- the validator itself finds problems -----------------------------------------------------

def test_the_validator_reports_every_problem_it_is_meant_to_catch(chart):
    objects = render(chart)
    cluster = json.loads(json.dumps(objects["RayCluster/demo-raycluster"]))
    group = cluster["spec"]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 4, 2
    group["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = 2
    group["template"]["spec"]["containers"][0]["volumeMounts"].append({"name": "nope", "mountPath": "/x"})
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    cluster["spec"]["workerGroupSpec"] = []
    problems = "\n".join(object_problems(cluster))
    for expected in ("minReplicas 4 is greater than maxReplicas 2",
                     "nvidia.com/gpu needs a whole-number request", "mounts volume 'nope'",
                     "imagePullPolicy", "spec.workerGroupSpec: unknown field"):
        assert expected in problems
    deployment = json.loads(json.dumps(objects["Deployment/demo-learner"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    deployment["spec"]["selector"]["matchLabels"]["extra"] = "x"
    job = json.loads(json.dumps(objects["RayJob/demo-workers"]))
    job["metadata"]["name"] = "a" * 48
    job["spec"]["clusterSelector"] = {}
    with pytest.raises(AssertionError) as found:
        validate_objects([deployment, job, {"apiVersion": "example.com/v1", "kind": "Widget",
                                            "metadata": {"name": "w"}}])
    for expected in ("readinesProbe", "does not match the pod labels", "at most 47 characters",
                     "one of rayClusterSpec or clusterSelector", "no schema for example.com/v1 Widget"):
        assert expected in str(found.value)
