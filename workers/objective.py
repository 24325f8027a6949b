"""Meta-objectives: the unrolled systems the estimators differentiate with respect to θ.

PES was introduced for any unrolled computation (Vicol et al. 2021), and so are the estimators
here: they see a `MetaObjective`, three functions with explicit keys,

    init_theta(key) -> θ                      the meta-parameters' starting point
    init_state(key, θ) -> state               a fresh inner run (an episode), seeded by `key`
    step(θ, state, key) -> (state, loss)      one inner step; `key` seeds its randomness

and the estimators own the rest: episodes of `inner_horizon` steps (the reset rule: a fresh
`init_state` when one ends), the keys (an episode's init and every step's data are derived from
its episode key, so the two halves of an antithetic pair see the same ones), the meta-loss
normalisation, and the unroll itself (one `lax.scan` per truncation). `loss` is the meta-loss
of that step: what meta-training lowers (an inner training loss for a learned optimizer, a
held-out loss for a learned loss function).

An objective is a pytree: its arrays (a task's data) are leaves and its settings static, so
objectives of one shape share one compiled estimator. An objective may also define
`step_batch(θs, states, keys)`, the step of many halves at once (default: `jax.vmap(step)`),
where batching them differently is faster; `LearnedOptimizerTraining` does on CPU.

A job meta-learns a `Learnable` (`learnable(spec)`): θ's starting point and, for each task a
worker samples, the objective θ is trained on. That is its optimizer (`LearnedOptimizer`: the
optimizer training the task) unless the spec names a `meta_objective` (metaopt/learnables.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers.base import Optimizer, Theta
from metaopt.optimizers.slots import reset_slots
from metaopt.task_zoo.base import TRAIN, Task
from metaopt.task_zoo.sparse import rewires

State = Any


class MetaObjective(Protocol):
    def init_theta(self, key: jax.Array) -> Theta: ...

    def init_state(self, key: jax.Array, theta: Theta) -> State: ...

    def step(self, theta: Theta, state: State, key: jax.Array) -> tuple[State, jax.Array]: ...


class Learnable(Protocol):
    name: str  # what rebuilds it: make(name, **hparams) of its registry
    hparams: dict[str, Any]
    kind: str  # "optimizer", "schedule", ...: what an artifact of it holds

    def init_theta(self, key: jax.Array) -> Theta: ...

    def objective(self, task: Task, num_steps: int) -> MetaObjective: ...


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
    """A learned optimizer as a job's learnable: trained by training tasks."""

    optimizer: Optimizer
    kind = "optimizer"

    @property
    def name(self) -> str:
        return self.optimizer.name

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.optimizer.hparams)

    def init_theta(self, key: jax.Array) -> Theta:
        return self.optimizer.init(key)

    def objective(self, task: Task, num_steps: int) -> LearnedOptimizerTraining:
        return LearnedOptimizerTraining(task, self.optimizer, num_steps)


def learnable(spec: dict[str, Any]) -> Learnable:
    """What the job spec (a JobSpec's JSON dict) meta-learns: its meta_objective if it names one,
    else its optimizer."""
    from metaopt import learnables, optimizers

    if spec.get("meta_objective"):
        return learnables.make(spec["meta_objective"]["name"], **spec["meta_objective"].get("hparams", {}))
    settings = spec.get("optimizer") or {}
    return LearnedOptimizer(optimizers.make(settings.get("name", "small_fc"), **settings.get("hparams", {})))


def step_batch(objective: MetaObjective, thetas: Theta, states: State, keys: jax.Array):
    """One step of every half (leading axis of all three), as the objective batches it."""
    batched = getattr(objective, "step_batch", None)
    return batched(thetas, states, keys) if batched else jax.vmap(objective.step)(thetas, states, keys)


@flax.struct.dataclass
class LearnedOptimizerTraining:
    """A learned optimizer training a task: θ is the optimizer's, the state the task's parameters
    and the optimizer's state, the loss the task's training loss on a fresh minibatch. A sparse
    task that RigL rewires (task_zoo/sparse.py) adds its topology and the step count to the
    state, and is rewired after each update as the evaluation loop does (metaopt/inner.py)."""

    task: Task
    optimizer: Optimizer = flax.struct.field(pytree_node=False)
    num_steps: int = flax.struct.field(pytree_node=False)  # the inner run's length, for its features

    def init_theta(self, key: jax.Array) -> Theta:
        return self.optimizer.init(key)

    def _tx(self, theta: Theta) -> optax.GradientTransformationExtraArgs:
        return self.optimizer.as_optax(theta, num_steps=self.num_steps)

    def init_state(self, key: jax.Array, theta: Theta) -> State:
        params = self.task.init(jax.random.fold_in(key, 0))
        state = params, self._tx(theta).init(params)
        return (*state, self.task.topology, jnp.zeros((), jnp.int32)) if rewires(self.task) else state

    def task_at(self, state: State) -> Task:
        """The task at the state's topology (itself unless rewired)."""
        return self.task.replace(topology=state[2]) if rewires(self.task) else self.task

    def gradient(self, state: State, key: jax.Array):
        """The step's part before the optimizer: the loss and gradient on a fresh minibatch."""
        batch_key, loss_key = jax.random.split(key)
        task = self.task_at(state)
        return jax.value_and_grad(task.loss)(state[0], loss_key, task.batch(batch_key, TRAIN))

    def update(self, theta: Theta, state: State, grads, loss, key: jax.Array | None = None) -> State:
        """The optimizer's update; then, for a rewired task, RigL (seeded by `key`)."""
        tx = self._tx(theta)
        params, opt_state = state[:2]
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        params = optax.apply_updates(params, updates)
        if not rewires(self.task):
            return params, opt_state
        count = state[3] + 1
        topology, params, regrown = self.task_at(state).rewire(params, count, self.num_steps,
                                                             jax.random.fold_in(key, 2))
        return params, reset_slots(self.optimizer, tx, opt_state, regrown), topology, count

    def step(self, theta: Theta, state: State, key: jax.Array):
        loss, grads = self.gradient(state, key)
        return self.update(theta, state, grads, loss, key), loss

    def step_batch(self, thetas: Theta, states: State, keys: jax.Array):
        if jax.default_backend() != "cpu":
            return jax.vmap(self.step)(thetas, states, keys)
        # On CPU the learned optimizer updates one half at a time (`lax.map`): under vmap its
        # per-parameter buffers are 2P times wider and fall out of cache (its update is ~80% of
        # a step here). The loss and gradient are vmapped over the halves. 1.25-1.45x faster for
        # 8-32 pairs of the 64→32→10 MLP; the same numerics.
        loss, grads = jax.vmap(self.gradient)(states, keys)
        states = jax.lax.map(lambda a: self.update(*a), (thetas, states, grads, loss, keys))
        return states, loss
