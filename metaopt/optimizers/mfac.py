"""M-FAC (Frantar, Kurtic & Alistarh 2021), the dense sliding-window variant, as an optax
transformation and a hand-designed optimizer of the zoo.

The empirical Fisher of the last m gradients (all parameters flattened into one vector of d),

    F = λ·I + (1/m) Σ_{j in window} g_j g_jᵀ,

preconditions the gradient: the step is F⁻¹ g_t. F is never formed. With G the m × d window
(empty slots are zero rows, which add nothing), F⁻¹Gᵀ = m·Gᵀ (mλ·I + G Gᵀ)⁻¹ (multiply both sides
by F to check), and g_t is row i of G, so

    F⁻¹ g_t = m · Gᵀ (mλ·I + G Gᵀ)⁻¹ e_i:

one m × m Gram matrix, kept current in O(dm) a step (the new gradient's row and column), one
m × m Cholesky solve (O(m³)), and one product with Gᵀ (O(dm)). Written this way nothing cancels:
the textbook Woodbury form (v − Gᵀ(mλI + GGᵀ)⁻¹Gv)/λ subtracts two nearly equal vectors and
divides by λ, which float32 cannot survive at the paper's λ. State: m·d floats for the window (the
paper's m = 1024 is 4 KiB per parameter) and m² for the Gram matrix. The paper's own algorithm
reaches O(dm + m²) a step by updating an inverse factorisation; the O(m³) solve here is simpler
and exact (up to a float32 jitter on λ, below), and its cost is measured (`benchmarks/zoo.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metaopt.optimizers.hand_designed import _HandDesigned, heavy_ball
from metaopt.optimizers.slots import zero_where


class MFACState(NamedTuple):
    grads: jax.Array  # (m, d) the window, gradient t in row t mod m; zero rows not yet filled
    gram: jax.Array  # (m, m) grads @ grads.T
    count: jax.Array  # () int32 gradients seen


def scale_by_mfac(window: int = 1024, damping: float = 1e-5) -> optax.GradientTransformation:
    """updates → F⁻¹ updates, F the damped empirical Fisher of the last `window` gradients."""

    def init(params) -> MFACState:
        d = ravel_pytree(params)[0].size
        return MFACState(jnp.zeros((window, d), jnp.float32), jnp.zeros((window, window), jnp.float32),
                         jnp.zeros((), jnp.int32))

    def update(updates, state: MFACState, params=None):
        del params
        g, unravel = ravel_pytree(updates)
        i = state.count % window
        grads = state.grads.at[i].set(g.astype(jnp.float32))
        row = grads @ grads[i]
        gram = state.gram.at[i].set(row).at[:, i].set(row)
        # + a float32 jitter, 1e-5 of the largest squared gradient norm in the window: Cholesky
        # breaks down once mλ is below the rounding of GGᵀ (parallel gradients of norm 1e8, say)
        jitter = 1e-5 * jnp.max(jnp.diag(gram))
        system = gram + (window * damping + jitter) * jnp.eye(window, dtype=jnp.float32)
        factor = jax.scipy.linalg.cho_factor(system)
        coefficients = jax.scipy.linalg.cho_solve(factor, jax.nn.one_hot(i, window, dtype=jnp.float32))
        direction = window * (grads.T @ coefficients)
        return unravel(direction.astype(g.dtype)), MFACState(grads, gram, optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class MFAC(_HandDesigned):
    """M-FAC: SGD (with optional heavy-ball momentum) on the gradient preconditioned by the
    inverse damped empirical Fisher of the last `window` gradients. `window` and `damping` are
    the paper's defaults (m = 1024, λ = 1e-5); on problems much smaller than the window, a smaller
    one does the same for less."""

    learning_rate: float = 1e-3
    momentum: float = 0.0  # heavy_ball's: v = momentum·v + (1 - momentum)·F⁻¹g
    window: int = 1024
    damping: float = 1e-5

    name = "mfac"
    description = "M-FAC: inverse empirical Fisher of a window of gradients (Frantar et al. 2021)"
    # λ is absolute, so its right value follows the gradients' scale: the paper's 1e-5 suits deep
    # nets, whose squared gradient norms stay far above mλ; where gradients vanish (a small
    # problem near its optimum) F⁻¹ approaches 1/λ and the step blows up. So both are searched.
    search_space: ClassVar[dict[str, tuple]] = {"learning_rate": ("log_uniform", 1e-5, 1.0),
                                                "damping": ("log_uniform", 1e-5, 10.0)}

    def reset_slots(self, tx: Any, state: Any, regrown: Any) -> Any:
        """The window forgets the regrown coordinates (their entry of every stored gradient is
        zeroed and the Gram matrix recomputed); the momentum's entries for them are zeroed."""
        forgotten = ravel_pytree(regrown)[0]

        def forget(s):
            if not isinstance(s, MFACState):
                return s
            grads = zero_where(s.grads, forgotten)
            return s._replace(grads=grads, gram=grads @ grads.T)

        state = jax.tree.map(forget, state, is_leaf=lambda s: isinstance(s, MFACState))
        return optax.tree_map_params(tx, zero_where, state, regrown)

    def _optax(self):
        return optax.chain(scale_by_mfac(self.window, self.damping), *heavy_ball(self.momentum),
                           optax.scale_by_learning_rate(self.learning_rate))
