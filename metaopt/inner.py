"""One step of inner training, as the evaluation and tuning loops take it, with what a task may ask
of the loop beyond its loss: per-layer statistics for the optimizers that precondition with them
(task_zoo/layer_stats.py), and rewiring between steps for a sparse task (task_zoo/sparse.py).

    carry = inner.init(task, tx, params)
    for i in range(num_steps):
        carry, loss = inner.step(task, optimizer, tx, carry, (batch_key, loss_key), i, num_steps)
    params = carry[0]; task_now = inner.current(task, carry)   # a sparse task's topology moves

`check(task, optimizer, theta, num_steps)` says beforehand why the two cannot train together, if they cannot.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from metaopt import task_zoo
from metaopt.optimizers import slots
from metaopt.task_zoo.layer_stats import has_layer_stats, loss_grad_and_extras
from metaopt.task_zoo.sparse import rewires

Carry = tuple[Any, Any, Any]  # (params, optimizer state, topology: a sparse task's, else None)


def check(task: Any, optimizer: Any, theta: Any, num_steps: int) -> str | None:
    """Why `optimizer` (at θ) cannot train `task`: its statistics are missing, or it cannot reset
    the slots the task rewires. None when it can. Traces shapes only; trains nothing."""
    if getattr(optimizer, "needs_layer_stats", False) and not has_layer_stats(task):
        return (f"{optimizer.name} needs per-layer statistics, which {type(task).__name__} cannot "
                "provide (no tapped_loss; see metaopt.task_zoo.layer_stats)")
    if rewires(task):
        def reset(key):
            tx = optimizer.as_optax(theta, num_steps)
            params = task.init(key)
            return slots.reset_slots(optimizer, tx, tx.init(params), jax.tree.map(lambda x: x != x, params))

        try:
            jax.eval_shape(reset, jax.random.key(0))
        except slots.SlotResetError as e:
            return str(e)
    return None


def init(task: Any, tx: optax.GradientTransformation, params: Any) -> Carry:
    return params, tx.init(params), task.topology if rewires(task) else None


def current(task: Any, carry: Carry) -> Any:
    """`task` with the carry's topology (a sparse task rewired so far), else `task` itself."""
    return task if carry[2] is None else task.replace(topology=carry[2])


def step(task: Any, optimizer: Any, tx: optax.GradientTransformation, carry: Carry,
         keys: tuple[jax.Array, jax.Array], index: jax.Array, num_steps: int) -> tuple[Carry, jax.Array]:
    """Step `index` (0-based) of a `num_steps` run: the loss and gradient on a fresh training
    minibatch (`keys`: its batch key and the loss's key), the optimizer's update and, for a rewired
    task, RigL after it with the regrown slots' optimizer state reset. Returns (carry, loss)."""
    params, state, topology = carry
    task = current(task, carry)
    batch_key, loss_key = keys
    loss, grads, extra = loss_grad_and_extras(task, optimizer, params, loss_key,
                                              task.batch(batch_key, task_zoo.TRAIN))
    updates, state = tx.update(grads, state, params, loss=loss, **extra)
    params = optax.apply_updates(params, updates)
    if topology is not None:
        topology, params, regrown = task.rewire(params, index + 1, num_steps, jax.random.fold_in(loss_key, 1))
        state = slots.reset_slots(optimizer, tx, state, regrown)
    return (params, state, topology), loss
