"""Family ``quadratic``: noisy, ill-conditioned diagonal quadratics.

Loss (normalised by `dim` so its scale does not grow with the dimension)::

    loss(x) = 0.5 * mean_i( curvature_i * (x_i - center_i - batch_i)**2 )

Train batches are ``noise * N(0, I)``; test batches are zeros, so the test loss is the noise-free
quadratic, whose minimum is 0 at ``x = center``. The expected train loss at that minimum is
``0.5 * noise**2 * mean(curvature)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from metaopt.task_zoo._spec import spec_error, spec_kwargs
from metaopt.task_zoo.base import SPLITS, TRAIN, TaskCost, TaskSpec

NAME = "quadratic"


@struct.dataclass
class QuadraticTask:
    """One quadratic. `dim` is static; everything else is a leaf, so tasks of one `dim` share
    one compiled program whatever their curvature, center, noise or init scale."""

    curvature: jax.Array  # (dim,) float32, in [1, 10**log10_condition]
    center: jax.Array  # (dim,) float32, the minimiser
    noise: jax.Array  # () float32, std of the train-batch perturbation of the center
    init_scale: jax.Array  # () float32, std of the initial x
    dim: int = struct.field(pytree_node=False)

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        """{"x": (dim,) float32} drawn from N(0, init_scale**2)."""
        return {"x": self.init_scale * jax.random.normal(key, (self.dim,), jnp.float32)}

    def loss(self, params: dict[str, jax.Array], key: jax.Array, batch: jax.Array) -> jax.Array:
        """Scalar float32; `batch` is a (dim,) shift of the center. `key` is unused."""
        del key
        diff = params["x"] - self.center - batch
        return 0.5 * jnp.mean(self.curvature * diff**2)

    def batch(self, key: jax.Array, split: str) -> jax.Array:
        """(dim,) float32: noise * N(0, I) for train, zeros for test (noise-free evaluation)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == TRAIN:
            return self.noise * jax.random.normal(key, (self.dim,), jnp.float32)
        return jnp.zeros((self.dim,), jnp.float32)


def _range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a [low, high] pair of numbers, got {value!r}") from None
    if not lo <= hi:
        raise ValueError(f"{name} must be a (low, high) range with low <= high, got {value!r}")
    return lo, hi


class QuadraticFamily:
    """Distribution over quadratics: dim from `dims`, log10 condition number and noise uniform
    in their ranges. Example: ``QuadraticFamily(dims=(8,), log10_condition=(0., 2.))``."""

    name = NAME
    description = "noisy quadratic bowls: sampled dimension, condition number and gradient noise"

    def __init__(
        self,
        dims: Sequence[int] = (8, 16, 32),
        log10_condition: Sequence[float] = (0.0, 3.0),
        noise: Sequence[float] = (0.0, 0.5),
    ):
        self.dims = tuple(int(d) for d in dims)
        if not self.dims or min(self.dims) < 1:
            raise ValueError(f"dims must be a non-empty set of positive ints, got {dims!r}")
        self.log10_condition = _range("log10_condition", log10_condition)
        self.noise = _range("noise", noise)
        if self.log10_condition[0] < 0 or self.noise[0] < 0:
            raise ValueError("log10_condition and noise ranges must be non-negative")

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python numbers."""
        k_dim, k_cond, k_noise, k_seed = jax.random.split(key, 4)
        dim = self.dims[int(jax.random.randint(k_dim, (), 0, len(self.dims)))]
        cond = float(
            jax.random.uniform(
                k_cond, (), minval=self.log10_condition[0], maxval=self.log10_condition[1]
            )
        )
        noise = float(jax.random.uniform(k_noise, (), minval=self.noise[0], maxval=self.noise[1]))
        seed = int(jax.random.randint(k_seed, (), 0, 2**31 - 1))
        return TaskSpec(NAME, {"dim": dim, "log10_condition": cond, "noise": noise, "seed": seed})

    def cost(self, spec: TaskSpec) -> TaskCost:
        """A handful of elementwise operations per dimension, forward and backward."""
        dim = int(spec.kwargs["dim"])
        return TaskCost(parameters=dim, flops_per_step=12.0 * dim)

    def task_fn(self, spec: TaskSpec) -> QuadraticTask:
        """Spec kwargs: dim, log10_condition, noise, seed; optional init_scale (default 1)."""
        kw = spec_kwargs(
            spec,
            NAME,
            required={"dim": int, "log10_condition": float, "noise": float, "seed": int},
            optional={"init_scale": (float, 1.0)},
        )
        if kw["dim"] < 1:
            raise spec_error(spec, "dim must be >= 1")
        if kw["log10_condition"] < 0 or kw["noise"] < 0 or kw["init_scale"] < 0:
            raise spec_error(spec, "log10_condition, noise and init_scale must be >= 0")
        # numpy on the host: the spec fully determines the arrays, independent of JAX's PRNG.
        rng = np.random.default_rng(kw["seed"])
        curvature = rng.permutation(np.logspace(0.0, kw["log10_condition"], kw["dim"]))
        center = rng.standard_normal(kw["dim"])
        return QuadraticTask(
            curvature=jnp.asarray(curvature, jnp.float32),
            center=jnp.asarray(center, jnp.float32),
            noise=jnp.asarray(kw["noise"], jnp.float32),
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            dim=kw["dim"],
        )
