"""Resetting an optimizer's state for chosen parameter slots: what a sparse task's rewiring needs.

RigL (task_zoo/sparse.py) moves a dropped weight's slot to a newly grown weight between two
optimizer steps. The optax transformation cannot see that: its moments, velocities and windows
for the slot still describe the dropped weight. The training loop therefore calls

    state = reset_slots(optimizer, tx, state, regrown)   # regrown: a bool pytree shaped like params

which sets every per-parameter entry of the regrown slots to 0, what `init` gives a weight (of
value 0, as a grown weight starts). States built by optax, which keep copies of the parameter tree
(Adam's moments, momentum's velocity, Lookahead's slow weights), are reset through
`optax.tree_map_params`; an optimizer whose state is laid out otherwise defines its own
`reset_slots(tx, state, regrown)` (nominal_mlp, M-FAC) or is refused with `SlotResetError`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


class SlotResetError(ValueError):
    """The optimizer's state cannot be reset slot by slot, so it cannot train a rewired task."""


def zero_where(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, jnp.zeros_like(x), x)


def reset_param_trees(name: str, tx: optax.GradientTransformation, state: Any, regrown: Any) -> Any:
    """`state` with the regrown slots zeroed in every copy of the parameter tree it holds. Raises
    SlotResetError when it holds anything else per parameter (any non-scalar outside those copies)."""
    try:
        reset = optax.tree_map_params(tx, zero_where, state, regrown)
        others = optax.tree_map_params(tx, lambda _: None, state)
    except (ValueError, TypeError) as e:
        raise SlotResetError(_message(name, "its state does not hold copies of the parameter tree")) from e
    unknown = [x.shape for x in jax.tree.leaves(others) if jnp.size(x) > 1]
    if unknown:
        raise SlotResetError(_message(name, f"its state holds per-parameter arrays {unknown} "
                                            "outside copies of the parameter tree"))
    return reset


def reset_slots(optimizer: Any, tx: optax.GradientTransformation, state: Any, regrown: Any) -> Any:
    """`state` with every per-parameter entry of the `regrown` slots set to 0 (module docstring)."""
    own = getattr(optimizer, "reset_slots", None)
    if own is not None:
        return own(tx, state, regrown)
    return reset_param_trees(optimizer.name, tx, state, regrown)


def _message(name: str, why: str) -> str:
    return (f"{name} cannot reset the optimizer state of regrown weights ({why}), which a task "
            "rewired by RigL needs; use an optimizer that can (adam, sgd, momentum, nominal_mlp, ...) "
            "or train the tasks' initial topology with rewire_every: 0 in their spec or family")
