"""Validation of `TaskSpec` kwargs and of family settings, and sampling helpers, shared by the
families.

Specs arrive from JSON (messages, manifests), so a `task_fn` must reject a malformed one with a
`ValueError` that names the spec, rather than fail deep inside JAX with a shape error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from metaopt.task_zoo.base import TaskSpec


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


# ---- family settings and sampling -------------------------------------------------------


def choices(name: str, values: Sequence, allowed: Sequence | None = None) -> tuple:
    """A family setting: a non-empty set drawn from `allowed`, or of positive ints if None."""
    out = tuple(values)
    if not out:
        raise ValueError(f"{name} must be non-empty")
    if allowed is not None and not set(out) <= set(allowed):
        raise ValueError(f"{name} must be drawn from {sorted(allowed)}, got {values!r}")
    if allowed is None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ValueError(f"{name} must be positive ints, got {values!r}")
    return out


def positive_range(name: str, value: Sequence[float], low: float = 0.0) -> tuple[float, float]:
    """A family setting: a (lo, hi) pair with low < lo <= hi (log-uniform draws need lo > 0)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not low < lo <= hi:
        raise ValueError(f"{name} must be a range with {low} < low <= high, got {value!r}")
    return lo, hi


def pick(key: jax.Array, options: tuple):
    """One of `options`, uniformly (host-side: returns the Python value)."""
    return options[int(jax.random.randint(key, (), 0, len(options)))]


def log_uniform(key: jax.Array, lo: float, hi: float) -> float:
    """A float log-uniform in [lo, hi] (scales span orders of magnitude)."""
    return float(np.exp(jax.random.uniform(key, (), minval=np.log(lo), maxval=np.log(hi))))


def seed(key: jax.Array) -> int:
    """A spec seed: tells apart two draws of equal settings, and seeds any spec-made data."""
    return int(jax.random.randint(key, (), 0, 2**31 - 1))
