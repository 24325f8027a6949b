"""`lgl2o`: Loss-Guarded L2O (Prémont-Schwarz, Vítků & Feyereisl, "A Simple Guard for Learned
Optimizers", ICML 2022) around any learned optimizer.

Every step both the learned optimizer and a hand-designed fallback propose an update from the
same gradient, and the guard keeps the one whose predicted loss is lower. The paper compares
the loss at the two candidate points. Here the rule is, globally over the whole parameter tree
(not per tensor):

  * default (no extra evaluation): the first-order prediction of the loss change,
        Δ(u) = Σ_leaves ⟨g, u⟩          (L(p + u) ≈ L(p) + g·u; L(p) cancels);
  * exact (the paper's rule): if `update` is given `loss_fn=` (a callable params → scalar
    loss, e.g. the current minibatch's loss closed over inside a jitted step), then
        Δ(u) = loss_fn(p + u), at the cost of two extra forward passes per step.

The learned update is kept iff Δ(u_learned) <= Δ(u_fallback) (ties keep the learned one; a NaN
score on the learned side selects the fallback). As in the paper, both optimizers' states are
updated every step from the same gradient and params, whichever update was taken. A
`loss_fn` is a Python callable, so pass it inside a jitted function, not as a jit argument.

Meta-parameters θ = the learned optimizer's θ (the fallback has none of its own to train; a
learned fallback would use its initial θ). Meta-gradients flow through the selected update.
State floats per parameter: learned's + fallback's (small_fc + adam: 6 + 2 = 8).

Registered through the factory `lgl2o(learned=..., fallback=...)`: the hyperparameter is called
`learned` as in the spec, but an Optimizer's `learned` attribute must be the bool flag, so the
dataclass stores the spec as `learned_optimizer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers.lookahead import resolve_spec, spec_of


class LGL2OState(NamedTuple):
    """learned / fallback: the two optimizers' states; learned_steps: () int32 number of steps
    on which the learned update was kept (a cheap diagnostic of how often the guard fires)."""

    learned: Any
    fallback: Any
    learned_steps: jax.Array


def _predicted_change(grads, updates) -> jax.Array:
    """First-order predicted loss change Σ⟨g, u⟩ in float32."""
    dots = [
        jnp.vdot(g.astype(jnp.float32), u.astype(jnp.float32))
        for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates), strict=True)
    ]
    return sum(dots, jnp.float32(0.0))


@dataclasses.dataclass(frozen=True)
class LGL2O:
    """Loss-guarded learned optimizer (see module docstring)."""

    learned_optimizer: Any = None
    fallback: Any = None

    name = "lgl2o"
    description = "loss-guarded L2O: learned update unless the fallback's predicts lower loss (2022)"

    def __post_init__(self):
        object.__setattr__(self, "learned_optimizer", resolve_spec(self.learned_optimizer, "small_fc"))
        object.__setattr__(self, "fallback", resolve_spec(self.fallback, "adam"))

    @property
    def learned(self) -> bool:
        return self.learned_optimizer.learned

    @property
    def hparams(self) -> dict[str, Any]:
        return {"learned": spec_of(self.learned_optimizer), "fallback": spec_of(self.fallback)}

    @property
    def needs_layer_stats(self) -> bool:
        """A curvature fallback (kfac, foof, mbf) reads `layer_stats=`: loops that pass them to
        lgl2o reach it through `update`'s extra arguments; loops that do not get its error."""
        return getattr(self.fallback, "needs_layer_stats", False)

    def init(self, key: jax.Array) -> Any:
        return self.learned_optimizer.init(key)

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        learned = self.learned_optimizer.as_optax(theta, num_steps)
        # A fallback that is itself learned runs with its initial θ (fixed key: deterministic).
        fallback = self.fallback.as_optax(self.fallback.init(jax.random.key(0)), num_steps)

        def init_fn(params):
            return LGL2OState(learned.init(params), fallback.init(params), jnp.zeros((), jnp.int32))

        def update_fn(updates, state, params=None, loss_fn=None, **extra_args):
            u_l, s_l = learned.update(updates, state.learned, params, **extra_args)
            u_f, s_f = fallback.update(updates, state.fallback, params, **extra_args)
            if loss_fn is None:
                score_l, score_f = _predicted_change(updates, u_l), _predicted_change(updates, u_f)
            else:
                if params is None:
                    raise ValueError("lgl2o's exact rule (loss_fn=) needs params")
                score_l = loss_fn(optax.apply_updates(params, u_l))
                score_f = loss_fn(optax.apply_updates(params, u_f))
            keep = score_l <= score_f  # False when score_l is NaN: fall back
            new_updates = jax.tree.map(lambda a, b: jnp.where(keep, a, b), u_l, u_f)
            steps = state.learned_steps + keep.astype(jnp.int32)
            return new_updates, LGL2OState(s_l, s_f, steps)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lgl2o(learned: Any = None, fallback: Any = None) -> LGL2O:
    """Registry factory: `learned` (default small_fc) and `fallback` (default adam) are
    optimizer names, {"name", "hparams"} dicts or Optimizers."""
    return LGL2O(learned_optimizer=learned, fallback=fallback)
