"""`small_fc`: the per-parameter MLP learned optimizer of Metz et al. 2022.

Reference: L. Metz, C. D. Freeman, J. Harrison, N. Maheswaranathan, J. Sohl-Dickstein,
"Practical tradeoffs between memory, compute, and performance in learned optimizers"
(CoLLAs 2022); google/learned_optimization `learned_optimizers/adafac_mlp_lopt.py`.

Every scalar parameter is updated by the same small MLP applied to F=18 features:
  g, p,                       gradient and parameter value
  m_k (5)                     momenta, EMA of g with decays MOM_DECAYS
  v, rsqrt(v)                 EMA of g² (decay RMS_DECAY) and its inverse square root
  m_k·rsqrt(v) (5)            Adam ratios: momenta over the RMS gradient
  g·rsqrt(v̂), m_0.9·rsqrt(v̂)  Adafactor-normalised grad / momentum (decay FAC_DECAY)
  a, b                        the Adafactor row / column factors: a = rsqrt(v_row),
                              b = rsqrt(v_col / mean(v_row)); rsqrt(v̂) is taken as a·b
v̂ is the rank-1 Adafactor estimate v_row ⊗ v_col / mean(v_row) over the last two axes of
a ≥2-D tensor. 0-D and 1-D tensors keep an unfactored v̂ (as RMSProp): a = rsqrt(v̂), b = 1.
The five Adam ratios m_k·rsqrt(v) are used as they are: they are scale-free already, and their
size is the gradient's signal-to-noise ratio, which falls as training reaches its noise floor.
Every other feature is divided by its root-mean-square over its own tensor ("second-moment
normalisation", as the reference), so grads of 1e-8 or 1e8 give unit-scale inputs. Normalising
the ratios too (as the reference does) removes Adam's own annealing: the untrained optimizer
then keeps a constant step to the end (measured on 8x8-digits MLPs: update RMS ~0.008 at step
900 vs Adam's 0.0003), which a short meta-training run cannot relearn from the time features
alone (docs/reference_optimizer.md).
A training-progress embedding tanh(step / num_steps / τ - 1) for τ in TIMESCALES is shared by
all parameters of a step, so it is folded into the first-layer bias (exact).
MLP: (F + 6) → hidden → … → 2 (relu); outputs direction d and magnitude m and
    update = -step_mult · d · exp(exp_mult · m).

Meta-parameters θ = {"mlp": {"w0","b0",…}}: with defaults (hidden=32, hidden_layers=2)
24·32+32 + 32·32+32 + 32·2+2 = 1922 float32. The initial θ makes d ≈ the Adam direction
m_0.9·rsqrt(v) plus small random terms, so the untrained optimizer is Adam (without bias
correction) at learning rate `step_mult`, a stable descent method.

Optimizer state per parameter: 5 momenta + 1 second moment = 6 float32 (plus O(rows+cols)
Adafactor factors per ≥2-D tensor, and ≤ GRANULE-1 padding floats per tensor).

Performance (see benchmarks/lopt_step.py): all tensors are packed into one flat vector,
each padded to a multiple of GRANULE elements so that per-tensor normalisation becomes a
per-granule scale, and processed in chunks of ≤ CHUNK elements with `lax.map`: pass 1
updates the accumulators and sums squared features per granule, pass 2 recomputes the
features, scales them and runs the MLP. Features are feature-major (F, C) so the MLP is
W^T @ X (XLA:CPU runs it via XNNPACK at >100 GFLOP/s on 2 cores). Nothing of size (N, F)
or (N, hidden) is ever materialised: fresh multi-MB buffers cost page faults on every call
(~0.5 ms/MB here), more than the arithmetic. Momenta and v are stored in the packed
(num_chunks, ·, chunk) layout so they need no re-packing each step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MOM_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999)
RMS_DECAY = 0.999
FAC_DECAY = 0.99
TIMESCALES = (0.03, 0.1, 0.3, 0.6, 1.0, 3.0)  # in units of the whole run (step/num_steps)
NUM_FEATURES = 18
# Per-tensor padding unit; normalisation scales are per granule. Small, as padding is
# computed like data: 128 made the 2,410 parameters of the 64→32→10 MLP 2,688.
GRANULE = 32
CHUNK = 16384  # elements per lax.map iteration: (32, CHUNK) f32 activations = 2 MiB
_EPS = 1e-8  # inside rsqrt of second moments
_RATIO_EPS = 1e-30  # inside rsqrt(v) of the Adam ratios: scale-free for grads above ~1e-13
_NORM_EPS = 1e-5  # second-moment normaliser, as the reference
_ADAM_FEATURE = 11  # index of m_0.9·rsqrt(v) in _features
# Indices of the features divided by their per-tensor RMS; the Adam ratios m_k·rsqrt(v) (9-13)
# are scale-free, so pass 1 does not even sum their squares.
_NORMALISED = [i for i in range(NUM_FEATURES) if not 9 <= i <= 13]


class SmallFCState(NamedTuple):
    """Packed optimizer state (chunk ≤ CHUNK; padding elements stay zero-gradient).

    count: () int32 steps taken; momenta: (num_chunks, 5, chunk) f32 EMAs of g;
    rms: (num_chunks, chunk) f32 EMA of g²; row_factors / col_factors: tuples, one per leaf,
    of the Adafactor v_row (shape[:-1]) and v_col (shape[:-2] + shape[-1:]); for 0-D/1-D
    leaves row holds the full unfactored v̂ and col a () zero.
    """

    count: jax.Array
    momenta: jax.Array
    rms: jax.Array
    row_factors: tuple
    col_factors: tuple


class _Layout:
    """Static packing of a list of leaf shapes into (num_chunks, chunk) arrays."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.padded = [-(-n // GRANULE) * GRANULE for n in self.sizes]
        total = max(sum(self.padded), GRANULE)
        # Fewest chunks of ≤ CHUNK elements, sized so that little padding is added at the end.
        self.num_chunks = -(-total // CHUNK)
        self.chunk = -(-total // self.num_chunks // GRANULE) * GRANULE
        extra = self.num_chunks * self.chunk - sum(self.padded)
        # Segment id of every granule; the trailing padding is a dummy segment len(shapes).
        seg = [i for i, n in enumerate(self.padded) for _ in range(n // GRANULE)]
        self.granule_seg = np.asarray(seg + [len(shapes)] * (extra // GRANULE), np.int32)
        # Number of real (non-padding) elements in every granule.
        valid = [
            min(GRANULE, n - j * GRANULE)
            for n, n_pad in zip(self.sizes, self.padded, strict=True)
            for j in range(n_pad // GRANULE)
        ]
        self.granule_valid = np.asarray(valid + [0] * (extra // GRANULE), np.int32)

    def pack(self, leaves: list[jax.Array]) -> jax.Array:
        # One concatenate of the zero-padded leaves: XLA fuses the pads into it, one pass over
        # the data (a chain of dynamic_update_slices costs a kernel and a copy per leaf).
        parts = []
        for x, n, n_pad in zip(leaves, self.sizes, self.padded, strict=True):
            parts.append(jnp.pad(jnp.ravel(x).astype(jnp.float32), (0, n_pad - n)))
        extra = self.num_chunks * self.chunk - sum(self.padded)
        if extra:
            parts.append(jnp.zeros((extra,), jnp.float32))
        return jnp.concatenate(parts).reshape(self.num_chunks, self.chunk)

    def unpack(self, packed: jax.Array) -> list[jax.Array]:
        flat, out, off = packed.reshape(-1), [], 0
        for shape, n, n_pad in zip(self.shapes, self.sizes, self.padded, strict=True):
            out.append(flat[off : off + n].reshape(shape))
            off += n_pad
        return out


def _factored(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


def _update_factors(g, row, col, decay):
    """Adafactor accumulators → (new_row, new_col, a, b), with a, b broadcast to g.shape.

    v̂ = row ⊗ col / mean(row) is never formed: a = rsqrt(row), b = rsqrt(col / mean(row)),
    so rsqrt(v̂) ≈ a·b is computed per chunk and only two per-element arrays are packed.
    Unfactored (0-D/1-D) leaves keep a full v̂ in `row`: a = rsqrt(v̂), b = 1.
    """
    g2 = jnp.square(g)
    if not _factored(g.shape):
        v = decay * row + (1 - decay) * g2
        return v, col, jax.lax.rsqrt(v + _EPS), jnp.ones_like(g)
    row = decay * row + (1 - decay) * jnp.mean(g2, axis=-1)
    col = decay * col + (1 - decay) * jnp.mean(g2, axis=-2)
    # Normalising col by mean(row) (not row·col) avoids float32 underflow for tiny grads.
    col_n = col / (jnp.mean(row, axis=-1, keepdims=True) + 1e-30)
    a = jnp.broadcast_to(jax.lax.rsqrt(row + _EPS)[..., :, None], g.shape)
    b = jnp.broadcast_to(jax.lax.rsqrt(col_n + _EPS)[..., None, :], g.shape)
    return row, col, a, b


def _features(g, p, m, v, a, b):
    """Per-element features (list of NUM_FEATURES arrays of shape (C,)).

    g, p, v, a, b: (C,); m: (5, C). See the module docstring for the list.
    """
    r = jax.lax.rsqrt(v + _EPS)
    # |m_k| <= sqrt(v / (1 - RMS_DECAY)) elementwise, so the ratios stay below ~32 in size.
    ratios = m * jax.lax.rsqrt(v + _RATIO_EPS)
    fr = a * b  # ≈ rsqrt(v̂), the Adafactor preconditioner
    return [g, p, *m, v, r, *ratios, g * fr, m[2] * fr, a, b]


def init_adam_seeded_mlp(key: jax.Array, num_inputs: int, adam_feature: int, hidden: int,
                         hidden_layers: int) -> dict[str, jax.Array]:
    """Random MLP whose direction output d ≈ input `adam_feature` (an Adam-like step).

    Hidden units 0 and 1 carry relu(x) and relu(-x) of that feature through every hidden layer
    and the output takes d = h0 - h1; all other weights are random, with the output layer 100x
    smaller so they only perturb this Adam-like step. Shared with adafac_mlp.
    """
    sizes = [num_inputs] + [hidden] * hidden_layers + [2]
    keys = jax.random.split(key, len(sizes) - 1)
    mlp = {}
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        std = (0.01 if last else 1.0) / np.sqrt(fan_in)
        w = std * jax.random.truncated_normal(k, -2.0, 2.0, (fan_in, fan_out), jnp.float32)
        if last and i == 0:  # no hidden layers: d is the feature itself
            w = w.at[adam_feature, 0].set(1.0)
        elif last:
            w = w.at[0, 0].set(1.0).at[1, 0].set(-1.0)
        elif i == 0:
            w = w.at[:, :2].set(0.0).at[adam_feature, 0].set(1.0).at[adam_feature, 1].set(-1.0)
        else:
            w = w.at[:, :2].set(0.0).at[0, 0].set(1.0).at[1, 1].set(1.0)
        mlp[f"w{i}"] = w
        mlp[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    return mlp


def _mlp_apply(mlp: dict, x: jax.Array, b0: jax.Array) -> jax.Array:
    """x: (F, C) features (scaled as in update_fn); b0: (hidden,) first-layer bias incl. time
    → (2, C).

    Feature-major layout: W^T @ X keeps every activation row contiguous, which XLA:CPU
    runs ~1.4x faster than X @ W for these skinny matrices and needs no transposes.
    """
    n = len(mlp) // 2
    h = jax.nn.relu(mlp["w0"][:NUM_FEATURES].T @ x + b0[:, None])
    for i in range(1, n):
        h = mlp[f"w{i}"].T @ h + mlp[f"b{i}"][:, None]
        h = jax.nn.relu(h) if i < n - 1 else h
    return h


@dataclasses.dataclass(frozen=True)
class SmallFC:
    """Per-parameter MLP learned optimizer (see module docstring)."""

    hidden: int = 32
    hidden_layers: int = 2
    step_mult: float = 0.001
    exp_mult: float = 0.001

    name = "small_fc"  # class attribute, not a dataclass field
    description = "per-parameter MLP on momentum, second-moment and Adafactor features (Metz et al. 2022)"
    learned = True

    def __post_init__(self):
        if self.hidden < 2 or self.hidden_layers < 0:
            raise ValueError(f"small_fc needs hidden >= 2 and hidden_layers >= 0, got {self}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init(self, key: jax.Array) -> dict:
        num_inputs = NUM_FEATURES + len(TIMESCALES)
        return {"mlp": init_adam_seeded_mlp(key, num_inputs, _ADAM_FEATURE, self.hidden, self.hidden_layers)}

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        mlp = theta["mlp"]
        step_mult, exp_mult = self.step_mult, self.exp_mult
        mom_decays = jnp.asarray(MOM_DECAYS, jnp.float32)[:, None]

        def init_fn(params):
            leaves = jax.tree.leaves(params)
            lay = _Layout([jnp.shape(x) for x in leaves])
            z = jnp.zeros((lay.num_chunks, lay.chunk), jnp.float32)
            rows, cols = [], []
            for x in leaves:
                s = jnp.shape(x)
                if _factored(s):
                    rows.append(jnp.zeros(s[:-1], jnp.float32))
                    cols.append(jnp.zeros(s[:-2] + s[-1:], jnp.float32))
                else:
                    rows.append(jnp.zeros(s, jnp.float32))
                    cols.append(jnp.zeros((), jnp.float32))
            momenta = jnp.zeros((lay.num_chunks, len(MOM_DECAYS), lay.chunk), jnp.float32)
            return SmallFCState(jnp.zeros((), jnp.int32), momenta, z, tuple(rows), tuple(cols))

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args  # e.g. loss=; this optimizer does not use them
            if params is None:
                raise ValueError("small_fc needs params (the parameter value is a feature)")
            return step_fn(updates, state, params)

        # Jitted once here: called eagerly (a notebook, a debugger), each call would otherwise trace
        # its two lax.maps afresh, with new closures, and compile them again (~0.4 s a step).
        # Inside a caller's jit this inlines as before.
        @jax.jit
        def step_fn(updates, state, params):
            grads, treedef = jax.tree.flatten(updates)
            leaves = treedef.flatten_up_to(params)
            lay = _Layout([jnp.shape(x) for x in grads])
            nseg = len(grads) + 1
            grads = [x.astype(jnp.float32) for x in grads]

            fac = [
                _update_factors(g, r, c, FAC_DECAY)
                for g, r, c in zip(grads, state.row_factors, state.col_factors, strict=True)
            ]
            g_p, p_p = lay.pack(grads), lay.pack(leaves)
            a_p, b_p = lay.pack([f[2] for f in fac]), lay.pack([f[3] for f in fac])
            valid = jnp.asarray(lay.granule_valid.reshape(lay.num_chunks, -1))

            # Pass 1: new accumulators and per-granule sums of squared features.
            def stats(xs):
                g, p, m, v, a, b, nvalid = xs
                # Padding must not count towards the per-tensor statistics.
                msk = jax.lax.broadcasted_iota(jnp.int32, (nvalid.shape[0], GRANULE), 1)
                msk = (msk < nvalid[:, None]).astype(jnp.float32).reshape(-1)
                m = mom_decays * m + (1 - mom_decays) * g
                v = RMS_DECAY * v + (1 - RMS_DECAY) * jnp.square(g)
                # One small reduction per feature fuses better than stacking first.
                feats = _features(g, p, m, v, a, b)
                sums = [(feats[i] * feats[i] * msk).reshape(-1, GRANULE).sum(-1) for i in _NORMALISED]
                return m, v, jnp.stack(sums, axis=-1)  # (granules per chunk, normalised features)

            m_p, v_p, sums = jax.lax.map(stats, (g_p, p_p, state.momenta, state.rms, a_p, b_p, valid))
            seg_sum = jax.ops.segment_sum(sums.reshape(-1, len(_NORMALISED)), lay.granule_seg, nseg)
            counts = np.maximum(np.asarray(lay.sizes + [1], np.float32), 1.0)[:, None]
            scale = jnp.ones((nseg, NUM_FEATURES), jnp.float32).at[:, _NORMALISED].set(
                jax.lax.rsqrt(_NORM_EPS + seg_sum / counts))  # (segments, F); 1 for the ratios
            gscale = scale[lay.granule_seg].reshape(lay.num_chunks, -1, NUM_FEATURES)
            gscale = gscale.transpose(0, 2, 1)  # (chunks, F, granules per chunk)

            frac = state.count.astype(jnp.float32) / jnp.asarray(num_steps, jnp.float32)
            tfeat = jnp.tanh(frac / jnp.asarray(TIMESCALES, jnp.float32) - 1.0)
            b0 = mlp["b0"] + tfeat @ mlp["w0"][NUM_FEATURES:]

            # Pass 2: scaled features → MLP → step, one cache-sized chunk at a time.
            def step(xs):
                g, p, m, v, a, b, s = xs
                x = jnp.stack(_features(g, p, m, v, a, b))  # (F, C)
                x = (x.reshape(NUM_FEATURES, -1, GRANULE) * s[:, :, None]).reshape(NUM_FEATURES, -1)
                out = _mlp_apply(mlp, x, b0)
                return -step_mult * out[0] * jnp.exp(exp_mult * out[1])

            upd = jax.lax.map(step, (g_p, p_p, m_p, v_p, a_p, b_p, gscale))
            new_updates = [
                u.astype(x.dtype) for u, x in zip(lay.unpack(upd), jax.tree.leaves(updates), strict=True)
            ]
            new_state = SmallFCState(
                state.count + 1, m_p, v_p, tuple(f[0] for f in fac), tuple(f[1] for f in fac)
            )
            return jax.tree.unflatten(treedef, new_updates), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
