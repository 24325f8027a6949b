"""Truncated backpropagation through time (TBPTT), behind the `ESEstimator` interface.

`num_particles` independent particles (no antithetic pairs, no perturbation: `sigma` is
ignored) carry their inner state across truncations exactly as PES does (same resets,
`stagger`, data keys and loss normalisation, reusing `ESEstimator`'s inner step). Each
`estimate` unrolls `truncation_length` steps and returns

    ĝ = mean over particles of  ∇θ [mean meta-loss of the truncation],

by `jax.grad` through the K-step unroll. The carried-in inner state is a constant: the
gradient does not flow into how θ shaped it, which is TBPTT's truncation bias (none when
truncation_length == inner_horizon and truncations line up with inner runs: then ĝ is the
exact gradient of the whole-run loss). After an inner reset inside a truncation the gradient
does flow through the fresh run. A particle whose gradient is not finite contributes zero.
Cost: P·K inner steps forward plus their backward pass (≈ 2–3× a forward step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metaopt.optimizers.base import Theta
from metaopt.workers.estimators import ESEstimator, ParticleState
from metaopt.workers.full_es import unroll_truncation
from metaopt.workers.objective import MetaObjective


class TruncatedBackprop(ESEstimator):
    """TBPTT; `init` then `estimate` per truncation, like PES. State leading axis is P."""

    @property
    def inner_steps_per_estimate(self) -> int:
        """Forward inner steps one `estimate` unrolls (plus their backward pass)."""
        return self.config.num_particles * self.config.truncation_length

    def _init(self, key: jax.Array, theta: Theta, objective: MetaObjective) -> ParticleState:
        P = self.config.num_particles
        state = super()._init(key, theta, objective)  # [2P] halves that are identical copies
        return state.replace(inner=jax.tree.map(lambda x: x[:P], state.inner),
                             initial_loss=state.initial_loss[:P])

    def _estimate(self, key: jax.Array, theta: Theta, state: ParticleState, objective: MetaObjective):
        cfg = self.config
        P, K = cfg.num_particles, cfg.truncation_length
        reset_keys = jax.random.split(key, P)

        def truncation_loss(theta_i, key_i, *carry):
            carry, (losses, resets) = unroll_truncation(self, objective, theta_i, carry, key_i, K)
            return jnp.mean(losses), (carry, losses, resets)

        def particle(key_i, *carry):
            # θ is differentiated only inside this truncation: the carried-in state is an input,
            # a constant to jax.grad (the truncation bias).
            return jax.grad(truncation_loss, has_aux=True)(theta, key_i, *carry)

        grads, (carry, losses, resets) = jax.vmap(particle)(
            reset_keys, state.inner, state.step, state.episode_key, state.initial_loss)
        inner, step, episode_key, initial_loss = carry
        flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads).astype(jnp.float32)  # [P, |θ|]
        finite = jnp.all(jnp.isfinite(flat), axis=1, keepdims=True)
        grad = jnp.mean(jnp.where(finite, flat, 0.0), axis=0)
        new_state = state.replace(inner=inner, step=step, episode_key=episode_key, initial_loss=initial_loss)
        metrics = {"mean_loss": jnp.mean(losses), "resets": jnp.sum(jnp.any(resets, axis=1))}
        return new_state, grad, metrics
