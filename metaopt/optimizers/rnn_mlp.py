"""`rnn_mlp`: per-tensor LSTM conditioning a per-parameter MLP (Metz et al. 2020).

Reference: L. Metz, N. Maheswaranathan, C. D. Freeman, B. Poole, J. Sohl-Dickstein,
"Tasks, stability, architecture, and compute: training more effective learned optimizers, and
using them to train themselves" (2020), Section 3; google/learned_optimization
`learned_optimizers/rnn_mlp_lopt.py`. Nominal term as in Harrison, Metz, Sohl-Dickstein, "A
closer look at learned optimization: stability, robustness, and inductive biases" (2022).

Per tensor, an LSTM (`lstm_hidden`=32, shared, one batch over the list of leaves) reads F_T =
13 + lstm_hidden inputs: log rms of g, m_0.9, sqrt(v), p (log(·+1e-30)/10); cos(g, m_0.9);
log(size)/10; is-scalar and is-vector flags; two loss features; tanh(step/num_steps/τ - 1) for
τ in TIMESCALES; and the mean over tensors of the previous LSTM outputs (the reference's
cross-tensor "from_lstm" DeepSets channel, without its projection). Loss features (as the
reference's training-loss normaliser, here via a running min and a bias-corrected running mean
μ (decay LOSS_DECAY) of `loss=` kept in the state):
    (loss - min) / (μ - min),  (loss - μ) / |μ|          each clipped, both 0 without `loss=`.
Its outputs give a conditioning vector (`cond`=8) per tensor and a per-tensor log-scale for
the nominal step. Per parameter, an MLP (F_P = 12 + cond → hidden → hidden → 2, relu) reads
    g, p, m_k (4, decays MOM_DECAYS), v (decay RMS_DECAY), rsqrt(v), m_k·rsqrt(v) (4)
each divided by its rms over the tensor (the reference's second-moment normalisation), with
the tensor's conditioning vector folded into the first-layer bias (exact). Outputs direction d
and magnitude s; the update is
    -[ nominal_lr·exp(n_t) · m̂_0.9 / (sqrt(v̂) + 1e-8)  +  step_mult · d · exp(exp_mult · s) ]
where the first term is the stabilising nominal (bias-corrected Adam) descent step with a
learned per-tensor scale n_t and the second the reference's learned step.

Meta-parameters θ = {"lstm", "cond", "nominal", "mlp"}; with defaults
(45·128 + 32·128 + 128) + (32·8 + 8) + (32 + 1) + (20·32+32 + 32·32+32 + 32·2+2)
= 9984 + 264 + 33 + 1794 = 12075 float32.
θ₀: the nominal head is zero, so n_t = 0 and the nominal step is Adam(1e-3, 0.9, 0.999); the
MLP's output layer is 100x smaller than its fan-in scale, so the learned step is ~1e-5 per
parameter: θ₀ is Adam plus a small perturbation, and every weight receives meta-gradients.

Optimizer state per parameter: 4 momenta + 1 second moment = 5 float32 (plus O(lstm_hidden)
LSTM state per tensor and 3 loss statistics).

Deviations from the reference (to keep it cheap and the θ₀ a working optimizer): 4 momentum
decays and one second moment instead of 5 + 5 accumulators; no validation-loss input, no
dynamic gradient clipping, no MLP → LSTM feedback; the step embedding goes to the LSTM (it is
per-tensor anyway); the nominal term is added as described above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers.lstm_l2l import init_lstm, lstm_step, uniforms

MOM_DECAYS = (0.5, 0.9, 0.99, 0.999)
RMS_DECAY = 0.999
NOMINAL_MOM = 1  # index of the 0.9 momentum, used by the nominal Adam step
LOSS_DECAY = 0.9
TIMESCALES = (0.1, 0.3, 1.0)  # in units of the whole run (step / num_steps)
NUM_PARAM_FEATURES = 12
NUM_TENSOR_FEATURES = 10 + len(TIMESCALES)
_EPS = 1e-8
_OUT_CLIP = 10.0  # per-tensor log-scale of the nominal step, so exp() cannot overflow


class RNNMLPState(NamedTuple):
    """count: () int32; momenta: per-leaf (4, *shape); rms: per-leaf (*shape); h, c: (T, hidden);
    loss_min, loss_mean: () running min and EMA of `loss=`; loss_count: () int32 losses seen."""

    count: jax.Array
    momenta: tuple
    rms: tuple
    h: jax.Array
    c: jax.Array
    loss_min: jax.Array
    loss_mean: jax.Array
    loss_count: jax.Array


def _log_feat(x):
    return jnp.clip(jnp.log(x + 1e-30), -50.0, 50.0) / 10.0


def _rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _tensor_features(g, p, m, v, loss_feats, time_feats):
    rms_g, rms_m = _rms(g), _rms(m[NOMINAL_MOM])
    cos = jnp.mean(g * m[NOMINAL_MOM]) / (rms_g * rms_m + 1e-30)
    flag = [1.0 if g.ndim == 0 else -1.0, 1.0 if g.ndim == 1 else -1.0]
    stats = [_log_feat(rms_g), _log_feat(rms_m), _log_feat(jnp.sqrt(jnp.mean(v))), _log_feat(_rms(p)), cos]
    static = jnp.asarray([math.log(max(g.size, 1)) / 10.0, *flag], jnp.float32)
    return jnp.concatenate([jnp.stack(stats), static, loss_feats, time_feats])


def _param_features(g, p, m, v):
    """(F_P, n) per-parameter features, each normalised by its rms over the tensor."""
    g, p, m, v = g.reshape(1, -1), p.reshape(1, -1), m.reshape(len(MOM_DECAYS), -1), v.reshape(1, -1)
    r = jax.lax.rsqrt(v + _EPS)
    x = jnp.concatenate([g, p, m, v, r, m * r])
    return x * jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(x), axis=1, keepdims=True))


def _dense(key, fan_in, fan_out, scale=1.0):
    """Uniform weights with std scale/sqrt(fan_in), zero bias."""
    (u,) = uniforms(key, (fan_in, fan_out))
    return {"w": scale * math.sqrt(3.0 / fan_in) * u, "b": jnp.zeros((fan_out,), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class RNNMLP:
    """Per-tensor LSTM + per-parameter MLP learned optimizer (see module docstring)."""

    lstm_hidden: int = 32
    cond: int = 8
    hidden: int = 32
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    nominal_lr: float = 1e-3

    name = "rnn_mlp"  # class attribute, not a dataclass field
    description = "per-tensor LSTM conditioning per-parameter MLP, plus nominal Adam step (Metz et al. 2020)"
    learned = True

    def __post_init__(self):
        if min(self.lstm_hidden, self.cond, self.hidden) < 1:
            raise ValueError(f"rnn_mlp needs lstm_hidden, cond, hidden >= 1, got {self}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init(self, key: jax.Array) -> dict:
        return _init(self, key)

    def _init(self, key: jax.Array) -> dict:
        k = jax.random.split(key, 5)
        H, C, M = self.lstm_hidden, self.cond, self.hidden
        return {
            "lstm": init_lstm(k[0], NUM_TENSOR_FEATURES + H, H),
            "cond": _dense(k[1], H, C),
            # Zero: the nominal step is exactly Adam(nominal_lr) at θ₀.
            "nominal": {"w": jnp.zeros((H, 1), jnp.float32), "b": jnp.zeros((1,), jnp.float32)},
            "mlp": {
                "l0": _dense(k[2], NUM_PARAM_FEATURES + C, M),
                "l1": _dense(k[3], M, M),
                # Small output layer: the learned step only perturbs the nominal one at θ₀.
                "l2": _dense(k[4], M, 2, scale=0.01),
            },
        }

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        H = self.lstm_hidden
        decays = jnp.asarray(MOM_DECAYS, jnp.float32)
        mlp = theta["mlp"]

        def init_fn(params):
            leaves = jax.tree.leaves(params)
            mom = tuple(jnp.zeros((len(MOM_DECAYS), *jnp.shape(x)), jnp.float32) for x in leaves)
            rms = tuple(jnp.zeros(jnp.shape(x), jnp.float32) for x in leaves)
            zh = jnp.zeros((len(leaves), H), jnp.float32)
            z = jnp.zeros((), jnp.float32)
            return RNNMLPState(jnp.zeros((), jnp.int32), mom, rms, zh, zh, z, z, jnp.zeros((), jnp.int32))

        def loss_stats(state, loss):
            """New (min, mean, count) and the two loss features; neutral zeros without a loss."""
            if loss is None:
                return (state.loss_min, state.loss_mean, state.loss_count), jnp.zeros((2,), jnp.float32)
            loss = jnp.asarray(loss, jnp.float32)
            n = state.loss_count + 1
            lmin = jnp.where(state.loss_count == 0, loss, jnp.minimum(state.loss_min, loss))
            mean = LOSS_DECAY * state.loss_mean + (1 - LOSS_DECAY) * loss
            mean_c = mean / (1 - LOSS_DECAY ** n.astype(jnp.float32))
            # Scale-free: distance above the best loss in units of the typical excess.
            spread = jnp.maximum(mean_c - lmin, 0.0) + 1e-3 * jnp.abs(mean_c) + 1e-12
            rel = jnp.clip((loss - lmin) / spread, 0.0, 5.0)
            dev = jnp.clip((loss - mean_c) / (jnp.abs(mean_c) + 1e-12), -5.0, 5.0)
            return (lmin, mean, n), jnp.stack([rel, dev])

        def update_fn(updates, state, params=None, loss=None, **extra_args):
            del extra_args
            if params is None:
                raise ValueError("rnn_mlp needs params (the parameter value is a feature)")
            grads, treedef = jax.tree.flatten(updates)
            if not grads:
                return updates, state
            ps = [jnp.asarray(x, jnp.float32) for x in treedef.flatten_up_to(params)]
            gs = [x.astype(jnp.float32) for x in grads]
            (lmin, lmean, lcount), loss_feats = loss_stats(state, loss)
            frac = state.count.astype(jnp.float32) / jnp.asarray(max(num_steps, 1), jnp.float32)
            time_feats = jnp.tanh(frac / jnp.asarray(TIMESCALES, jnp.float32) - 1.0)

            bshape = (len(MOM_DECAYS),)
            ms = [
                decays.reshape(bshape + (1,) * g.ndim) * m + (1 - decays.reshape(bshape + (1,) * g.ndim)) * g
                for g, m in zip(gs, state.momenta, strict=True)
            ]
            vs = [RMS_DECAY * v + (1 - RMS_DECAY) * jnp.square(g) for g, v in zip(gs, state.rms, strict=True)]

            # Per-tensor LSTM, one batch over all tensors, plus the cross-tensor mean of h.
            tfeat = jnp.stack(
                [_tensor_features(*a, loss_feats, time_feats) for a in zip(gs, ps, ms, vs, strict=True)]
            )
            from_lstm = jnp.broadcast_to(jnp.mean(state.h, axis=0), state.h.shape)
            h, c = lstm_step(theta["lstm"], jnp.concatenate([tfeat, from_lstm], axis=1), state.h, state.c)
            cond = h @ theta["cond"]["w"] + theta["cond"]["b"]  # (T, C)
            nom_scale = jnp.clip(h @ theta["nominal"]["w"] + theta["nominal"]["b"], -_OUT_CLIP, _OUT_CLIP)
            nom_lr = self.nominal_lr * jnp.exp(nom_scale[:, 0])
            # The conditioning vector is constant over a tensor: fold it into the first bias.
            b0 = mlp["l0"]["b"] + cond @ mlp["l0"]["w"][NUM_PARAM_FEATURES:]  # (T, hidden)

            t = (state.count + 1).astype(jnp.float32)
            bc1 = 1 - MOM_DECAYS[NOMINAL_MOM] ** t
            bc2 = 1 - RMS_DECAY**t
            new = []
            for i, (g, p, m, v) in enumerate(zip(gs, ps, ms, vs, strict=True)):
                x = _param_features(g, p, m, v)  # feature-major (F_P, n): W^T @ X
                z = jax.nn.relu(mlp["l0"]["w"][:NUM_PARAM_FEATURES].T @ x + b0[i][:, None])
                z = jax.nn.relu(mlp["l1"]["w"].T @ z + mlp["l1"]["b"][:, None])
                d, s = mlp["l2"]["w"].T @ z + mlp["l2"]["b"][:, None]
                learned = self.step_mult * d * jnp.exp(self.exp_mult * s)
                nominal = nom_lr[i] * (m[NOMINAL_MOM] / bc1) / (jnp.sqrt(v / bc2) + _EPS)
                step = nominal + learned.reshape(g.shape)
                new.append((-step).astype(grads[i].dtype))

            new_state = RNNMLPState(state.count + 1, tuple(ms), tuple(vs), h, c, lmin, lmean, lcount)
            return jax.tree.unflatten(treedef, new), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_init = jax.jit(RNNMLP._init, static_argnums=0)  # one compile per configuration, not per eager op
