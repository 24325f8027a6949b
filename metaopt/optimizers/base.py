"""The one interface every optimizer in metaopt has, learned or hand-designed.

An `Optimizer` turns meta-parameters θ into an ordinary optax transformation:

    opt = metaopt.optimizers.make("small_fc", hidden=32)
    theta = opt.init(jax.random.key(0))          # a pytree (nested dicts of arrays)
    tx = opt.as_optax(theta, num_steps=1000)     # optax.GradientTransformationExtraArgs
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, loss=loss)

Hand-designed optimizers have an empty θ (`{}`) and ignore it. `num_steps` is the length of
the inner training run, for features that encode training progress. Extra keyword arguments
to `update` (such as `loss=`) are optional; optimizers that do not use them ignore them.

An optimizer may take more keyword options in `as_optax`, for what belongs to the user rather
than to θ: `nominal_mlp` takes `learning_rate=` (a rate, or an optax schedule that replaces its
cosine decay), as Celo2 leaves the schedule to the user. `metaopt.load(...).as_optax(num_steps,
**options)` passes them on; an optimizer without such options refuses them with a TypeError.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import optax

Theta = Any  # nested dicts of float32 arrays


class Optimizer(Protocol):
    name: str
    description: str  # one line, for `metaopt list optimizers`
    learned: bool  # whether θ has meta-parameters to train
    hparams: dict[str, Any]  # JSON-serialisable; make(name, **hparams) rebuilds this optimizer

    def init(self, key: jax.Array) -> Theta:
        """Initial meta-parameters θ (nested dicts of float32 arrays; `{}` when there are none)."""

    def as_optax(self, theta: Theta, num_steps: int) -> optax.GradientTransformationExtraArgs:
        """An optax optimizer that applies θ for an inner run of `num_steps` steps."""
