"""Dense layers and minibatch drawing shared by the image and tabular families."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metaopt.task_zoo.base import SPLITS, TRAIN, TaskCost
from metaopt.task_zoo.layer_stats import Taps, tap

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
}


def dense_init(key: jax.Array, sizes: Sequence[int], scale: jax.Array) -> dict:
    """{"layer_i": {"w": (sizes[i], sizes[i+1]), "b": (sizes[i+1],)}} float32; w is LeCun-normal
    times `scale` (a leaf, so the scale does not change the compiled program), b is zero."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        w = jax.random.normal(k, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
        params[f"layer_{i}"] = {"w": scale * w, "b": jnp.zeros(fan_out, jnp.float32)}
    return params


def dense_apply(params: dict, x: jax.Array, n: int, activation: str, prefix: int = 0,
                taps: Taps | None = None) -> jax.Array:
    """(B, in) -> (B, out) through layers prefix .. prefix+n-1; no activation after the last.
    `taps`: see `task_zoo.layer_stats`."""
    for i in range(prefix, prefix + n):
        name = f"layer_{i}"
        x = tap(taps, name, x, x @ params[name]["w"] + params[name]["b"])
        if i < prefix + n - 1:
            x = ACTIVATIONS[activation](x)
    return x


def dense_cost(sizes: Sequence[int], batch_size: int) -> TaskCost:
    """Exact parameter count of a dense stack; FLOPs = 3 x forward, forward = 2 * B * (weights
    + biases) (a multiply-add per weight, a bias add and activation per unit)."""
    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return TaskCost(parameters=params, flops_per_step=3.0 * 2.0 * batch_size * params)


def split_data(task, split: str) -> dict[str, jax.Array]:
    """{"x": task.<split>_x, "y": task.<split>_y} of a task holding train_/test_ arrays."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == TRAIN:
        return {"x": task.train_x, "y": task.train_y}
    return {"x": task.test_x, "y": task.test_y}


def draw(data: dict[str, jax.Array], key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """`batch_size` rows of every array in `data`, drawn with replacement (jittable)."""
    idx = jax.random.randint(key, (batch_size,), 0, next(iter(data.values())).shape[0])
    return {k: v[idx] for k, v in data.items()}
