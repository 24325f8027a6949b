"""Gradient estimators for meta-training: Persistent ES and truncated ES, as pure jitted functions.

They differentiate any meta-objective (workers/objective.py: `init_state` and `step` of an
unrolled system with meta-parameters θ; a learned optimizer training a task is one). Both
unroll it for one truncation of `truncation_length` steps, for
`num_particles` antithetic pairs (θ+ε, θ−ε) batched into one program with `vmap`, each
truncation one `lax.scan`. The two halves of a pair share their inner initialisation and
their data (the same keys), so the difference of their losses is due to ε alone.
With several devices (`devices`, default all local ones) the 2P halves are split evenly
across them with `shard_map`: each device unrolls its share, as halves never interact.

PES (Vicol, Metz & Sohl-Dickstein, ICML 2021). Each pair keeps an accumulator ξ of the
perturbations applied since its last inner reset. For one truncation with fresh ε ~ N(0, σ²I),

    ĝ = mean over pairs of  [ΔL_before · (ξ + ε) + ΔL_after · ε] / (2σ²),

where ΔL_before (ΔL_after) is the difference L(θ+·) − L(θ−·) of the truncation's mean loss
restricted to the steps before (at and after) an inner reset inside the truncation: losses
after a reset depend only on the fresh ε. Afterwards ξ ← ξ + ε, or ξ ← ε if the pair reset.
ĝ is an unbiased estimate of the gradient of the Gaussian-smoothed loss of the whole
(untruncated) inner run. Truncated ES is the same with ξ ≡ 0: it ignores how θ shaped the
state the truncation started from, and is biased for that.

Inner resets happen after `inner_horizon` steps; with `stagger`, each pair's first inner run
is cut short (its step counter starts at a random value), so resets are spread across
truncations. The optimizer in such a first run still counts from step 0: its progress
features see a run that ends early, once per particle. (Unrolling a random number of warm-up
steps instead would cost up to a horizon of compute per worker start.)
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metaopt.jobspec import EstimatorSpec
from metaopt.optimizers.base import Theta
from metaopt.workers.objective import MetaObjective, step_batch


@flax.struct.dataclass
class ParticleState:
    """Inner state of every particle. Leading axis 2P (+ halves then − halves) for `inner` (the
    objective's state) and `initial_loss`, P for the rest."""

    inner: Any
    step: jax.Array  # int32 [P], inner steps since the last reset
    episode_key: jax.Array  # key [P], seeds the current inner run's init and data
    initial_loss: jax.Array  # float32 [2P], loss at the current inner run's first step; NaN: unset
    accumulator: Theta  # θ-shaped with leading P: ξ, perturbations since the last reset


def _halves_mesh(num_halves: int, devices) -> jax.sharding.Mesh | None:
    """A one-axis mesh over which the particle halves are split, or None for one device.

    `devices` default to all local devices of the default backend: a worker with several
    GPUs, or a CPU process started with JAX_NUM_CPU_DEVICES=n (one device per core), runs its
    halves side by side. Uses the most devices that divide `num_halves` evenly.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    count = max(n for n in range(1, len(devices) + 1) if num_halves % n == 0)
    return None if count == 1 else jax.sharding.Mesh(devices[:count], ("halves",))


def _both_halves(tree):
    """Repeat a [P, ...] pytree to [2P, ...] (both halves of each pair share it)."""
    return jax.tree.map(lambda x: jnp.concatenate([x, x]), tree)


def _select(condition, new, old):
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


class ESEstimator:
    """PES or truncated ES of a meta-objective; `init` then `estimate` per truncation."""

    def __init__(self, config: EstimatorSpec, devices=None):
        self.config = config
        self.mesh = _halves_mesh(2 * config.num_particles, devices)
        # An objective is a pytree argument, so objectives of one shape share one compiled program.
        self.init = jax.jit(self._init)
        self.estimate = jax.jit(self._estimate, donate_argnums=(2,))

    @property
    def num_devices(self) -> int:
        """Devices the particle halves are split across."""
        return 1 if self.mesh is None else self.mesh.size

    @property
    def inner_steps_per_estimate(self) -> int:
        """Inner steps one `estimate` runs: both halves of every pair, K steps each."""
        return 2 * self.config.num_particles * self.config.truncation_length

    def _init(self, key: jax.Array, theta: Theta, objective: MetaObjective) -> ParticleState:
        """Fresh particles at θ. Returns a `ParticleState` for `num_particles` pairs."""
        cfg = self.config
        start_key, episode_key = jax.random.split(key)
        episode_keys = jax.random.split(episode_key, cfg.num_particles)
        inner = jax.vmap(objective.init_state, in_axes=(0, None))(episode_keys, theta)
        if cfg.stagger:
            step = jax.random.randint(start_key, (cfg.num_particles,), 0, cfg.inner_horizon)
        else:
            step = jnp.zeros((cfg.num_particles,), jnp.int32)
        accumulator = jax.tree.map(lambda t: jnp.zeros((cfg.num_particles, *t.shape)), theta)
        return ParticleState(
            inner=_both_halves(inner),
            step=step.astype(jnp.int32),
            episode_key=episode_keys,
            initial_loss=jnp.full((2 * cfg.num_particles,), jnp.nan, jnp.float32),
            accumulator=accumulator,
        )

    def _begin(self, carry, reset_key, fresh):
        """A half's step up to the objective's: the reset rule (a fresh episode, the inner state
        `fresh` = init_state(reset_key, θ), once its horizon is reached) and the step's key."""
        inner, step, episode_key, initial_loss = carry
        reset = step >= self.config.inner_horizon
        # Under vmap a branch would run both sides anyway, so select instead of `lax.cond`.
        inner = _select(reset, fresh, inner)
        step = jnp.where(reset, 0, step)
        episode_key = jnp.where(reset, reset_key, episode_key)
        step_key = jax.random.fold_in(episode_key, step + 1)
        return (inner, step, episode_key, initial_loss), reset, step_key

    def _finish(self, carry, reset, loss):
        inner, step, episode_key, initial_loss = carry
        # A first step (after a reset, or the first one a staggered particle takes) sets the scale.
        initial_loss = jnp.where(reset | jnp.isnan(initial_loss), loss, initial_loss)
        return (inner, step + 1, episode_key, initial_loss), (self._meta_loss(loss, initial_loss), reset)

    def _inner_step(self, objective: MetaObjective, theta_i, carry, reset_key, fresh):
        """One step of one particle half (unbatched): `_begin`, the objective's step, `_finish`."""
        carry, reset, step_key = self._begin(carry, reset_key, fresh)
        inner, *rest = carry
        inner, loss = objective.step(theta_i, inner, step_key)
        return self._finish((inner, *rest), reset, loss)

    def _meta_loss(self, loss, initial_loss):
        if self.config.loss_normalization == "none":
            return loss
        cap = self.config.max_loss_ratio
        ratio = loss / jnp.maximum(initial_loss, jnp.finfo(jnp.float32).tiny)
        ratio = jnp.minimum(jnp.nan_to_num(ratio, nan=cap, posinf=cap), cap)
        if self.config.loss_normalization == "log":
            return jnp.log(jnp.maximum(ratio, self.config.min_loss_ratio))
        return ratio

    def _estimate(self, key: jax.Array, theta: Theta, state: ParticleState, objective: MetaObjective):
        """One truncation. Returns (new state, flat float32 estimate, metrics dict).

        The estimate is `ravel_pytree(θ)`-ordered (leaves of θ in tree order) and has θ's size.
        """
        cfg = self.config
        P, K, sigma = cfg.num_particles, cfg.truncation_length, cfg.sigma
        eps_key, reset_key = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(theta)
        eps_leaves = [
            sigma * jax.random.normal(k, (P, *leaf.shape), jnp.float32)
            for k, leaf in zip(jax.random.split(eps_key, len(leaves)), leaves, strict=True)
        ]
        eps = jax.tree.unflatten(treedef, eps_leaves)
        perturbed = jax.tree.map(lambda t, e: jnp.concatenate([t + e, t - e]), theta, eps)
        reset_keys = _both_halves(jax.random.split(reset_key, P))

        carry = (state.inner, _both_halves(state.step), _both_halves(state.episode_key), state.initial_loss)
        unroll = self._unroll_halves
        if self.mesh is not None:
            halves = jax.sharding.PartitionSpec("halves")
            unroll = jax.shard_map(unroll, mesh=self.mesh, out_specs=halves,
                                   in_specs=(jax.sharding.PartitionSpec(), halves, halves, halves))
        out = unroll(objective, perturbed, reset_keys, carry)
        (inner, step, episode_key, initial_loss), (losses, resets) = out
        # losses, resets: [2P, K]. A pair resets in both halves at the same step.
        after_reset = jnp.cumsum(resets[:P], axis=1) > 0  # [P, K]
        diff = losses[:P] - losses[P:]
        diff_before = jnp.sum(jnp.where(after_reset, 0.0, diff), axis=1) / K  # [P]
        diff_after = jnp.sum(jnp.where(after_reset, diff, 0.0), axis=1) / K
        did_reset = after_reset[:, -1]

        def per_leaf(acc, e):
            expand = (slice(None),) + (None,) * (e.ndim - 1)
            xi = acc + e if cfg.persistent else e
            grad = (diff_before[expand] * xi + diff_after[expand] * e) / (2 * sigma**2)
            new_acc = jnp.where(did_reset[expand], e, xi) if cfg.persistent else acc
            return jnp.mean(grad, axis=0), new_acc

        grads_and_accs = jax.tree.map(per_leaf, state.accumulator, eps)
        grad = jax.tree.map(lambda _, ga: ga[0], theta, grads_and_accs)
        accumulator = jax.tree.map(lambda _, ga: ga[1], theta, grads_and_accs)
        new_state = ParticleState(inner=inner, step=step[:P], episode_key=episode_key[:P],
                                  initial_loss=initial_loss, accumulator=accumulator)
        # mean_loss is the meta-loss: normalised as configured, over both halves and all steps.
        metrics = {"mean_loss": jnp.mean(losses), "resets": jnp.sum(did_reset)}
        return new_state, ravel_pytree(grad)[0].astype(jnp.float32), metrics

    def _unroll_halves(self, objective: MetaObjective, perturbed: Theta, reset_keys: jax.Array, carry):
        """K steps of every half in `carry` (inner state, step, episode_key, initial_loss;
        leading axis: halves) under its θ in `perturbed`, one `lax.scan`; returns (carry,
        (meta-losses [halves, K], resets [halves, K])). Halves are independent, so this runs on
        each device's share of them when `mesh` shards the halves."""
        # The reset key is fixed for the truncation: the fresh inner state is computed once.
        fresh = jax.vmap(objective.init_state)(reset_keys, perturbed)

        def body(carry, _):
            carry, reset, step_keys = jax.vmap(self._begin)(carry, reset_keys, fresh)
            inner, *rest = carry
            inner, loss = step_batch(objective, perturbed, inner, step_keys)
            return jax.vmap(self._finish)((inner, *rest), reset, loss)

        carry, (losses, resets) = jax.lax.scan(body, carry, length=self.config.truncation_length)
        return carry, (losses.T, resets.T)


ESTIMATORS = ("pes", "truncated_es", "full_es", "tbptt")


def make_estimator(kind: str, devices=None, **settings) -> ESEstimator:
    """`kind` is one of ESTIMATORS; `settings` are the other fields of the job spec's
    `EstimatorSpec` (its defaults and checks). All four share the interface (`init(key, θ,
    objective)`, `estimate(key, θ, state, objective)`, `inner_steps_per_estimate`), so they can
    be compared. PES and truncated ES split their particle halves across `devices` (default: all
    local devices); full ES and TBPTT run on the default device."""
    if kind not in ESTIMATORS:
        raise ValueError(f"unknown estimator {kind!r}; known: {list(ESTIMATORS)}")
    config = EstimatorSpec(kind=kind, **settings)
    if kind in ("pes", "truncated_es"):
        return ESEstimator(config, devices)
    # Imported here: both build on ESEstimator, so they import this module.
    from metaopt.workers.full_es import FullES
    from metaopt.workers.tbptt import TruncatedBackprop

    return {"full_es": FullES, "tbptt": TruncatedBackprop}[kind](config)
