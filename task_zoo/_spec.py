"""Validation of `TaskSpec` kwargs, shared by the families' `task_fn`s.

Specs arrive from JSON (messages, manifests), so a `task_fn` must reject a malformed one with a
`ValueError` that names the spec, rather than fail deep inside JAX with a shape error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from task_zoo.base import TaskSpec


def spec_error(spec: TaskSpec, problem: str) -> ValueError:
    """A `ValueError` that names the offending spec."""
    return ValueError(f"bad task spec {spec.to_json()}: {problem}")


def _has_type(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; never a valid size or rate here
        return kind is bool
    if kind is float:  # JSON writes 1.0 as 1.0, but hand-written specs may say 1
        return isinstance(value, int | float)
    return isinstance(value, kind)


def spec_kwargs(
    spec: TaskSpec,
    family: str,
    required: Mapping[str, type],
    optional: Mapping[str, tuple[type, Any]] | None = None,
) -> dict[str, Any]:
    """Check `spec` belongs to `family` and has exactly the allowed, well-typed kwargs.

    `required` maps names to types; `optional` maps names to (type, default). Returns the kwargs
    with defaults filled in and floats converted to `float`.
    """
    optional = optional or {}
    if spec.name != family:
        raise spec_error(spec, f"expected a {family!r} spec")
    missing = sorted(set(required) - set(spec.kwargs))
    unknown = sorted(set(spec.kwargs) - set(required) - set(optional))
    if missing:
        raise spec_error(spec, f"missing kwargs {missing}")
    if unknown:
        raise spec_error(
            spec, f"unknown kwargs {unknown}; allowed: {sorted({*required, *optional})}"
        )
    out: dict[str, Any] = {}
    kinds = {**required, **{k: kind for k, (kind, _) in optional.items()}}
    for name, kind in kinds.items():
        value = spec.kwargs.get(name, optional[name][1] if name in optional else None)
        if not _has_type(value, kind):
            raise spec_error(spec, f"{name} must be {kind.__name__}, got {value!r}")
        out[name] = float(value) if kind is float else value
    return out
