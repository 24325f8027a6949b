"""Strict validation of custom resources against the real CRDs' OpenAPI v3 schemas, offline.

The CRDs are upstream's, unchanged, in `../shared/k8s-crds/` beside the project's root (its
README says where each comes from): KubeRay v1.7.0-rc.0 (RayCluster, RayJob) and the Prometheus
Operator 0.93.0 (ServiceMonitor, PodMonitor). `schema_problems(obj)` checks an object as the API
server does with strict field validation: unknown fields are errors (except under
`x-kubernetes-preserve-unknown-fields`), types, `x-kubernetes-int-or-string`, enums, patterns,
lengths, bounds (int32 formats too), item counts and required fields. What it cannot check it
lists: the CEL rules (`x-kubernetes-validations`) are left to the API server, and
`cel_rules(kind, api_version)` names each one, so that a test can say which rules the objects
were not checked against.

Where the CRDs are absent (a user's clone without `../shared`), `crd(kind)` skips the calling test
with a message saying so, and fails it when CI=true: a wrong path must not turn CI green.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re

import pytest
import yaml

FOLDER = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "k8s-crds"
FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
         "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
         "PodMonitor": "monitoring.coreos.com_podmonitors.yaml"}
KINDS = tuple(FILES)


@functools.cache
def _load(kind: str) -> dict:
    path = FOLDER / FILES[kind]
    if not path.is_file():
        message = (f"the {kind} CRD is not at {path}: strict CRD validation needs ../shared/k8s-crds/ "
                   "beside the project's root")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 6x


def crd(kind: str, api_version: str) -> dict:
    """The openAPIV3Schema of `kind` at `api_version` (group/version), served or not."""
    document = _load(kind)
    group = document["spec"]["group"]
    for version in document["spec"]["versions"]:
        if f"{group}/{version['name']}" == api_version:
            return version["schema"]["openAPIV3Schema"]
    versions = [f"{group}/{v['name']}" for v in document["spec"]["versions"]]
    raise AssertionError(f"{kind}: apiVersion {api_version!r} is not in its CRD ({versions})")


def schema_problems(obj: dict) -> list[str]:
    """Every way `obj` (a RayCluster, RayJob, ServiceMonitor or PodMonitor) breaks its CRD's schema.
    Its metadata is the API server's ObjectMeta, checked elsewhere (the CRD says only "object")."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    return _problems(body, crd(obj["kind"], obj.get("apiVersion", "")), obj["kind"])


def cel_rules(kind: str, api_version: str) -> list[str]:
    """"path: rule" of each CEL validation of `kind` at `api_version`: what this module does not check."""
    rules: list[str] = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            rules.extend(f"{path or '.'}: {r['rule']}" for r in node.get("x-kubernetes-validations", []))
            for key, child in node.get("properties", {}).items():
                walk(child, f"{path}.{key}")
            for key in ("items", "additionalProperties"):
                walk(node.get(key), f"{path}[]")

    walk(crd(kind, api_version), "")
    return sorted(set(rules))


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _problems(value, schema: dict, where: str) -> list[str]:
    if value is None:
        wanted = schema.get("type")
        return [] if schema.get("nullable") else [f"{where}: null where the schema wants {wanted}"]
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        return [] if ok else [f"{where}: {value!r} is neither an integer nor a string"]
    kind = schema.get("type")
    if kind in ("integer", "number"):
        number = (int,) if kind == "integer" else (int, float)
        if not isinstance(value, number) or isinstance(value, bool):
            return [f"{where}: {value!r} is not {'an integer' if kind == 'integer' else 'a number'}"]
    elif kind in _TYPES and not isinstance(value, _TYPES[kind]):
        return [f"{where}: {type(value).__name__} {value!r:.60} where the schema wants {kind}"]
    problems = _value_problems(value, schema, where)
    if isinstance(value, dict):
        problems += _object_problems(value, schema, where)
    elif isinstance(value, list):
        bounds = (schema.get("minItems", 0), schema.get("maxItems", float("inf")))
        if not bounds[0] <= len(value) <= bounds[1]:
            problems.append(f"{where}: {len(value)} items, outside {bounds}")
        for i, item in enumerate(value):
            problems += _problems(item, schema.get("items", {}), f"{where}[{i}]")
    return problems


def _value_problems(value, schema: dict, where: str) -> list[str]:
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", float("inf")):
            problems.append(f"{where}: {value!r} has a length outside the schema's bounds")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if schema.get("format") == "int32" and not -2**31 <= value < 2**31:
            problems.append(f"{where}: {value!r} does not fit an int32")
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            bounds = [schema.get("minimum"), schema.get("maximum")]
            problems.append(f"{where}: {value!r} is outside {bounds}")
    return problems


def _object_problems(value: dict, schema: dict, where: str) -> list[str]:
    problems = [f"{where}: required field {name!r} is missing"
                for name in schema.get("required", []) if name not in value]
    properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
    for key, child in value.items():
        if key in properties:
            problems += _problems(child, properties[key], f"{where}.{key}")
        elif isinstance(extra, dict):
            problems += _problems(child, extra, f"{where}.{key}")
        elif not (extra is True or schema.get("x-kubernetes-preserve-unknown-fields")):
            known = sorted(properties) if len(properties) < 16 else "many"
            problems.append(f"{where}.{key}: unknown field (known here: {known})")
    return problems
