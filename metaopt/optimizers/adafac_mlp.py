"""`adafac_mlp`: the memory-lean Adafactor-feature MLP learned optimizer of Metz et al. 2022.

Reference: L. Metz, C. D. Freeman, J. Harrison, N. Maheswaranathan, J. Sohl-Dickstein,
"Practical tradeoffs between memory, compute, and performance in learned optimizers"
(CoLLAs 2022); google/learned_optimization `learned_optimizers/adafac_mlp_lopt.py` (AdafacMLP).

Accumulators, all with LEARNABLE decays (three momentum decays, one RMS decay, three
Adafactor decays), parametrised as decay = sigmoid(logit(initial decay) + θ_decay), so any θ
gives a decay in (0, 1) and θ_decay = 0 is the initial value:
  m_k (3)   EMA of g, initial decays 0.9, 0.99, 0.999
  v   (1)   EMA of g², initial decay 0.999
  row_k, col_k (3 each): Adafactor factored EMAs of g² (initial decays 0.9, 0.99, 0.999) over
            the last two axes; v̂_k = row_k ⊗ col_k / mean(row_k). 0-D/1-D tensors keep an
            unfactored v̂_k instead (as the reference), so row_k = col_k = v̂_k there.

Per-parameter features (F = 28, as the reference's list):
  g, p, m_k (3), v, rsqrt(v), m_k·rsqrt(v) (3), g·rsqrt(v̂_k) (3), m_k·rsqrt(v̂_k) (3),
  row_k (3), col_k (3), rsqrt(row_k) (3), rsqrt(col_k) (3)          [row/col broadcast]
Each feature is divided by its root-mean-square over its tensor (second-moment
normalisation). A training-progress embedding tanh(step/num_steps/τ − 1) (τ in small_fc's
TIMESCALES) is shared by all parameters of a step, so it is folded into the first-layer bias.
MLP (F + 6) → hidden → … → 2 (relu) gives direction d and magnitude s:
    update = −step_mult · d · exp(exp_mult · s).

Meta-parameters θ = {"mlp": {w0, b0, …}, "decays": {"momentum" (3,), "rms" (1,),
"adafactor" (3,)}}: with defaults (hidden=32, hidden_layers=2) 34·32+32 + 32·32+32 + 32·2+2
= 2242 MLP weights + 7 decay logits = 2249 float32.

Initial θ: a stable descent method. Hidden units 0/1 carry relu(±x) of the normalised Adam
feature m_0.9·rsqrt(v) and the output takes d = h0 − h1, the other weights are random with a
100× smaller output layer; so the untrained optimizer is ≈ Adam(β1=0.9) with per-tensor
normalised steps of ≈ step_mult (1e-3) per parameter.

Optimizer state per parameter: 3 momenta + 1 RMS = 4 float32 for ≥2-D tensors (plus
3·(rows + cols) Adafactor floats per matrix); 0-D/1-D tensors add their 3 unfactored v̂_k (7).

Deviation from small_fc's implementation: tensors are processed one at a time, without
packing into chunks, for readability; features are feature-major (F, n) so the MLP is
W^T @ X (the layout small_fc found fastest on XLA:CPU), but an (F, n) buffer per tensor is
materialised, so this costs more memory traffic than small_fc for large models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.optimizers.small_fc import TIMESCALES

MOM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
FAC_DECAYS = (0.9, 0.99, 0.999)
NUM_FEATURES = 28
_ADAM_FEATURE = 7  # index of m_0.9·rsqrt(v) in _features (the Adam-like direction)
_EPS = 1e-8  # inside rsqrt of second moments
_NORM_EPS = 1e-5  # second-moment normaliser, as the reference


class AdafacMLPState(NamedTuple):
    """Per leaf (tuples in leaf order): momenta (3, *shape), rms (*shape), rows / cols: the
    Adafactor factors (3, *shape[:-1]) / (3, *shape[:-2], shape[-1]) for ≥2-D leaves, and for
    0-D/1-D leaves rows = the unfactored v̂ (3, *shape) and cols a (3,) zero. count: () int32."""

    count: jax.Array
    momenta: tuple
    rms: tuple
    rows: tuple
    cols: tuple


def _logit(x: float) -> float:
    return math.log(x / (1.0 - x))


def _decays(theta_decays: jax.Array, initial: tuple[float, ...]) -> jax.Array:
    return jax.nn.sigmoid(jnp.asarray([_logit(d) for d in initial], jnp.float32) + theta_decays)


def _expand(d: jax.Array, ndim: int) -> jax.Array:
    """(3,) decays → (3, 1, …, 1), to broadcast against (3, *shape)."""
    return d.reshape(d.shape + (1,) * ndim)


def _features(g, p, m, v, row, col, fac_d):
    """Accumulator updates and the (F, n) feature matrix of one leaf.

    g, p, v: shape; m: (3, *shape) already updated; row, col: previous factors.
    Returns (new_row, new_col, features)."""
    nd, g2 = g.ndim, jnp.square(g)
    d = _expand(fac_d, nd - 1 if nd >= 2 else nd)
    if nd >= 2:
        row = d * row + (1 - d) * jnp.mean(g2, axis=-1)
        col = d * col + (1 - d) * jnp.mean(g2, axis=-2)
        # As small_fc: normalise col by mean(row), never forming row·col (float32 underflow).
        col_n = col / (jnp.mean(row, axis=-1, keepdims=True) + 1e-30)
        fac = jax.lax.rsqrt(row + _EPS)[..., :, None] * jax.lax.rsqrt(col_n + _EPS)[..., None, :]
        row_b = jnp.broadcast_to(row[..., :, None], m.shape)
        col_b = jnp.broadcast_to(col[..., None, :], m.shape)
    else:  # unfactored, as RMSProp: row holds the full v̂
        row = d * row + (1 - d) * g2
        fac = jax.lax.rsqrt(row + _EPS)
        row_b = col_b = row
    r = jax.lax.rsqrt(v + _EPS)
    parts = [g[None], p[None], m, v[None], r[None], m * r, g * fac, m * fac, row_b, col_b]
    parts += [jax.lax.rsqrt(row_b + _EPS), jax.lax.rsqrt(col_b + _EPS)]
    x = jnp.concatenate([jnp.broadcast_to(q, (q.shape[0],) + g.shape) for q in parts])
    return row, col, x.reshape(NUM_FEATURES, -1)


def _init_mlp(key: jax.Array, hidden: int, hidden_layers: int) -> dict[str, jax.Array]:
    """Random MLP whose direction output is ≈ the normalised m_0.9·rsqrt(v) (see docstring)."""
    sizes = [NUM_FEATURES + len(TIMESCALES)] + [hidden] * hidden_layers + [2]
    keys = jax.random.split(key, len(sizes) - 1)
    mlp = {}
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        std = (0.01 if last else 1.0) / np.sqrt(fan_in)
        w = std * jax.random.truncated_normal(k, -2.0, 2.0, (fan_in, fan_out), jnp.float32)
        if last and i == 0:  # no hidden layers: d is the feature itself
            w = w.at[_ADAM_FEATURE, 0].set(1.0)
        elif last:
            w = w.at[0, 0].set(1.0).at[1, 0].set(-1.0)
        elif i == 0:
            w = w.at[:, :2].set(0.0).at[_ADAM_FEATURE, 0].set(1.0).at[_ADAM_FEATURE, 1].set(-1.0)
        else:  # pass relu(±x) through unchanged (relu of a non-negative value is itself)
            w = w.at[:, :2].set(0.0).at[0, 0].set(1.0).at[1, 1].set(1.0)
        mlp[f"w{i}"] = w
        mlp[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    return mlp


def _mlp_apply(mlp: dict, x: jax.Array, b0: jax.Array) -> jax.Array:
    """x: (F, n) normalised features; b0: (hidden,) first-layer bias incl. time → (2, n)."""
    n = len(mlp) // 2
    h = mlp["w0"][:NUM_FEATURES].T @ x + b0[:, None]
    for i in range(1, n):
        h = mlp[f"w{i}"].T @ jax.nn.relu(h) + mlp[f"b{i}"][:, None]
    return h


@dataclasses.dataclass(frozen=True)
class AdafacMLP:
    """Adafactor-feature per-parameter MLP with learnable decays (see module docstring)."""

    hidden: int = 32
    hidden_layers: int = 2
    step_mult: float = 0.001
    exp_mult: float = 0.001

    name = "adafac_mlp"
    description = "memory-lean per-parameter MLP on Adafactor features, learnable decays (Metz et al. 2022)"
    learned = True

    def __post_init__(self):
        if self.hidden < 2 or self.hidden_layers < 0:
            raise ValueError(f"adafac_mlp needs hidden >= 2 and hidden_layers >= 0, got {self}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init(self, key: jax.Array) -> dict:
        zeros = lambda n: jnp.zeros((n,), jnp.float32)  # noqa: E731 (θ_decay = 0: initial decay)
        decays = {"momentum": zeros(len(MOM_DECAYS)), "rms": zeros(1), "adafactor": zeros(len(FAC_DECAYS))}
        return {"mlp": _init_mlp(key, self.hidden, self.hidden_layers), "decays": decays}

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        mlp, dec = theta["mlp"], theta["decays"]
        step_mult, exp_mult = self.step_mult, self.exp_mult

        def init_fn(params):
            mom, rms, rows, cols = [], [], [], []
            for x in jax.tree.leaves(params):
                s = jnp.shape(x)
                mom.append(jnp.zeros((len(MOM_DECAYS),) + s, jnp.float32))
                rms.append(jnp.zeros(s, jnp.float32))
                k = len(FAC_DECAYS)
                rows.append(jnp.zeros((k,) + (s[:-1] if len(s) >= 2 else s), jnp.float32))
                cols.append(jnp.zeros((k,) + s[:-2] + s[-1:] if len(s) >= 2 else (k,), jnp.float32))
            z = jnp.zeros((), jnp.int32)
            return AdafacMLPState(z, tuple(mom), tuple(rms), tuple(rows), tuple(cols))

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args  # e.g. loss=; this optimizer does not use them
            if params is None:
                raise ValueError("adafac_mlp needs params (the parameter value is a feature)")
            mom_d = _decays(dec["momentum"], MOM_DECAYS)
            rms_d = _decays(dec["rms"], (RMS_DECAY,))[0]
            fac_d = _decays(dec["adafactor"], FAC_DECAYS)
            frac = state.count.astype(jnp.float32) / jnp.asarray(num_steps, jnp.float32)
            tfeat = jnp.tanh(frac / jnp.asarray(TIMESCALES, jnp.float32) - 1.0)
            b0 = mlp["b0"] + tfeat @ mlp["w0"][NUM_FEATURES:]

            grads, treedef = jax.tree.flatten(updates)
            leaves = treedef.flatten_up_to(params)
            out, new_m, new_v, new_r, new_c = [], [], [], [], []
            for g0, p, m, v, row, col in zip(
                grads, leaves, state.momenta, state.rms, state.rows, state.cols, strict=True
            ):
                g, p = g0.astype(jnp.float32), jnp.asarray(p, jnp.float32)
                m = _expand(mom_d, g.ndim) * m + (1 - _expand(mom_d, g.ndim)) * g
                v = rms_d * v + (1 - rms_d) * jnp.square(g)
                row, col, x = _features(g, p, m, v, row, col, fac_d)
                # Per-tensor second-moment normalisation of every feature.
                x = x * jax.lax.rsqrt(_NORM_EPS + jnp.mean(jnp.square(x), axis=1, keepdims=True))
                d, s = _mlp_apply(mlp, x, b0)
                step = -step_mult * d * jnp.exp(exp_mult * s)
                out.append(step.reshape(g.shape).astype(g0.dtype))
                new_m.append(m), new_v.append(v), new_r.append(row), new_c.append(col)
            new_state = AdafacMLPState(
                state.count + 1, tuple(new_m), tuple(new_v), tuple(new_r), tuple(new_c)
            )
            return jax.tree.unflatten(treedef, out), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
