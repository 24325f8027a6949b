"""Task augmentations: the same problem, seen differently by the optimizer.

- Parameter reparameterisation by a scale s: the optimizer trains q with p = s·q, so the loss
  is L(s·q) and its gradient s·∇L. A learned optimizer that only works at one parameter scale
  is caught out (Metz et al. 2022 use such augmentations to widen the task distribution).
- Gradient noise: the loss is unchanged, its gradient gets N(0, σ²) noise added, as if the
  batch were smaller.

An augmentation travels in the spec as `kwargs["augment"] = {"param_scale": s, "grad_noise": σ}`
and `task_zoo.task(spec)` wraps the family's task. The values are array leaves of the wrapper,
so differently augmented tasks of one shape share one compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from task_zoo.base import Task, TaskSpec

AUGMENT_KEY = "augment"


@jax.custom_vjp
def _with_gradient_noise(params, key, scale):
    return params


def _noise_forward(params, key, scale):
    return params, (key, scale)


def _noise_backward(residuals, cotangent):
    key, scale = residuals
    leaves, treedef = jax.tree.flatten(cotangent)
    keys = jax.random.split(key, len(leaves))
    noisy = [g + scale * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy), None, None


_with_gradient_noise.defvjp(_noise_forward, _noise_backward)


@flax.struct.dataclass
class AugmentedTask:
    """`base` trained through p = param_scale · q, with N(0, grad_noise²) added to ∇q."""

    base: Any  # the family's task (a pytree)
    param_scale: jax.Array  # () float32
    grad_noise: jax.Array  # () float32

    def init(self, key: jax.Array):
        return jax.tree.map(lambda p: p / self.param_scale, self.base.init(key))

    def loss(self, params, key: jax.Array, batch) -> jax.Array:
        noise_key, loss_key = jax.random.split(key)
        params = _with_gradient_noise(params, noise_key, self.grad_noise)
        return self.base.loss(jax.tree.map(lambda q: q * self.param_scale, params), loss_key, batch)

    def batch(self, key: jax.Array, split: str):
        return self.base.batch(key, split)


def split_augment(spec: TaskSpec) -> tuple[TaskSpec, dict[str, float] | None]:
    """(the spec without its augmentation, the augmentation or None)."""
    if AUGMENT_KEY not in spec.kwargs:
        return spec, None
    kwargs = dict(spec.kwargs)
    augment = kwargs.pop(AUGMENT_KEY)
    if not isinstance(augment, dict) or set(augment) - {"param_scale", "grad_noise"}:
        raise ValueError(
            f"bad task spec {spec.to_json()}: 'augment' must be an object with 'param_scale' "
            "and/or 'grad_noise'"
        )
    scale, noise = float(augment.get("param_scale", 1.0)), float(augment.get("grad_noise", 0.0))
    if not (scale > 0 and noise >= 0 and math.isfinite(scale) and math.isfinite(noise)):
        raise ValueError(f"bad task spec {spec.to_json()}: need param_scale > 0 and grad_noise >= 0")
    return TaskSpec(spec.name, kwargs), {"param_scale": scale, "grad_noise": noise}


def augment_task(task: Task, param_scale: float, grad_noise: float) -> AugmentedTask:
    return AugmentedTask(task, jnp.asarray(param_scale, jnp.float32), jnp.asarray(grad_noise, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Sampling ranges: param_scale log-uniform in `param_scale`, grad_noise uniform."""

    param_scale: tuple[float, float] = (1.0, 1.0)
    grad_noise: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        (lo, hi), (nlo, nhi) = self.param_scale, self.grad_noise
        if not (0 < lo <= hi and 0 <= nlo <= nhi):
            raise ValueError(
                f"augmentation ranges need 0 < param_scale low <= high and 0 <= grad_noise low <= "
                f"high, got param_scale={self.param_scale}, grad_noise={self.grad_noise}"
            )

    def apply(self, key: jax.Array, spec: TaskSpec) -> TaskSpec:
        """`spec` with a sampled augmentation in its kwargs."""
        scale_key, noise_key = jax.random.split(key)
        log_lo, log_hi = math.log(self.param_scale[0]), math.log(self.param_scale[1])
        scale = math.exp(float(jax.random.uniform(scale_key, (), minval=log_lo, maxval=log_hi)))
        noise = float(jax.random.uniform(noise_key, (), minval=self.grad_noise[0], maxval=self.grad_noise[1]))
        return TaskSpec(spec.name, {**spec.kwargs, AUGMENT_KEY: {"param_scale": scale, "grad_noise": noise}})
