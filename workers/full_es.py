"""Full-run antithetic ES: every estimate unrolls whole inner runs from a fresh inner init.

For `num_particles` antithetic pairs (θ+ε, θ−ε), ε ~ N(0, σ²I), each `estimate` call starts
every pair from a fresh inner initialisation (both halves share it and their data keys) and
unrolls `inner_horizon` steps, then

    ĝ = mean over pairs of  (L+ − L−) · ε / (2σ²),

with L the meta-loss (normalised as configured, see `EstimatorSpec`) averaged over all
`inner_horizon` steps. ĝ is an unbiased estimate of the gradient of the Gaussian-smoothed
full-run objective E_ε[L(θ + ε)] (one ε for the whole run), with no truncation bias, at a
cost of 2·P·inner_horizon inner steps per estimate. `truncation_length` and `stagger` are
ignored; the state carries nothing between calls (it exists for the shared interface).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metaopt.jobspec import EstimatorSpec
from metaopt.optimizers.base import Theta
from metaopt.workers.estimators import ESEstimator, ParticleState
from metaopt.workers.objective import MetaObjective


def unroll_truncation(estimator: ESEstimator, objective: MetaObjective, theta_i, carry, reset_key,
                      length: int):
    """`lax.scan` of `ESEstimator._inner_step` over `length` steps for one particle half:
    returns (carry, (meta-losses [length], resets [length])). A reset inside it restarts from
    `objective.init_state(reset_key, theta_i)` (computed once, as `ESEstimator` does)."""
    fresh = objective.init_state(reset_key, theta_i)

    def body(carry, _):
        return estimator._inner_step(objective, theta_i, carry, reset_key, fresh)

    return jax.lax.scan(body, carry, length=length)


class FullES(ESEstimator):
    """Antithetic ES over whole inner runs; same interface as `ESEstimator`."""

    def __init__(self, config: EstimatorSpec):
        super().__init__(config)
        # The state passes through unchanged: nothing to donate.
        self.estimate = jax.jit(self._estimate)

    @property
    def inner_steps_per_estimate(self) -> int:
        """Forward inner steps one `estimate` unrolls (ESEstimator's is 2·P·K)."""
        return 2 * self.config.num_particles * self.config.inner_horizon

    def _init(self, key: jax.Array, theta: Theta, objective: MetaObjective) -> ParticleState:
        # A minimal state (no inner state): the interface's, carrying nothing between calls.
        P = self.config.num_particles
        return ParticleState(
            inner=(), step=jnp.zeros((P,), jnp.int32),
            episode_key=jax.random.split(key, P),
            initial_loss=jnp.full((2 * P,), jnp.nan, jnp.float32),
            accumulator=jax.tree.map(lambda t: jnp.zeros((P, *t.shape)), theta),
        )

    def run_losses(self, thetas: Theta, episode_keys: jax.Array, objective: MetaObjective) -> jax.Array:
        """[N, inner_horizon] meta-losses of N whole inner runs from fresh inits, run n at
        θ = thetas[n] (leading axis N) seeded by episode_keys[n]. Not jitted (jit the caller)."""
        H = self.config.inner_horizon

        def one_run(theta_i, key_i):
            carry = (objective.init_state(key_i, theta_i), jnp.int32(0), key_i, jnp.float32(jnp.nan))
            # step < inner_horizon throughout: no reset happens.
            _, (losses, _) = unroll_truncation(self, objective, theta_i, carry, key_i, H)
            return losses

        return jax.vmap(one_run)(thetas, episode_keys)

    def _estimate(self, key: jax.Array, theta: Theta, state: ParticleState, objective: MetaObjective):
        cfg = self.config
        P, sigma = cfg.num_particles, cfg.sigma
        eps_key, episode_key = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(theta)
        eps = jax.tree.unflatten(treedef, [
            sigma * jax.random.normal(k, (P, *leaf.shape), jnp.float32)
            for k, leaf in zip(jax.random.split(eps_key, len(leaves)), leaves, strict=True)
        ])
        perturbed = jax.tree.map(lambda t, e: jnp.concatenate([t + e, t - e]), theta, eps)
        keys = jax.random.split(episode_key, P)
        losses = self.run_losses(perturbed, jnp.concatenate([keys, keys]), objective)  # [2P, H]
        diff = jnp.mean(losses[:P], axis=1) - jnp.mean(losses[P:], axis=1)  # [P]

        def per_leaf(e):
            expand = (slice(None),) + (None,) * (e.ndim - 1)
            return jnp.mean(diff[expand] * e, axis=0) / (2 * sigma**2)

        grad = jax.tree.map(per_leaf, eps)
        new_state = state.replace(episode_key=keys)
        # Every pair ran one whole inner run: P resets per estimate.
        metrics = {"mean_loss": jnp.mean(losses), "resets": jnp.int32(P)}
        return new_state, ravel_pytree(grad)[0].astype(jnp.float32), metrics
