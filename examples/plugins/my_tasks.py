"""A task family of my own: noisy Rosenbrock valleys (docs/plugins.md).

A job spec names it `family: "my_tasks:RosenbrockFamily"`; `metaopt train` imports it from the
current directory, and `metaopt submit` ships this file to the cluster's workers.
"""

import jax
import jax.numpy as jnp
from flax import struct

from metaopt import task_zoo


@struct.dataclass  # a pytree: tasks of one dim share one compiled program
class Rosenbrock:
    floor: jax.Array  # () where the valley's minimum lies: x = (floor, floor**2, ...)
    noise: jax.Array  # () std of the noise a train batch adds to the evaluation point
    dim: int = struct.field(pytree_node=False)

    def init(self, key):
        return {"x": jax.random.uniform(key, (self.dim,), minval=-1.5, maxval=1.5)}

    def loss(self, params, key, batch):
        x = params["x"] + batch
        a, b = x[:-1], x[1:]
        return jnp.mean(10.0 * (b - a**2) ** 2 + (self.floor - a) ** 2)

    def batch(self, key, split):
        if split == task_zoo.TRAIN:
            return self.noise * jax.random.normal(key, (self.dim,))
        return jnp.zeros((self.dim,))  # the test loss is the noise-free valley


class RosenbrockFamily:
    name = "rosenbrock"
    description = "noisy Rosenbrock valleys of sampled dimension and floor"

    def __init__(self, dims=(4, 8), noise=0.01):
        self.dims, self.noise = [int(d) for d in dims], float(noise)

    def sample(self, key):
        dim_key, floor_key = jax.random.split(key)
        dim = self.dims[int(jax.random.randint(dim_key, (), 0, len(self.dims)))]
        floor = float(jax.random.uniform(floor_key, (), minval=0.5, maxval=1.5))
        return task_zoo.TaskSpec(self.name, {"dim": dim, "floor": floor, "noise": self.noise})

    def task_fn(self, spec):
        kw = spec.kwargs
        return Rosenbrock(jnp.float32(kw["floor"]), jnp.float32(kw["noise"]), int(kw["dim"]))

    def cost(self, spec):
        dim = int(spec.kwargs["dim"])
        return task_zoo.TaskCost(parameters=dim, flops_per_step=30.0 * dim)
