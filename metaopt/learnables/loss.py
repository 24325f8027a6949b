"""`learned_loss`: a classification loss, meta-learned (EvoMAL's gradient-trained stage; ML3).

The loss of logits z and label y is cross-entropy plus a learned correction,

    L_θ(z, y) = CE(z, y) + Σ_c g_θ(p_c, y_c),   p = softmax(z), y one-hot,

g_θ a small MLP applied to each class's (probability, target) pair. Its output layer starts at
zero, so the untrained loss is cross-entropy and meta-training only corrects it (the nominal idea
of the learned optimizers). The model trains on L_θ with Adam; the meta-loss of each step is the
model's cross-entropy on a held-out batch (the task's test split), so θ is rewarded for models
that generalise, not for a small L_θ. It needs tasks that give logits: `task.logits(params, x)`
and batches {"x", "y"} with integer labels (the mlp, cnn and logistic families), and says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

REQUIRES = "logits"  # what a task must offer: task.logits(params, x), batches {"x", "y"}


@dataclasses.dataclass(frozen=True)
class LearnedLoss:
    hidden: int = 8
    learning_rate: float = 1e-3  # the inner Adam's, with which the model trains on the loss

    name = "learned_loss"
    kind = "loss"
    usage = "as_loss()"
    description = "a classification loss: cross-entropy plus a learned per-class correction"
    requires = (REQUIRES,)

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init_theta(self, key: jax.Array) -> dict[str, jax.Array]:
        return {"w0": 0.5 * jax.random.normal(key, (2, self.hidden), jnp.float32),
                "b0": jnp.zeros((self.hidden,), jnp.float32),
                "w1": jnp.zeros((self.hidden,), jnp.float32), "b1": jnp.zeros((), jnp.float32)}

    def as_loss(self, theta: dict):
        """loss(logits (B, C), labels (B,) int) -> scalar: L_θ averaged over the batch."""
        theta = jax.tree.map(jnp.asarray, theta)

        def loss(logits, labels):
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            pairs = jnp.stack([jax.nn.softmax(logits), jax.nn.one_hot(labels, logits.shape[-1])], axis=-1)
            correction = jnp.tanh(pairs @ theta["w0"] + theta["b0"]) @ theta["w1"] + theta["b1"]  # (B, C)
            return jnp.mean(ce + jnp.sum(correction, axis=-1))

        return loss

    def objective(self, task, num_steps: int):
        if not hasattr(task, REQUIRES):
            raise ValueError(f"learned_loss needs tasks that give logits (task.logits(params, x)); "
                             f"{type(task).__name__} does not")
        return LossTraining(task, self)


@dataclasses.dataclass(frozen=True)
class LossTraining:
    """A model trained with Adam on L_θ; the loss of a step is its held-out cross-entropy after it."""

    task: Any
    learned: LearnedLoss

    def init_state(self, key: jax.Array, theta):
        params = self.task.init(jax.random.fold_in(key, 0))
        return params, optax.adam(self.learned.learning_rate).init(params)

    def step(self, theta, state, key: jax.Array):
        params, opt_state = state
        train_key, test_key = jax.random.split(key)
        batch, held_out = self.task.batch(train_key, "train"), self.task.batch(test_key, "test")
        loss = self.learned.as_loss(theta)
        grads = jax.grad(lambda p: loss(self.task.logits(p, batch["x"]), batch["y"]))(params)
        updates, opt_state = optax.adam(self.learned.learning_rate).update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        held_out_ce = optax.softmax_cross_entropy_with_integer_labels(
            self.task.logits(params, held_out["x"]), held_out["y"]).mean()
        return (params, opt_state), held_out_ce


jax.tree_util.register_dataclass(LossTraining, data_fields=["task"], meta_fields=["learned"])
