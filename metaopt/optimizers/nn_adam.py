"""`nn_adam`: Adam whose per-tensor hyperparameters are set every step by a learned LSTM.

Reference: L. Metz, N. Maheswaranathan, C. D. Freeman, B. Poole, J. Sohl-Dickstein,
"Tasks, stability, architecture, and compute: training more effective learned optimizers, and
using them to train themselves" (2020), the "NN Adam" baseline; google/learned_optimization
`learned_optimizers/nn_adam.py`.

Per tensor, F=7 summary statistics of the current gradient and the previous Adam moments
    log mean|g|, log rms(m), log sqrt(mean v), log rms(p)    (each log(·+1e-30)/10, clipped)
    cos(g, m)                                                (alignment of grad and momentum)
    sign(loss)·log1p|loss|  (0 when `loss=` is not given)    loss, squashed to any scale
    step / num_steps                                         training progress
feed one LSTM (`hidden`=16) shared by all tensors (batched over the list of leaves, each tensor
with its own hidden state). A linear head gives per-tensor offsets (o_lr, o_1, o_2, o_eps):
    lr  = lr₀ · exp(o_lr)            1 - β1 = σ(logit(1 - β1₀) + o_1)
    eps = eps₀ · exp(o_eps)          1 - β2 = σ(logit(1 - β2₀) + o_2)
(1 - β is parameterised directly so that β2 = 0.999 keeps its precision in float32), then
    m ← β1 m + (1-β1) g,  v ← β2 v + (1-β2) g²,  update = -lr · m̂ / (sqrt(v̂) + eps)
with bias corrections m̂ = m / M1, v̂ = v / M2, where M ← β M + (1-β), M₀ = 0, is the total
weight of the EMA; for constant β it equals optax's 1 - β^t exactly (up to rounding).

Meta-parameters θ = {"lstm": {"wx","wh","b"}, "head": {"w","b"}}; with defaults
(7·64 + 16·64 + 64) + (16·4 + 4) = 1536 + 68 = 1604 float32. The head is zero-initialised,
so at θ₀ every offset is 0 and the optimizer equals Adam(lr₀=1e-3, β1₀=0.9, β2₀=0.999,
eps₀=1e-8) exactly (optax.adam up to float rounding); meta-gradients at θ₀ reach the head
first (the LSTM weights get them once the head is non-zero).

Optimizer state per parameter: m, v = 2 float32 (plus O(hidden) LSTM state and two EMA
weights per tensor).

Deviations from the reference: it accumulates the predicted hparams across steps (a random
walk) and drops Adam's bias correction; here each step's outputs are offsets from the base
hparams and bias correction is kept, so θ₀ reproduces Adam exactly. Its 19 features are reduced
to the 7 above (plus the loss, which it does not use).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt.optimizers.lstm_l2l import init_lstm, lstm_step

NUM_FEATURES = 7
_OUT_CLIP = 10.0  # |offsets| ≤ 10 so exp() cannot overflow for a badly perturbed θ


class NNAdamState(NamedTuple):
    """count: () int32; mu, nu: tuples of per-leaf first/second moments (leaf shapes, float32);
    mass1, mass2: (T,) EMA weights for bias correction; h, c: (T, hidden) LSTM states."""

    count: jax.Array
    mu: tuple
    nu: tuple
    mass1: jax.Array
    mass2: jax.Array
    h: jax.Array
    c: jax.Array


def _log_feat(x: jax.Array) -> jax.Array:
    # /10 keeps gradients from 1e-8 to 1e8 within a few units of zero (inputs to a tanh LSTM).
    return jnp.clip(jnp.log(x + 1e-30), -50.0, 50.0) / 10.0


def _features(g, m, v, p, loss_feat, frac):
    """Per-tensor statistics (F,) of the current grad g and the previous moments m, v."""
    rms_g = jnp.sqrt(jnp.mean(jnp.square(g)))
    rms_m = jnp.sqrt(jnp.mean(jnp.square(m)))
    cos = jnp.mean(g * m) / (rms_g * rms_m + 1e-30)
    return jnp.stack(
        [
            _log_feat(jnp.mean(jnp.abs(g))),
            _log_feat(rms_m),
            _log_feat(jnp.sqrt(jnp.mean(v))),
            _log_feat(jnp.sqrt(jnp.mean(jnp.square(p)))),
            cos,
            loss_feat,
            frac,
        ]
    )


@dataclasses.dataclass(frozen=True)
class NNAdam:
    """Per-tensor LSTM predicting Adam's lr, β1, β2, eps (see module docstring)."""

    hidden: int = 16
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    name = "nn_adam"  # class attribute, not a dataclass field
    description = "per-tensor LSTM setting Adam's lr, beta1, beta2, eps every step (Metz et al. 2020)"
    learned = True

    def __post_init__(self):
        if self.hidden < 1 or not (0 < self.b1 < 1 and 0 < self.b2 < 1) or self.learning_rate <= 0:
            raise ValueError(f"nn_adam needs hidden >= 1, 0 < b1, b2 < 1, learning_rate > 0, got {self}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init(self, key: jax.Array) -> dict:
        return _init(self, key)

    def _init(self, key: jax.Array) -> dict:
        return {
            "lstm": init_lstm(key, NUM_FEATURES, self.hidden),
            # Zero head: all offsets are 0 at θ₀, i.e. plain Adam with the base hparams.
            "head": {"w": jnp.zeros((self.hidden, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)},
        }

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        H = self.hidden
        log_lr, log_eps = math.log(self.learning_rate), math.log(self.eps)
        # Base logits of 1 - β, computed in float64 so σ(·) returns 1 - β to float32 precision.
        z1, z2 = math.log((1 - self.b1) / self.b1), math.log((1 - self.b2) / self.b2)

        def init_fn(params):
            leaves = jax.tree.leaves(params)
            T = len(leaves)
            zeros = tuple(jnp.zeros(jnp.shape(x), jnp.float32) for x in leaves)
            zt, zh = jnp.zeros((T,), jnp.float32), jnp.zeros((T, H), jnp.float32)
            return NNAdamState(jnp.zeros((), jnp.int32), zeros, zeros, zt, zt, zh, zh)

        def update_fn(updates, state, params=None, loss=None, **extra_args):
            del extra_args
            grads, treedef = jax.tree.flatten(updates)
            if not grads:
                return updates, state
            grads32 = [x.astype(jnp.float32) for x in grads]
            # Without params the parameter-norm feature falls back to a neutral 0 (log 1).
            ps = treedef.flatten_up_to(params) if params is not None else [jnp.ones(()) for _ in grads]
            if loss is None:
                loss_feat = jnp.zeros((), jnp.float32)  # neutral: "loss of 0"
            else:
                loss = jnp.asarray(loss, jnp.float32)
                loss_feat = jnp.sign(loss) * jnp.log1p(jnp.abs(loss))
            frac = state.count.astype(jnp.float32) / jnp.asarray(max(num_steps, 1), jnp.float32)
            x = jnp.stack(
                [
                    _features(g, m, v, jnp.asarray(p, jnp.float32), loss_feat, frac)
                    for g, m, v, p in zip(grads32, state.mu, state.nu, ps, strict=True)
                ]
            )  # (T, F): one LSTM batch over all tensors
            h, c = lstm_step(theta["lstm"], x, state.h, state.c)
            out = jnp.clip(h @ theta["head"]["w"] + theta["head"]["b"], -_OUT_CLIP, _OUT_CLIP)
            lr = jnp.exp(log_lr + out[:, 0])
            omb1, omb2 = jax.nn.sigmoid(z1 + out[:, 1]), jax.nn.sigmoid(z2 + out[:, 2])
            eps = jnp.exp(log_eps + out[:, 3])
            mass1 = (1 - omb1) * state.mass1 + omb1
            mass2 = (1 - omb2) * state.mass2 + omb2

            mu, nu, new = [], [], []
            for i, (g, m, v) in enumerate(zip(grads32, state.mu, state.nu, strict=True)):
                m = omb1[i] * g + (1 - omb1[i]) * m  # same operation order as optax
                v = omb2[i] * jnp.square(g) + (1 - omb2[i]) * v
                step = (m / mass1[i]) / (jnp.sqrt(v / mass2[i]) + eps[i])
                mu.append(m)
                nu.append(v)
                new.append((-lr[i] * step).astype(grads[i].dtype))
            new_state = NNAdamState(state.count + 1, tuple(mu), tuple(nu), mass1, mass2, h, c)
            return jax.tree.unflatten(treedef, new), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_init = jax.jit(NNAdam._init, static_argnums=0)  # one compile per configuration, not per eager op
