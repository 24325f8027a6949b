"""`lstm_l2l`: the coordinatewise LSTM optimizer of Andrychowicz et al. 2016.

Reference: M. Andrychowicz, M. Denil, S. Gómez, M. W. Hoffman, D. Pfau, T. Schaul,
B. Shillingford, N. de Freitas, "Learning to learn by gradient descent by gradient descent"
(NeurIPS 2016), Sections 2.1 and 3, Appendix A (gradient preprocessing).

One small stacked LSTM (`layers`=2 layers of `hidden`=20 units, as the paper) is shared by
every scalar parameter; each coordinate keeps its own hidden and cell states. Its input is the
preprocessed gradient of Appendix A with p = `preproc_p` = 10:
    (log|g| / p, sign(g))   if |g| ≥ e^-p
    (-1, e^p · g)           otherwise,
and the update is `output_scale` (0.1 in the paper) times a linear read-out of the top layer.

Meta-parameters θ = {"lstm0": {"wx","wh","b"}, "lstm1": {...}, "out": {"w","b"}}; with defaults
(2·80+20·80+80) + (20·80+20·80+80) + (20+1) = 1840 + 3280 + 21 = 5141 float32.

Initial θ (the paper starts from a random LSTM and meta-trains it; here θ₀ must already be a
stable descent method): hidden unit 0 of every layer is a hand-set "carry" unit with input and
output gates saturated open, forget gate saturated shut and its candidate reading only the
sign-like second input feature (layer 0) or unit 0 of the layer below, so it outputs a
monotone odd squashing of sign(g) (of e^p·g for |g| < e^-p). The read-out weight of that unit
is chosen so that the update is ≈ -init_lr·sign(g) (sign descent, smaller for tiny |g|); all
other weights are random (LSTM-style uniform) with a read-out 100x smaller than the carry's,
so they perturb the step by ~1% and still receive meta-gradients.

Optimizer state per parameter: (h, c) for each layer = 4·hidden = 80 float32 with defaults
(the paper's coordinatewise design; far more than Adam's 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_GATE_BIAS = 5.0  # saturates the carry unit's gates: sigmoid(5) ≈ 0.993
_CARRY_GAIN = 3.0  # candidate pre-activation gain of the carry unit
_RANDOM_READOUT = 0.01  # random read-out weights relative to the carry's


class LSTML2LState(NamedTuple):
    """h, c: (layers, N, hidden) float32 per-coordinate LSTM states, N = total parameter count
    (all leaves flattened and concatenated in tree order)."""

    h: jax.Array
    c: jax.Array


def lstm_step(p: dict, x: jax.Array, h: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One LSTM step for a batch: x (B, I), h/c (B, H); gates ordered [i, f, g, o]."""
    z = x @ p["wx"] + h @ p["wh"] + p["b"]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def uniforms(key: jax.Array, *shapes: tuple[int, ...]) -> list[jax.Array]:
    """Uniform [-1, 1) float32 arrays of the given shapes from ONE random draw: each separate
    draw (and each eager op) costs an XLA compile, which dominated `init` time."""
    sizes = [math.prod(s) for s in shapes]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    offsets = [int(o) for o in np.cumsum([0, *sizes[:-1]])]
    return [flat[o : o + n].reshape(s) for o, n, s in zip(offsets, sizes, shapes, strict=True)]


def init_lstm(key: jax.Array, inputs: int, hidden: int) -> dict[str, jax.Array]:
    """Random LSTM weights, uniform ±1/sqrt(hidden) (the common default), forget bias +1."""
    ux, uh = uniforms(key, (inputs, 4 * hidden), (hidden, 4 * hidden))
    lim = 1.0 / math.sqrt(hidden)
    return {
        "wx": lim * ux,
        "wh": lim * uh,
        "b": jnp.zeros((4 * hidden,), jnp.float32).at[hidden : 2 * hidden].set(1.0),
    }


def preprocess(g: jax.Array, p: float) -> jax.Array:
    """Appendix A gradient preprocessing: g (...,) → (..., 2)."""
    g = g.astype(jnp.float32)
    big = jnp.abs(g) >= math.exp(-p)
    # log of a safe value so the unselected branch gives no NaN (also in meta-gradients).
    log_abs = jnp.log(jnp.where(big, jnp.abs(g), 1.0))
    first = jnp.where(big, log_abs / p, -1.0)
    second = jnp.where(big, jnp.sign(g), math.exp(p) * g)
    return jnp.stack([first, second], axis=-1)


@dataclasses.dataclass(frozen=True)
class LSTML2L:
    """Coordinatewise 2-layer LSTM optimizer (see module docstring)."""

    hidden: int = 20
    layers: int = 2
    output_scale: float = 0.1
    preproc_p: float = 10.0
    init_lr: float = 1e-3  # size of the sign-descent step at θ₀

    name = "lstm_l2l"  # class attribute, not a dataclass field
    description = "coordinatewise 2-layer LSTM on preprocessed gradients (Andrychowicz et al. 2016)"
    learned = True

    def __post_init__(self):
        if self.hidden < 1 or self.layers < 1 or self.preproc_p <= 0:
            raise ValueError(f"lstm_l2l needs hidden >= 1, layers >= 1, preproc_p > 0, got {self}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init(self, key: jax.Array) -> dict:
        return _init(self, key)

    def _init(self, key: jax.Array) -> dict:
        H = self.hidden
        keys = jax.random.split(key, self.layers + 1)
        theta = {}
        for layer in range(self.layers):
            p = init_lstm(keys[layer], 2 if layer == 0 else H, H)
            cols = np.arange(4) * H  # unit 0's column in each of the gates i, f, g, o
            # Carry unit: its only input is the sign-like feature (layer 0) or the carry below.
            wx = p["wx"].at[:, cols].set(0.0).at[1 if layer == 0 else 0, 2 * H].set(_CARRY_GAIN)
            b = p["b"].at[cols].set(jnp.asarray([_GATE_BIAS, -_GATE_BIAS, 0.0, _GATE_BIAS]))
            theta[f"lstm{layer}"] = {"wx": wx, "wh": p["wh"].at[:, cols].set(0.0), "b": b}
        # Steady-state carry output for a saturated input (sign = 1), to size the read-out:
        # with i = σ(5) = 1 - f the cell settles at c = i·cand/(1 - f) = cand.
        x = 1.0
        for _ in range(self.layers):
            x = math.tanh(math.tanh(_CARRY_GAIN * x)) / (1.0 + math.exp(-_GATE_BIAS))  # h = o·tanh(c)
        w_carry = -self.init_lr / (self.output_scale * x)
        (u,) = uniforms(keys[-1], (H, 1))
        w = _RANDOM_READOUT * abs(w_carry) * math.sqrt(3.0 / H) * u  # std 1% of the carry / sqrt(H)
        theta["out"] = {"w": w.at[0, 0].set(w_carry), "b": jnp.zeros((1,), jnp.float32)}
        return theta

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        del num_steps  # the paper's optimizer has no notion of training progress
        L, H, p, scale = self.layers, self.hidden, self.preproc_p, self.output_scale

        def init_fn(params):
            n = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))
            z = jnp.zeros((L, n, H), jnp.float32)
            return LSTML2LState(z, z)

        def update_fn(updates, state, params=None, **extra_args):
            del params, extra_args  # the paper's input is the gradient only
            leaves, treedef = jax.tree.flatten(updates)
            if not leaves:
                return updates, state
            g = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
            x = preprocess(g, p)  # (N, 2)
            hs, cs = [], []
            for layer in range(L):
                x, c = lstm_step(theta[f"lstm{layer}"], x, state.h[layer], state.c[layer])
                hs.append(x)
                cs.append(c)
            step = scale * (x @ theta["out"]["w"] + theta["out"]["b"])[:, 0]
            out, off = [], 0
            for leaf in leaves:
                n = math.prod(jnp.shape(leaf))
                out.append(step[off : off + n].reshape(jnp.shape(leaf)).astype(leaf.dtype))
                off += n
            return jax.tree.unflatten(treedef, out), LSTML2LState(jnp.stack(hs), jnp.stack(cs))

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# One compiled program per configuration (the dataclass is hashable): far cheaper than the
# dozens of eager ops, each compiled separately, that building θ would otherwise take.
_init = jax.jit(LSTML2L._init, static_argnums=0)
