"""Optimizers by import path (`my_opts:SignSGD`), as the zoo's own.

A plugin optimizer is any callable `factory(**hparams)` returning an object with the Optimizer
interface (`init(key) -> θ`, `as_optax(θ, num_steps)`, `learned`; `hparams` and `description`
optional). `make` shows it through `PluginOptimizer`, named by the import path, so an artifact
records what rebuilds it; `check` runs the interface on a tiny problem before a job starts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from metaopt import plugins
from metaopt.plugins import PluginError

PluginOptimizer = plugins.Named  # a plugin optimizer under its import path


@functools.cache
def plugin_factory(path: str):
    return plugins.load_factory(path, "optimizer")


def check(opt: PluginOptimizer) -> None:
    """Run the optimizer as meta-training does on a tiny problem (θ from init, one update under
    jit with θ an argument, as the estimators perturb it); a PluginError names the first step
    that fails and why."""
    key = jax.random.key(0)
    params = {"w": jnp.full((3, 2), 0.5, jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    step = "learned"
    try:
        if not isinstance(opt.learned, bool):
            raise TypeError(f"learned is {opt.learned!r}, not a bool")
        step = "init(key)"
        theta = opt.init(key)
        if not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in jax.tree.leaves(theta)):
            raise TypeError("θ must be a pytree of float arrays")
        step = "as_optax(theta, num_steps).init(params)"
        state = opt.as_optax(theta, 10).init(params)
        step = "as_optax(theta, num_steps).update(grads, state, params, loss=...) under jax.jit"

        @jax.jit
        def update(theta, state):
            return opt.as_optax(theta, 10).update(grads, state, params, loss=jnp.float32(1.0))

        updates, _ = update(theta, state)
    except Exception as err:  # noqa: BLE001 - the user's code: say where it broke
        raise PluginError(f"optimizer {opt.name!r}: {step} failed: {type(err).__name__}: {err}") from None
    shapes, got = jax.tree.map(jnp.shape, params), jax.tree.map(jnp.shape, updates)
    if jax.tree.structure(updates) != jax.tree.structure(params) or got != shapes:
        raise PluginError(f"optimizer {opt.name!r}: update returned updates shaped {got} for "
                          f"parameters shaped {shapes}")
    if not all(math.isfinite(float(jnp.sum(u))) for u in jax.tree.leaves(updates)):
        raise PluginError(f"optimizer {opt.name!r}: its first update of a tiny problem is not finite")
