"""`metaopt submit --k8s`: a job spec as a KubeRay RayJob, created with the kubernetes client.

The RayJob runs `metaopt train` as its entrypoint, exactly as `metaopt submit` does through the
Ray Jobs API: the learner in the job's driver on the head node, the workers as Ray actors on
the worker pods. By default the RayJob brings its own RayCluster (one worker pod per worker,
deleted when the job ends); with `cluster=NAME` it runs on an existing one (the Helm chart's).
The spec travels inside the entrypoint (base64), so nothing needs mounting; a job's plugins travel
as a bundle in its object storage, the RayJob's remote working_dir (metaopt/plugins.py).
"""

from __future__ import annotations

import base64
import math
import shlex
from importlib import metadata

import yaml

from metaopt.jobspec import INLINE_SPEC, JobSpec
from metaopt.submit import STOP_GRACE_S, SubmitError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}  # the learner: aggregation, checkpoints
WORKER_MEMORY = "4Gi"


def rayjob(spec: JobSpec, job_id: str, image: str, namespace: str = "default", cluster: str | None = None,
           env_secrets: tuple[str, ...] = (), plugins_uri: str | None = None) -> dict:
    """The RayJob manifest for `spec` (a dict, ready for the API or for YAML). A job with plugins
    needs their bundle's URI (`plugins.upload`): Ray fetches it as the job's working_dir, on the
    path of its driver and of every worker."""
    if spec.plugins and plugins_uri is None:
        raise SubmitError(f"the job names plugins {spec.plugins}: upload their bundle first "
                          "(metaopt.plugins.upload) and pass its URI")
    # KubeRay pastes the entrypoint unquoted into its submitter's shell command line (`... ray job
    # submit ... -- ENTRYPOINT ; fi`): it must hold no shell syntax, or that shell runs part of it.
    # So the spec goes inline as `base64:…` (letters, digits, + / =), which `metaopt train` reads.
    encoded = base64.b64encode(yaml.safe_dump(spec.model_dump(mode="json")).encode()).decode()
    entrypoint = shlex.join(["metaopt", "train", f"{INLINE_SPEC}{encoded}", "--job-id", job_id, "--json"])
    labels = {"app.kubernetes.io/name": "metaopt", "app.kubernetes.io/component": "job",
              "metaopt.io/job-id": job_id}
    body: dict = {
        "entrypoint": entrypoint,
        "submissionMode": "K8sJobMode",
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": {
            "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)},
            **({"working_dir": plugins_uri} if plugins_uri else {})}),
    }
    if cluster is not None:
        body["clusterSelector"] = {"ray.io/cluster": cluster}
    else:
        body |= {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                 "rayClusterSpec": _cluster(spec, image, env_secrets)}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob",
            "metadata": {"name": job_id, "namespace": namespace, "labels": labels}, "spec": body}


def _cluster(spec: JobSpec, image: str, env_secrets: tuple[str, ...]) -> dict:
    """A head pod for the learner (no Ray work on it) and one worker pod per worker."""
    workers = spec.workers
    worker_resources = {"cpu": _quantity(workers.cpus), "memory": WORKER_MEMORY}
    if workers.gpus:
        # Whole GPUs per pod: Kubernetes does not split them; Ray may still share one within a pod.
        worker_resources["nvidia.com/gpu"] = str(math.ceil(workers.gpus))
    return {
        "rayVersion": metadata.version("ray"),
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod("ray-head", image, HEAD_RESOURCES, env_secrets),
        },
        "workerGroupSpecs": [{
            "groupName": "workers", "replicas": workers.count, "minReplicas": workers.count,
            "maxReplicas": workers.count, "rayStartParams": {},
            "template": _pod("ray-worker", image, worker_resources, env_secrets),
        }],
    }


def _pod(name: str, image: str, resources: dict, env_secrets: tuple[str, ...]) -> dict:
    container = {
        "name": name, "image": image, "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False},
    }
    if env_secrets:  # object-storage credentials, the Redis password: from Secrets, never values
        container["envFrom"] = [{"secretRef": {"name": secret}} for secret in env_secrets]
    return {"spec": {"containers": [container]}}


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def create(manifest: dict) -> None:
    """Create the RayJob in its namespace, with the in-cluster config or else ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise SubmitError(f"no Kubernetes configuration: not in a pod, and no usable kubeconfig ({err}); "
                              "set KUBECONFIG or run inside the cluster") from None
    meta = manifest["metadata"]
    try:
        client.CustomObjectsApi().create_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, manifest)
    except client.ApiException as err:
        why = {404: "the RayJob kind is unknown there: is the KubeRay operator installed?",
               409: f"a RayJob {meta['name']} exists already: pick another --job-id",
               403: "this account may not create RayJobs in that namespace"}.get(err.status, err.reason)
        raise SubmitError(f"Kubernetes refused RayJob {meta['name']} in {meta['namespace']}: {why}") from None
    except OSError as err:  # urllib3's connection errors
        raise SubmitError(f"cannot reach the Kubernetes API: {err}") from None
