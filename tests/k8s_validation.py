"""Offline validation of Kubernetes objects (rendered charts, RayJob manifests), for tests.

`validate_objects(objs)` raises one AssertionError that lists every problem found, object by
object. What is checked, and how honestly:

* Built-in kinds (core, apps, batch, networking, ...): the Kubernetes OpenAPI schemas shipped
  by `kubernetes-validate`, strict (unknown fields are errors), for every version in
  `KUBERNETES_VERSIONS`; plus a few rules the API server enforces that no schema expresses
  (names, labels, a Deployment's selector matching its pod labels, volume mounts naming
  volumes, requests within limits, probes naming declared ports).
* KubeRay (ray.io/v1 RayCluster, RayJob) and Prometheus Operator (monitoring.coreos.com/v1
  ServiceMonitor, PodMonitor): strictly against the openAPIV3Schema of their real CRDs
  (`tests/crd_schemas.py`: KubeRay v1.7.0-rc.0, Prometheus Operator 0.93.0, from
  ../shared/k8s-crds/; a test skips without them, and fails when CI=true). Their CEL rules are
  not evaluated (`crd_schemas.cel_rules` lists them); some of what they and KubeRay's own
  validation (utils/validation.go) enforce is checked by hand below: name lengths, replicas
  within bounds, the cluster selector's rules. Every embedded pod template is also validated as
  a core `PodTemplate` (strict) for each Kubernetes version.
* Any other kind is a problem ("no schema and no hand-written check"), never a silent pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal

import kubernetes_validate

from tests import crd_schemas

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known here.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE]|)$")
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
# Kinds whose names must be DNS-1035 labels, with their longest allowed name (KubeRay reserves
# room for the names it derives: utils.MaxRayClusterNameLength, MaxRayJobNameLength).
_NAME_RULES = {"Service": 63, "RayCluster": 53, "RayJob": 47}



def validate_objects(objs: list[dict], versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> None:
    """Raise AssertionError listing every problem of `objs` (parsed manifests), or return."""
    problems: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for obj in objs:
        where = f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"
        found = object_problems(obj, versions)
        key = (obj.get("kind", ""), (obj.get("metadata") or {}).get("namespace", ""), where)
        if key in seen:
            found.append("defined twice")
        seen.add(key)
        problems += [f"{where}: {p}" for p in found]
    if problems:
        summary = f"{len(problems)} problem(s) in {len(objs)} object(s):"
        raise AssertionError("\n  ".join([summary, *problems]))


def object_problems(obj: dict, versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    """Every problem of one object, as messages without the object's name."""
    if not isinstance(obj, dict) or not obj.get("apiVersion") or not obj.get("kind"):
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    problems = _metadata_problems(obj)
    custom = _CUSTOM_KINDS.get((obj["apiVersion"], obj["kind"]))
    if custom is not None:
        return problems + crd_schemas.schema_problems(obj) + custom(obj, versions)
    for version in versions:
        problems += _schema_problems(obj, version)
    problems += _semantic_problems(obj)
    return problems


def _schema_problems(obj: dict, version: str, label: str = "") -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(top)"
        return [f"{label}{path}: {e.message} (Kubernetes {e.version} schema)"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{label}no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}, and no "
                "hand-written check: add one to tests/k8s_validation.py"]
    return []


def _metadata_problems(obj: dict) -> list[str]:
    meta = obj.get("metadata") or {}
    name, problems = meta.get("name", ""), []
    longest = _NAME_RULES.get(obj["kind"])
    if longest is not None:
        if not _DNS1035_LABEL.match(name) or len(name) > longest:
            problems.append(f"name {name!r} must be a DNS-1035 label of at most {longest} characters")
    elif not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        problems.append(f"name {name!r} is not a DNS-1123 subdomain")
    problems += _labels_problems(meta.get("labels"), "metadata.labels")
    problems += _keys_problems(meta.get("annotations"), "metadata.annotations")
    return problems


def _keys_problems(mapping: dict | None, where: str) -> list[str]:
    problems = []
    for key in mapping or {}:
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix))) or len(name) > 63 or (
                not _QUALIFIED_NAME.match(name)):
            problems.append(f"{where}: key {key!r} is not a qualified name")
    return problems


def _labels_problems(labels: dict | None, where: str) -> list[str]:
    problems = _keys_problems(labels, where)
    for key, value in (labels or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"{where}: value {value!r} of {key!r} is not a valid label value")
    return problems


def _semantic_problems(obj: dict) -> list[str]:
    """Rules the API server enforces beyond the OpenAPI schema, for the kinds charts use most."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = spec.get("template") or {}
        problems = pod_template_problems(template, "spec.template.")
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if kind != "Job" and (not selector or any(labels.get(k) != v for k, v in selector.items())):
            problems.append(f"spec.selector {selector} does not match the pod labels {labels}")
        return problems
    if kind in ("ConfigMap", "Secret"):
        keys = [*(obj.get("data") or {}), *(obj.get("binaryData") or {}), *(obj.get("stringData") or {})]
        return [f"data key {k!r} is invalid" for k in keys if not _CONFIG_KEY.match(k)]
    if kind == "Service":
        names = [p.get("name") for p in spec.get("ports") or []]
        return ["spec.ports: names must be unique (and given when there are several)"] if (
            len(names) > 1 and (None in names or len(set(names)) != len(names))) else []
    return []


def pod_template_problems(template: dict, where: str = "") -> list[str]:
    """API-server rules for a pod template (the schema checks its shape): unique container and
    port names, mounts of declared volumes, probes on declared ports, requests within limits."""
    spec, problems = template.get("spec") or {}, []
    problems += _labels_problems((template.get("metadata") or {}).get("labels"), f"{where}metadata.labels")
    volumes = [v.get("name") for v in spec.get("volumes") or []]
    if len(set(volumes)) != len(volumes):
        problems.append(f"{where}spec.volumes: names are not unique: {volumes}")
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    names = [c.get("name") for c in containers]
    if len(set(names)) != len(names):
        problems.append(f"{where}spec: container names are not unique: {names}")
    port_names: list[str] = []
    for c in containers:
        here = f"{where}container {c.get('name')!r}"
        if not _DNS1123_LABEL.match(c.get("name") or ""):
            problems.append(f"{here}: the name is not a DNS-1123 label")
        ports = c.get("ports") or []
        own_ports = {p.get("name") for p in ports} | {p.get("containerPort") for p in ports}
        for port in ports:
            if "name" in port:
                if len(port["name"]) > 15 or not _PORT_NAME.match(port["name"]) or port["name"] in port_names:
                    problems.append(f"{here}: port name {port['name']!r} is invalid or not unique in the pod")
                port_names.append(port["name"])
        mounts = [m.get("mountPath") for m in c.get("volumeMounts") or []]
        if len(set(mounts)) != len(mounts):
            problems.append(f"{here}: mount paths are not unique: {mounts}")
        problems += [f"{here}: mounts volume {m.get('name')!r}, which the pod does not declare"
                     for m in c.get("volumeMounts") or [] if m.get("name") not in volumes]
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(probe_name) or {}
            handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in probe]
            if probe and len(handlers) != 1:
                problems.append(f"{here}: {probe_name} needs exactly one handler, has {handlers}")
            for handler in ("httpGet", "tcpSocket"):
                port = (probe.get(handler) or {}).get("port")
                if isinstance(port, str) and port not in own_ports:
                    problems.append(f"{here}: {probe_name} uses port {port!r}, which the container "
                                    "does not name")
        problems += _resources_problems(c.get("resources") or {}, here)
    return problems


def _quantity(value) -> Decimal | None:
    match = _QUANTITY.match(str(value))
    if not match:
        return None
    number, suffix = match.groups()
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIX[suffix]
    except ArithmeticError:
        return None


def _resources_problems(resources: dict, here: str) -> list[str]:
    problems, requests, limits = [], resources.get("requests") or {}, resources.get("limits") or {}
    parsed: dict[str, dict[str, Decimal]] = {"requests": {}, "limits": {}}
    for kind, mapping in (("requests", requests), ("limits", limits)):
        for name, value in mapping.items():
            q = _quantity(value)
            if q is None:
                problems.append(f"{here}: resources.{kind}.{name} {value!r} is not a quantity")
            else:
                parsed[kind][name] = q
    for name, request in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        extended = "/" in name and not name.startswith(("kubernetes.io/", "hugepages-"))
        if limit is not None and request > limit:
            problems.append(f"{here}: resources.requests.{name} {requests[name]} exceeds the limit "
                            f"{limits[name]}")
        if extended and (limit is None or request != limit or request != int(request)):
            problems.append(f"{here}: extended resource {name} needs a whole-number request equal to "
                            "its limit")
    return problems


def _as_pod_template(template: dict, name: str, versions: tuple[str, ...], where: str) -> list[str]:
    """Validate an embedded PodTemplateSpec as a core PodTemplate: the schema, then the rules."""
    if not isinstance(template, dict) or not (template.get("spec") or {}).get("containers"):
        return [f"{where}: a pod template with at least one container is required"]
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
    problems = []
    for version in versions:
        problems += _schema_problems(wrapped, version, f"{where}.")
    return problems + pod_template_problems(template, f"{where}.")


def _string_map(mapping, where: str) -> list[str]:
    if mapping is None:
        return []
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        return [f"{where}: must map names to strings, got {mapping!r}"]
    return []


def _non_negative_int(value, where: str) -> list[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31):
        return []
    return [f"{where}: must be a non-negative 32-bit integer, got {value!r}"]


def _raycluster_spec_problems(spec: dict, name: str, versions: tuple[str, ...], where: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: must be an object"]
    problems = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec: required"]
    problems += _string_map(head.get("rayStartParams"), f"{where}.headGroupSpec.rayStartParams")
    problems += _as_pod_template(head.get("template"), f"{name}-head", versions,
                                 f"{where}.headGroupSpec.template")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    options = spec.get("autoscalerOptions") or {}
    problems += _non_negative_int(options.get("idleTimeoutSeconds"),
                                  f"{where}.autoscalerOptions.idleTimeoutSeconds")
    if options:  # its container fields, checked as a container of a pod template
        fields = ("resources", "securityContext", "env", "envFrom", "command", "args", "imagePullPolicy")
        container = {"name": "autoscaler", **{k: options[k] for k in fields if k in options}}
        problems += _as_pod_template({"spec": {"containers": [container]}}, f"{name}-autoscaler", versions,
                                     f"{where}.autoscalerOptions")
    groups = spec.get("workerGroupSpecs") or []
    group_names = [g.get("groupName") for g in groups if isinstance(g, dict)]
    if len(set(group_names)) != len(group_names):
        problems.append(f"{where}.workerGroupSpecs: group names are not unique: {group_names}")
    for index, group in enumerate(groups):
        here = f"{where}.workerGroupSpecs[{index}]"
        if not isinstance(group, dict):
            problems.append(f"{here}: must be an object")
            continue
        if not _DNS1123_LABEL.match(str(group.get("groupName", ""))):
            problems.append(f"{here}.groupName: {group.get('groupName')!r} is not a DNS-1123 label")
        for field in ("replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds"):
            problems += _non_negative_int(group.get(field), f"{here}.{field}")
        low, high, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"{here}: minReplicas and maxReplicas are required when autoscaling is off")
        if all(isinstance(v, int) for v in (low, high)) and low > high:
            problems.append(f"{here}: minReplicas {low} is greater than maxReplicas {high}")
        if all(isinstance(v, int) for v in (low, high, replicas)) and not low <= replicas <= high:
            problems.append(f"{here}: replicas {replicas} is outside [minReplicas, maxReplicas] = "
                            f"[{low}, {high}]")
        problems += _string_map(group.get("rayStartParams"), f"{here}.rayStartParams")
        problems += _as_pod_template(group.get("template"), f"{name}-{group.get('groupName')}", versions,
                                     f"{here}.template")
    return problems


def _raycluster_problems(obj: dict, versions: tuple[str, ...]) -> list[str]:
    return _raycluster_spec_problems(obj.get("spec"), obj["metadata"].get("name", "x"), versions, "spec")


def _rayjob_problems(obj: dict, versions: tuple[str, ...]) -> list[str]:
    spec, name = obj.get("spec"), obj["metadata"].get("name", "x")
    if not isinstance(spec, dict):
        return ["spec: required"]
    problems = []
    mode = spec.get("submissionMode", "K8sJobMode")
    entrypoint = spec.get("entrypoint")
    if mode != "InteractiveMode" and not (isinstance(entrypoint, str) and entrypoint.strip()):
        problems.append("spec.entrypoint: a non-empty command is required")
    selector = spec.get("clusterSelector")
    problems += _string_map(selector, "spec.clusterSelector")
    if selector:
        if not selector.get("ray.io/cluster"):
            problems.append("spec.clusterSelector: needs the cluster's name under 'ray.io/cluster'")
        if spec.get("rayClusterSpec") is not None:
            problems.append("spec: clusterSelector and rayClusterSpec exclude each other")
        if (spec.get("backoffLimit") or 0) > 0:
            problems.append("spec.backoffLimit: incompatible with clusterSelector")
        if spec.get("suspend"):
            problems.append("spec.suspend: not supported with clusterSelector")
    elif spec.get("rayClusterSpec") is None:
        problems.append("spec: one of rayClusterSpec or clusterSelector is required")
    else:
        problems += _raycluster_spec_problems(spec["rayClusterSpec"], name, versions, "spec.rayClusterSpec")
    for field in ("activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished"):
        problems += _non_negative_int(spec.get(field), f"spec.{field}")
    submitter = spec.get("submitterPodTemplate")
    if submitter is not None:
        if mode != "K8sJobMode":
            problems.append(f"spec.submitterPodTemplate: only used in K8sJobMode, not {mode}")
        problems += _as_pod_template(submitter, f"{name}-submitter", versions, "spec.submitterPodTemplate")
        policy = (submitter.get("spec") or {}).get("restartPolicy")
        if policy not in ("Never", "OnFailure"):
            problems.append("spec.submitterPodTemplate.spec.restartPolicy: a Job's pods need Never or "
                            f"OnFailure, got {policy!r}")
    return problems


def _monitor_problems(obj: dict, endpoints_field: str) -> list[str]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return ["spec: required"]
    problems = []
    if not isinstance(spec.get("selector"), dict):
        problems.append("spec.selector: required (a label selector)")
    else:
        problems += _labels_problems(spec["selector"].get("matchLabels"), "spec.selector.matchLabels")
    endpoints = spec.get(endpoints_field)
    if not isinstance(endpoints, list) or not endpoints:
        problems.append(f"spec.{endpoints_field}: at least one endpoint is required")
    for index, endpoint in enumerate(endpoints or []):
        here = f"spec.{endpoints_field}[{index}]"
        if not (isinstance(endpoint.get("port"), str) or {"targetPort", "portNumber"} & set(endpoint)):
            problems.append(f"{here}: needs a port name")
    return problems


_CUSTOM_KINDS: dict[tuple[str, str], Callable[[dict, tuple[str, ...]], list[str]]] = {
    ("ray.io/v1", "RayCluster"): _raycluster_problems,
    ("ray.io/v1", "RayJob"): _rayjob_problems,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): lambda obj, _: _monitor_problems(obj, "endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): lambda obj, _: _monitor_problems(obj, "podMetricsEndpoints"),
}
