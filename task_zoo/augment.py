"""Task augmentations: the same problem, seen differently by the optimizer.

- Parameter reparameterisation by scales S: the optimizer trains q with p = S ⊙ q, so the loss
  is L(S ⊙ q) and its gradient S ⊙ ∇L. S is a global scale times, optionally, one scale per
  tensor and one per parameter, each drawn log-uniformly from its range (learned_optimization
  `tasks/task_augmentation.py`, used by VeLO and Celo, reparameterises at these three levels). A
  learned optimizer that only works at one parameter scale is caught out.
- Gradient noise: the loss is unchanged, its gradient gets N(0, σ²) noise added, as if the
  batch were smaller.

An augmentation travels in the spec as `kwargs["augment"] = {"param_scale": s, "grad_noise": σ}`,
plus, for per-tensor and per-parameter scales, `"tensor_scale": [lo, hi], "element_scale": [lo, hi],
"scale_seed": n`: the scales themselves are drawn from the seed when the task is built, so a spec
stays a few numbers however large the model. `task_zoo.task(spec)` wraps the family's task. The
values are array leaves of the wrapper, so differently augmented tasks of one shape share one
compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from metaopt.task_zoo.base import Task, TaskSpec

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
    """`base` trained through p = param_scale · scales ⊙ q, with N(0, grad_noise²) added to ∇q."""

    base: Any  # the family's task (a pytree)
    param_scale: jax.Array  # () float32
    grad_noise: jax.Array  # () float32
    scales: Any = None  # per-tensor × per-parameter scales: a pytree shaped as the params, or None

    def _scale(self, params, inverse: bool = False):
        scales = self.scales if self.scales is not None else jax.tree.map(lambda _: 1.0, params)
        if inverse:
            return jax.tree.map(lambda p, s: p / (self.param_scale * s), params, scales)
        return jax.tree.map(lambda q, s: q * (self.param_scale * s), params, scales)

    def init(self, key: jax.Array):
        return self._scale(self.base.init(key), inverse=True)

    def loss(self, params, key: jax.Array, batch) -> jax.Array:
        noise_key, loss_key = jax.random.split(key)
        params = _with_gradient_noise(params, noise_key, self.grad_noise)
        return self.base.loss(self._scale(params), loss_key, batch)

    def batch(self, key: jax.Array, split: str):
        return self.base.batch(key, split)


_SCALE_RANGES = ("tensor_scale", "element_scale")
_AUGMENT_KEYS = {"param_scale", "grad_noise", *_SCALE_RANGES, "scale_seed"}


def split_augment(spec: TaskSpec) -> tuple[TaskSpec, dict[str, Any] | None]:
    """(the spec without its augmentation, the augmentation's settings or None)."""
    if AUGMENT_KEY not in spec.kwargs:
        return spec, None
    kwargs = dict(spec.kwargs)
    augment = kwargs.pop(AUGMENT_KEY)
    if not isinstance(augment, dict) or set(augment) - _AUGMENT_KEYS:
        raise ValueError(
            f"bad task spec {spec.to_json()}: 'augment' must be an object with some of "
            f"{sorted(_AUGMENT_KEYS)}"
        )
    scale, noise = float(augment.get("param_scale", 1.0)), float(augment.get("grad_noise", 0.0))
    if not (scale > 0 and noise >= 0 and math.isfinite(scale) and math.isfinite(noise)):
        raise ValueError(f"bad task spec {spec.to_json()}: need param_scale > 0 and grad_noise >= 0")
    settings: dict[str, Any] = {"param_scale": scale, "grad_noise": noise}
    if any(k in augment for k in (*_SCALE_RANGES, "scale_seed")):
        try:
            ranges = {k: _log_range(k, augment.get(k, (1.0, 1.0))) for k in _SCALE_RANGES}
            seed = augment["scale_seed"]
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"scale_seed must be an int >= 0, got {seed!r}")
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"bad task spec {spec.to_json()}: per-tensor and per-parameter scales need "
                             f"'tensor_scale' / 'element_scale' as [low, high] with 0 < low <= high and a "
                             f"'scale_seed': {e}") from None
        settings.update(ranges, scale_seed=seed)
    return TaskSpec(spec.name, kwargs), settings


def _log_range(name: str, value: Any) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"{name} needs 0 < low <= high, got {list(value)}")
    return lo, hi


def draw_scales(params_shape: Any, seed: int, tensor_scale: tuple[float, float],
                element_scale: tuple[float, float]) -> Any:
    """One log-uniform scale per tensor times one per parameter, shaped as `params_shape` (a pytree
    of shapes/ShapeDtypeStructs); deterministic in `seed`."""
    leaves, treedef = jax.tree.flatten(params_shape)
    key = jax.random.key(seed)

    def log_uniform(k, shape, lo, hi):
        return jnp.exp(jax.random.uniform(k, shape, jnp.float32, math.log(lo), math.log(hi)))

    scales = [
        log_uniform(jax.random.fold_in(key, 2 * i), (), *tensor_scale)
        * log_uniform(jax.random.fold_in(key, 2 * i + 1), leaf.shape, *element_scale)
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, scales)


def augment_task(task: Task, param_scale: float, grad_noise: float, tensor_scale=None, element_scale=None,
                 scale_seed: int | None = None) -> AugmentedTask:
    scales = None
    if scale_seed is not None:
        shapes = jax.eval_shape(task.init, jax.random.key(0))
        scales = draw_scales(shapes, scale_seed, tensor_scale or (1.0, 1.0), element_scale or (1.0, 1.0))
    return AugmentedTask(task, jnp.asarray(param_scale, jnp.float32), jnp.asarray(grad_noise, jnp.float32),
                         scales)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Sampling ranges: param_scale (one global scale), tensor_scale (one per tensor) and
    element_scale (one per parameter) log-uniform, grad_noise uniform."""

    param_scale: tuple[float, float] = (1.0, 1.0)
    grad_noise: tuple[float, float] = (0.0, 0.0)
    tensor_scale: tuple[float, float] = (1.0, 1.0)
    element_scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        nlo, nhi = self.grad_noise
        scale_ranges = (self.param_scale, self.tensor_scale, self.element_scale)
        if not (all(0 < a <= b for a, b in scale_ranges) and 0 <= nlo <= nhi):
            raise ValueError(
                f"augmentation ranges need 0 < low <= high for param_scale, tensor_scale and "
                f"element_scale, and 0 <= grad_noise low <= high, got param_scale={self.param_scale}, "
                f"tensor_scale={self.tensor_scale}, element_scale={self.element_scale}, "
                f"grad_noise={self.grad_noise}"
            )

    def apply(self, key: jax.Array, spec: TaskSpec) -> TaskSpec:
        """`spec` with a sampled augmentation in its kwargs."""
        scale_key, noise_key, seed_key = jax.random.split(key, 3)
        log_lo, log_hi = math.log(self.param_scale[0]), math.log(self.param_scale[1])
        scale = math.exp(float(jax.random.uniform(scale_key, (), minval=log_lo, maxval=log_hi)))
        noise = float(jax.random.uniform(noise_key, (), minval=self.grad_noise[0], maxval=self.grad_noise[1]))
        augment: dict[str, Any] = {"param_scale": scale, "grad_noise": noise}
        if self.tensor_scale != (1.0, 1.0) or self.element_scale != (1.0, 1.0):
            augment.update(tensor_scale=list(self.tensor_scale), element_scale=list(self.element_scale),
                           scale_seed=int(jax.random.randint(seed_key, (), 0, 2**31 - 1)))
        return TaskSpec(spec.name, {**spec.kwargs, AUGMENT_KEY: augment})
