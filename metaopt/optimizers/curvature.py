"""K-FAC, FOOF and MBF: curvature optimizers that precondition each layer with statistics of its
inputs and output-gradients, as optax transformations and hand-designed optimizers of the zoo.

They need what a gradient alone does not carry: each layer's inputs a and each example's gradient
with respect to the layer's outputs g (`task_zoo.layer_stats`, which also says how a task provides
them). A training loop passes them as `update(grads, state, params, layer_stats=...)`; the eval and
tuning loops do so for every optimizer whose `needs_layer_stats` is true, and refuse a task
without them. Every top-level entry of params is one layer: {"w", "b"} (w (fan_in, fan_out), or a
(kh, kw, c_in, c_out) conv kernel) or a bias-free weight array. A layer's weight and bias are one
matrix W̄ = [W; b] of (fan_in + 1) × fan_out, and its inputs ā = [a, 1]. With B examples and T
positions per example (1 for a dense layer, H'·W' for a conv, as in KFC, Grosse & Martens 2016):

    K-FAC (Martens & Grosse 2015)   A = mean_n Σ_t ā āᵀ,  G = mean_{n,t} g gᵀ;
                                    step (A + π√λ I)⁻¹ ∇W̄ (G + √λ/π I)⁻¹, π² = (tr A/dim A)/(tr G/dim G)
                                    (factored Tikhonov damping, their section 6.3)
    FOOF (Benzing 2022)             A only: step (A + λI)⁻¹ ∇W̄: gradient descent on each neuron's
                                    pre-activations, which is what K-FAC's success comes from
    MBF (Bahamou, Goldfarb & Ren    the empirical Fisher of each mini-block of W̄, E_n[p_n p_nᵀ]
         2023)                      with p_n example n's gradient of the block; step (F_b + λI)⁻¹ ∇b.
                                    Blocks: a conv's k×k kernel of one (input, output) channel pair
                                    (the paper's), its bias entries alone; a dense layer's column of
                                    W̄ in chunks of `block_size` rows (our choice: a whole column,
                                    fan_in + 1 rows, would cost fan_in floats of state per weight).

Statistics are averaged over steps (decay min(1 - 1/(t + 1), `decay`): the first step uses its own,
Martens & Grosse's rule) and inverted every `inverse_every` steps (their T₃ = 20). λ has no default
that transfers between problems (K-FAC adapts it, FOOF and MBF tune it), so it is searched. Layer
sizes set the cost: K-FAC keeps (fan_in+1)² + fan_out² floats and their inverses per layer and
inverts them in O(fan_in³ + fan_out³); MBF keeps block_size floats per weight (×2 with inverses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers.hand_designed import _HandDesigned, heavy_ball


class CurvatureState(NamedTuple):
    factors: dict  # layer -> the averaged statistics
    inverses: dict  # layer -> their damped inverses, as of the last inversion
    count: jax.Array  # () int32 steps taken


def _weight(layer: Any) -> jax.Array:
    """A layer's weight: its "w", or the layer itself when it is a bias-free weight array."""
    return layer["w"] if isinstance(layer, dict) else layer


def _is_conv(layer: Any) -> bool:
    return _weight(layer).ndim == 4


def _matrix(layer: Any) -> jax.Array:
    """A layer's parameters (or their gradient) as W̄: (fan_in [+1 for the bias], fan_out)."""
    if not isinstance(layer, dict):
        return layer.reshape(-1, layer.shape[-1]) if layer.ndim > 1 else layer[:, None]
    w = layer["w"].reshape(-1, layer["w"].shape[-1])
    return jnp.concatenate([w, layer["b"][None]], axis=0) if "b" in layer else w


def _unmatrix(m: jax.Array, like: Any) -> Any:
    """The inverse of `_matrix`, shaped like `like`."""
    if not isinstance(like, dict):
        return m.reshape(like.shape)
    fan_in = m.shape[0] - ("b" in like)
    out = {"w": m[:fan_in].reshape(like["w"].shape)}
    return {**out, "b": m[fan_in]} if "b" in like else out


def _inputs(a: jax.Array, layer: Any) -> jax.Array:
    """(B, T, fan_in) -> ā (B, T, fan_in [+1]): a column of ones where the layer has a bias."""
    if isinstance(layer, dict) and "b" in layer:
        return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
    return a


def _cholesky(a: jax.Array) -> jax.Array:
    """Lower Cholesky factor of SPD a (n, n), by n rank-one updates in plain XLA ops."""
    rows = jnp.arange(a.shape[-1])

    def step(k, carry):
        rest, lower = carry
        column = jnp.where(rows >= k, rest[:, k], 0.0) / jnp.sqrt(rest[k, k])
        return rest - jnp.outer(column, column), lower.at[:, k].set(column)

    return jax.lax.fori_loop(0, a.shape[-1], step, (a, jnp.zeros_like(a)))[1]


def _inverse_lower(lower: jax.Array) -> jax.Array:
    """L⁻¹ of lower-triangular L (n, n), by forward substitution row by row."""
    eye = jnp.eye(lower.shape[-1], dtype=lower.dtype)

    def step(i, inverse):  # rows >= i of `inverse` are still zero
        return inverse.at[i].set((eye[i] - lower[i] @ inverse) / lower[i, i])

    return jax.lax.fori_loop(0, lower.shape[-1], step, jnp.zeros_like(lower))


def _damped_inverse(m: jax.Array, damping: jax.Array) -> jax.Array:
    """(m + damping·I)⁻¹ of symmetric PSD m (batched over leading axes), as L⁻ᵀL⁻¹ of its
    Cholesky factor L. Written in plain XLA ops, not LAPACK's: on jaxlib 0.10.2's CPU runtime,
    cho_factor/cho_solve and eigh inside a vmapped scan of a few hundred steps (K-FAC on an epinet,
    2 seeds × 500 steps) left the process waiting forever, every time; this form ran seven such
    evaluations, up to 4 seeds × 1,000 steps, in seconds each."""
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)

    def one(matrix, d):
        inverse_lower = _inverse_lower(_cholesky(matrix + d * eye))
        return inverse_lower.T @ inverse_lower

    flat = m.reshape(-1, *m.shape[-2:])
    out = jax.vmap(one)(flat, jnp.broadcast_to(damping, m.shape[:-2]).reshape(-1))
    return out.reshape(m.shape)


# ---- the three methods: statistics of a step, their inverses, the step ---------------------------


def _kfac_stats(a, g, layer):
    b, t = g.shape[:2]
    a = _inputs(a, layer)
    return {"A": jnp.einsum("nti,ntj->ij", a, a) / b, "G": jnp.einsum("nti,ntj->ij", g, g) / (b * t)}


def _kfac_invert(f, damping):
    mean_a = jnp.trace(f["A"]) / f["A"].shape[0]
    mean_g = jnp.trace(f["G"]) / f["G"].shape[0]
    pi = jnp.sqrt(jnp.maximum(mean_a, 1e-30) / jnp.maximum(mean_g, 1e-30))
    root = jnp.sqrt(damping)
    return {"A": _damped_inverse(f["A"], pi * root), "G": _damped_inverse(f["G"], root / pi)}


def _kfac_apply(inv, grad, layer):
    return inv["A"] @ grad @ inv["G"]


def _foof_stats(a, g, layer):
    a = _inputs(a, layer)
    return {"A": jnp.einsum("nti,ntj->ij", a, a) / a.shape[0]}


def _foof_invert(f, damping):
    return {"A": _damped_inverse(f["A"], damping)}


def _foof_apply(inv, grad, layer):
    return inv["A"] @ grad


def _mbf_blocks(m: jax.Array, layer: Any, block_size: int) -> jax.Array:
    """W̄-shaped (..., rows, fan_out) -> (..., blocks, size): each column's rows in chunks, after
    putting a conv's rows in (c_in, kh, kw) order so that one chunk is one channel's kernel."""
    if _is_conv(layer):
        kh, kw, c_in, _ = _weight(layer).shape
        kernel = m[..., :kh * kw * c_in, :].reshape(*m.shape[:-2], kh * kw, c_in, m.shape[-1])
        kernel = jnp.swapaxes(kernel, -3, -2).reshape(*m.shape[:-2], -1, m.shape[-1])
        m = jnp.concatenate([kernel, m[..., kh * kw * c_in:, :]], axis=-2)
        block_size = kh * kw
    rows = m.shape[-2]
    padded = -(-rows // block_size) * block_size
    m = jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, padded - rows), (0, 0)])
    return jnp.swapaxes(m, -1, -2).reshape(*m.shape[:-2], -1, block_size)


def _mbf_unblocks(blocks: jax.Array, layer: Any) -> jax.Array:
    """The inverse of `_mbf_blocks` for one W̄ (no leading axes)."""
    rows, fan_out = jax.eval_shape(_matrix, layer).shape
    m = jnp.swapaxes(blocks.reshape(fan_out, -1), 0, 1)[:rows]
    if _is_conv(layer):
        kh, kw, c_in, _ = _weight(layer).shape
        kernel = m[:kh * kw * c_in].reshape(c_in, kh * kw, fan_out).swapaxes(0, 1).reshape(-1, fan_out)
        m = jnp.concatenate([kernel, m[kh * kw * c_in:]], axis=0)
    return m


def _mbf_stats(block_size):
    def stats(a, g, layer):
        per_example = jnp.einsum("nti,nto->nio", _inputs(a, layer), g)  # (B, rows, fan_out)
        blocks = _mbf_blocks(per_example, layer, block_size)  # (B, blocks, size)
        return {"F": jnp.einsum("nbi,nbj->bij", blocks, blocks) / blocks.shape[0]}
    return stats


def _mbf_invert(f, damping):
    return {"F": _damped_inverse(f["F"], jnp.broadcast_to(damping, f["F"].shape[:1]))}


def _mbf_apply(block_size):
    def apply(inv, grad, layer):
        blocks = _mbf_blocks(grad, layer, block_size)
        return _mbf_unblocks(jnp.einsum("bij,bj->bi", inv["F"], blocks), layer)
    return apply


# ---- one transformation for all three ----------------------------------------------------------


def _layer_preconditioner(method: str, stats_fn: Callable, invert_fn: Callable, apply_fn: Callable,
                          damping: float, decay: float, inverse_every: int
                          ) -> optax.GradientTransformationExtraArgs:
    def init(params) -> CurvatureState:
        def zeros(layer):
            rows, fan_out = jax.eval_shape(_matrix, layer).shape
            fan_in = rows - (isinstance(layer, dict) and "b" in layer)
            shapes = jax.eval_shape(stats_fn, jnp.zeros((1, 1, fan_in)), jnp.zeros((1, 1, fan_out)), layer)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        factors = {name: zeros(layer) for name, layer in params.items()}
        return CurvatureState(factors, jax.tree.map(jnp.zeros_like, factors), jnp.zeros((), jnp.int32))

    def update(updates, state: CurvatureState, params=None, *, layer_stats=None, **extra):
        del params, extra
        if layer_stats is None:
            raise ValueError(
                f"{method} preconditions each layer with its inputs and output-gradients: pass "
                "update(..., layer_stats=...) (task_zoo.layer_stats.loss_grad_and_layer_stats); "
                "metaopt's eval and tuning loops do, on tasks that provide them")
        missing = sorted(set(updates) - set(layer_stats))
        if missing:
            raise ValueError(f"{method}: no layer statistics for parameters {missing}; every "
                             f"top-level entry of params must be a tapped layer")
        rate = jnp.minimum(1.0 - 1.0 / (state.count + 1.0), decay)
        factors = {name: jax.tree.map(lambda old, new: rate * old + (1.0 - rate) * new, state.factors[name],
                                      stats_fn(layer_stats[name]["a"], layer_stats[name]["g"], u))
                   for name, u in updates.items()}
        damp = jnp.asarray(damping, jnp.float32)
        inverses = jax.lax.cond(
            state.count % inverse_every == 0,
            lambda: {name: invert_fn(f, damp) for name, f in factors.items()},
            lambda: state.inverses)
        steps = {name: _unmatrix(apply_fn(inverses[name], _matrix(u), u), u) for name, u in updates.items()}
        return steps, CurvatureState(factors, inverses, optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)


# ---- the optimizers ----------------------------------------------------------------------------


def scale_by_kfac(damping: float = 1e-3, decay: float = 0.95, inverse_every: int = 20):
    """updates -> K-FAC's preconditioned updates (needs `layer_stats=`)."""
    return _layer_preconditioner("kfac", _kfac_stats, _kfac_invert, _kfac_apply,
                                 damping, decay, inverse_every)


def scale_by_foof(damping: float = 1.0, decay: float = 0.95, inverse_every: int = 20):
    """updates -> FOOF's preconditioned updates (needs `layer_stats=`)."""
    return _layer_preconditioner("foof", _foof_stats, _foof_invert, _foof_apply,
                                 damping, decay, inverse_every)


def scale_by_mbf(damping: float = 1e-2, decay: float = 0.95, inverse_every: int = 20, block_size: int = 16):
    """updates -> MBF's preconditioned updates (needs `layer_stats=`)."""
    return _layer_preconditioner("mbf", _mbf_stats(block_size), _mbf_invert, _mbf_apply(block_size),
                                 damping, decay, inverse_every)


@dataclasses.dataclass(frozen=True)
class _LayerCurvature(_HandDesigned):
    """SGD, with optional heavy-ball momentum, on the preconditioned gradient."""

    learning_rate: float = 0.01
    momentum: float = 0.0
    damping: float = 1e-3
    decay: float = 0.95  # of the statistics' running average (Martens & Grosse: 0.95)
    inverse_every: int = 20  # steps between inversions (Martens & Grosse's T₃)

    needs_layer_stats: ClassVar[bool] = True

    def _optax(self):
        return optax.chain(self._preconditioner(), *heavy_ball(self.momentum),
                           optax.scale_by_learning_rate(self.learning_rate))


@dataclasses.dataclass(frozen=True)
class KFAC(_LayerCurvature):
    name = "kfac"
    description = "K-FAC: Kronecker-factored curvature of each layer (Martens & Grosse 2015)"
    search_space: ClassVar[dict[str, tuple]] = {"learning_rate": ("log_uniform", 1e-4, 1.0),
                                                "damping": ("log_uniform", 1e-6, 1.0)}

    def _preconditioner(self):
        return scale_by_kfac(self.damping, self.decay, self.inverse_every)


@dataclasses.dataclass(frozen=True)
class FOOF(_LayerCurvature):
    damping: float = 1.0

    name = "foof"
    description = "FOOF: first-order descent on each layer's neurons (Benzing 2022)"
    search_space: ClassVar[dict[str, tuple]] = {"learning_rate": ("log_uniform", 1e-4, 1.0),
                                                "damping": ("log_uniform", 1e-4, 10.0)}

    def _preconditioner(self):
        return scale_by_foof(self.damping, self.decay, self.inverse_every)


@dataclasses.dataclass(frozen=True)
class MBF(_LayerCurvature):
    damping: float = 1e-2
    block_size: int = 16  # rows of a dense layer's column per mini-block (a conv's is its k×k kernel)

    name = "mbf"
    description = "MBF: empirical Fisher of mini-blocks of each layer (Bahamou et al. 2023)"
    search_space: ClassVar[dict[str, tuple]] = {"learning_rate": ("log_uniform", 1e-4, 1.0),
                                                "damping": ("log_uniform", 1e-6, 1.0)}

    def _preconditioner(self):
        return scale_by_mbf(self.damping, self.decay, self.inverse_every, self.block_size)
