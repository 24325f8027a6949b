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

Performance (as small_fc; see benchmarks/lopt_step.py): a ≥2-D leaf is viewed as (B, R, C)
(the Adafactor row axis R, column axis C) and processed in 3-D blocks of ≈ CHUNK elements by
a loop that reads blocks in place (dynamic_slice), so nothing of size (F, n) or (hidden, n) is
materialised and no packed copies are made (fresh multi-MB buffers cost ~0.5 ms/MB in page
faults on CPU, more than the arithmetic). Pass 1 updates m, v and sums the squared features,
pass 2 recomputes them and runs the MLP. The 12 row/col features are only per row or per
column: their squared sums are taken on the (B, R) / (B, C) vectors and their first-layer
contribution is computed once per row / column and broadcast-added. The normalisation scale
is folded into the first-layer weights (W^T (s·x) = (s·W)^T x). Features are feature-major
(16, L) so the MLP is W^T @ X. 0-D/1-D leaves (small) take the direct unblocked path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.optimizers.small_fc import TIMESCALES, init_adam_seeded_mlp

MOM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
FAC_DECAYS = (0.9, 0.99, 0.999)
NUM_FEATURES = 28
_ADAM_FEATURE = 7  # index of m_0.9·rsqrt(v) in _features (the Adam-like direction)
_EPS = 1e-8  # inside rsqrt of second moments
_NORM_EPS = 1e-5  # second-moment normaliser, as the reference
CHUNK = 16384  # elements per block: (32, CHUNK) f32 activations = 2 MiB, cache-sized
_NUM_ELEM = 16  # features 0..15 are per element; the rest are per row / per column:
_ROW_FEATS = [16, 17, 18, 22, 23, 24]  # row_k, rsqrt(row_k)
_COL_FEATS = [19, 20, 21, 25, 26, 27]  # col_k, rsqrt(col_k)


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


def _elem_features(g, p, m, v, fac):
    """The 16 per-element features g, p, m_k, v, rsqrt(v), m_k·rsqrt(v), g·rsqrt(v̂_k),
    m_k·rsqrt(v̂_k) (list of arrays of g's shape); fac: (3, …) rsqrt(v̂_k) broadcastable to m."""
    r = jax.lax.rsqrt(v + _EPS)
    return [g, p, *m, v, r, *(m * r), *(g * fac), *(m * fac)]


def _features(g, p, m, v, row, fac):
    """The full (F, n) feature matrix of an unfactored (0-D/1-D) leaf, row = v̂ (3, *shape)."""
    rr = jax.lax.rsqrt(row + _EPS)
    x = jnp.stack(_elem_features(g, p, m, v, fac) + [*row, *row, *rr, *rr])
    return x.reshape(NUM_FEATURES, -1)


def _split(n: int, target: int) -> tuple[int, int]:  # (size, count) of balanced blocks
    k = -(-n // max(1, min(n, target)))
    return -(-n // k), k


def _block_loop(dims, body, init):
    """carry = body(starts, sizes, owned, carry) over ≈ CHUNK-element blocks of a (B, R, C) array.
    A loop reading blocks in place needs no stacked input copies (unlike lax.map). The last
    block along an axis is shifted back to end at the edge, overlapping its neighbour (writes
    stay idempotent: blocks are computed from loop-invariant inputs); owned masks out the
    overlap (None when blocks tile exactly)."""
    cb, nc = _split(dims[2], CHUNK)
    rb, nr = _split(dims[1], CHUNK // cb)
    bb, nb = _split(dims[0], CHUNK // (rb * cb))
    sizes, counts = (bb, rb, cb), (nb, nr, nc)
    exact = all(d % s == 0 for d, s in zip(dims, sizes, strict=True))

    def step(i, carry):
        idx = (i // (nr * nc), (i // nc) % nr, i % nc)
        lo = [k * s for k, s in zip(idx, sizes, strict=True)]
        starts = [jnp.minimum(x, d - s) for x, d, s in zip(lo, dims, sizes, strict=True)]
        owned = None
        if not exact:
            owned = jnp.ones(sizes, bool)
            for ax in range(3):
                pos = jax.lax.broadcasted_iota(jnp.int32, sizes, ax) + starts[ax]
                owned &= pos >= lo[ax]
        return body(starts, sizes, owned, carry)

    n = math.prod(counts)
    if n == 1:  # a single block: no loop
        return step(jnp.int32(0), init)
    return jax.lax.fori_loop(0, n, step, init)


def _mlp_apply(mlp: dict, h: jax.Array) -> jax.Array:
    """h: (hidden, n) first-layer pre-activation (bias included) → (2, n) MLP output."""
    for i in range(1, len(mlp) // 2):
        h = mlp[f"w{i}"].T @ jax.nn.relu(h) + mlp[f"b{i}"][:, None]
    return h


def _factored_update(g, p, m, v, row, col, decays, w0, b0, mlp, out_fn):
    """Blocked update of one ≥2-D leaf (see the module docstring) → (step, m, v, row, col)."""
    mom_d, rms_d, fac_d = decays
    shape, k = g.shape, m.shape[0]
    dims = (math.prod(shape[:-2]), shape[-2], shape[-1])
    g3, p3, m4, v3 = g.reshape(dims), p.reshape(dims), m.reshape((k,) + dims), v.reshape(dims)
    d, g2 = _expand(fac_d, g.ndim - 1), jnp.square(g)
    row = d * row + (1 - d) * jnp.mean(g2, axis=-1)
    col = d * col + (1 - d) * jnp.mean(g2, axis=-2)
    # As small_fc: normalise col by mean(row), never forming row·col (float32 underflow).
    col_n = col / (jnp.mean(row, axis=-1, keepdims=True) + 1e-30)
    rows = jnp.concatenate([row, jax.lax.rsqrt(row + _EPS)]).reshape(2 * k, dims[0], dims[1])
    cols = jnp.concatenate([col, jax.lax.rsqrt(col + _EPS)]).reshape(2 * k, dims[0], dims[2])
    cn = jax.lax.rsqrt(col_n + _EPS).reshape(k, dims[0], dims[2])
    md, ra = _expand(mom_d, 3), rows[k:]

    def block(x, starts, sizes):  # in-place read of one (…, bb, rb, cb) block
        lead = x.ndim - len(starts)
        return jax.lax.dynamic_slice(x, (0,) * lead + tuple(starts), x.shape[:lead] + tuple(sizes))

    def feats(starts, sizes, mb, vb):
        gb, pb = block(g3, starts, sizes), block(p3, starts, sizes)
        rab, cnb = block(ra, starts[:2], sizes[:2]), block(cn, starts[::2], sizes[::2])
        return _elem_features(gb, pb, mb, vb, rab[..., :, None] * cnb[..., None, :])

    # Pass 1: new m, v (written in place) and per-tensor sums of squared per-element features.
    def stats(starts, sizes, owned, carry):
        m_new, v_new, sums = carry
        gb = block(g3, starts, sizes)
        mb = md * block(m4, starts, sizes) + (1 - md) * gb
        vb = rms_d * block(v3, starts, sizes) + (1 - rms_d) * jnp.square(gb)
        w = 1.0 if owned is None else owned.astype(jnp.float32)  # count overlaps once
        # One small reduction per feature fuses better than stacking first (as small_fc).
        s = jnp.stack([jnp.sum(x * x * w) for x in feats(starts, sizes, mb, vb)])
        m_new = jax.lax.dynamic_update_slice(m_new, mb, (0, *starts))
        return m_new, jax.lax.dynamic_update_slice(v_new, vb, tuple(starts)), sums + s

    init = (jnp.zeros_like(m4), jnp.zeros_like(v3), jnp.zeros((_NUM_ELEM,), jnp.float32))
    m4, v3, sums = _block_loop(dims, stats, init)
    # Row (col) features are constant along C (R): their squared sums are C·Σ (R·Σ).
    sums = jnp.concatenate(
        [sums, dims[2] * jnp.sum(jnp.square(rows), (1, 2)), dims[1] * jnp.sum(jnp.square(cols), (1, 2))]
    )
    perm = np.argsort(list(range(_NUM_ELEM)) + _ROW_FEATS + _COL_FEATS)
    scale = jax.lax.rsqrt(_NORM_EPS + sums[perm] / math.prod(shape))
    w0 = w0 * scale[:, None]  # the normalisation, folded into the first layer
    h_row = jnp.einsum("fh,fbr->hbr", w0[np.asarray(_ROW_FEATS)], rows) + b0[:, None, None]
    h_col = jnp.einsum("fh,fbc->hbc", w0[np.asarray(_COL_FEATS)], cols)

    # Pass 2: features → MLP → step, one cache-sized block at a time.
    def apply(starts, sizes, owned, out):
        x = jnp.stack(feats(starts, sizes, block(m4, starts, sizes), block(v3, starts, sizes)))
        h = (w0[:_NUM_ELEM].T @ x.reshape(_NUM_ELEM, -1)).reshape((-1, *sizes))
        h = h + block(h_row, starts[:2], sizes[:2])[..., None]  # + per-row and per-column terms
        h = h + block(h_col, starts[::2], sizes[::2])[..., None, :]
        step = out_fn(_mlp_apply(mlp, h.reshape(h.shape[0], -1))).reshape(sizes)
        return jax.lax.dynamic_update_slice(out, step, tuple(starts))

    step = _block_loop(dims, apply, jnp.zeros_like(g3))
    return step.reshape(shape), m4.reshape(m.shape), v3.reshape(shape), row, col


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
        num_inputs = NUM_FEATURES + len(TIMESCALES)
        mlp = init_adam_seeded_mlp(key, num_inputs, _ADAM_FEATURE, self.hidden, self.hidden_layers)
        return {"mlp": mlp, "decays": decays}

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
            w0 = mlp["w0"][:NUM_FEATURES]

            def out_fn(o):  # (2, n) MLP output → step
                return -step_mult * o[0] * jnp.exp(exp_mult * o[1])

            out, new_m, new_v, new_r, new_c = [], [], [], [], []
            for g0, p, m, v, row, col in zip(
                grads, leaves, state.momenta, state.rms, state.rows, state.cols, strict=True
            ):
                g, p = g0.astype(jnp.float32), jnp.asarray(p, jnp.float32)
                if g.ndim >= 2:
                    dec3 = (mom_d, rms_d, fac_d)
                    step, m, v, row, col = _factored_update(g, p, m, v, row, col, dec3, w0, b0, mlp, out_fn)
                else:  # 0-D/1-D (small): direct, unfactored (row holds the full v̂, as RMSProp)
                    m = _expand(mom_d, g.ndim) * m + (1 - _expand(mom_d, g.ndim)) * g
                    v = rms_d * v + (1 - rms_d) * jnp.square(g)
                    row = _expand(fac_d, g.ndim) * row + (1 - _expand(fac_d, g.ndim)) * jnp.square(g)
                    x = _features(g, p, m, v, row, jax.lax.rsqrt(row + _EPS))
                    # Per-tensor second-moment normalisation of every feature.
                    x = x * jax.lax.rsqrt(_NORM_EPS + jnp.mean(jnp.square(x), axis=1, keepdims=True))
                    step = out_fn(_mlp_apply(mlp, w0.T @ x + b0[:, None]))
                out.append(step.reshape(g.shape).astype(g0.dtype))
                new_m.append(m), new_v.append(v), new_r.append(row), new_c.append(col)
            new_state = AdafacMLPState(
                state.count + 1, tuple(new_m), tuple(new_v), tuple(new_r), tuple(new_c)
            )
            return jax.tree.unflatten(treedef, out), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
