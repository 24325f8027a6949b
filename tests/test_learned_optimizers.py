"""Closed-form and structural checks of lstm_l2l, nn_adam and rnn_mlp (the conformance suite in
test_optimizers.py covers jit/vmap/extreme gradients for them already)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import optimizers
from metaopt.optimizers.lstm_l2l import preprocess

LEARNED = ["lstm_l2l", "nn_adam", "rnn_mlp"]
# Documented in each module's docstring: meta-parameters with default hparams, and optimizer
# state floats per parameter (per-tensor extras excluded).
META_PARAMS = {"lstm_l2l": 5141, "nn_adam": 1604, "rnn_mlp": 12075}
STATE_PER_PARAM = {"lstm_l2l": 80, "nn_adam": 2, "rnn_mlp": 5}


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "s": jax.random.normal(k[0], ()),
        "b": jax.random.normal(k[1], (5,)),
        "w": jax.random.normal(k[2], (4, 3)),
    }


def test_lstm_l2l_preprocessing_matches_paper():
    p = 10.0
    g = [2.0, -0.5, 1e-3, math.exp(-p), -1e-5, 3e-6, 0.0]
    expected = []
    for x in g:
        if abs(x) >= math.exp(-p):
            expected.append((math.log(abs(x)) / p, math.copysign(1.0, x)))
        else:
            expected.append((-1.0, math.exp(p) * x))
    # Hand check of both branches: log(2)/10 = 0.0693…, e^10 · -1e-5 = -0.220…
    assert expected[0][0] == pytest.approx(0.0693147, abs=1e-6)
    assert expected[4] == (-1.0, pytest.approx(-0.2202647, abs=1e-6))
    got = np.asarray(preprocess(jnp.asarray(g, jnp.float32), p))
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-6)
    # The log of the unselected branch must not leak NaNs into gradients (g = 0 is common).
    dg = jax.grad(lambda x: jnp.sum(preprocess(x, p)))(jnp.zeros(3))
    assert np.all(np.isfinite(dg))


def test_lstm_l2l_initial_theta_is_sign_descent():
    opt = optimizers.make("lstm_l2l")
    tx = opt.as_optax(opt.init(jax.random.key(0)), 10)
    g = {"x": jnp.asarray([3.0, -0.2, 1e-2, -1e4])}
    state, update = tx.init(g), jax.jit(tx.update)
    for _ in range(3):
        u, state = update(g, state)
        np.testing.assert_allclose(u["x"], -1e-3 * np.sign(g["x"]), rtol=0.03)


@pytest.mark.parametrize("with_loss", [True, False])
def test_nn_adam_initial_theta_matches_optax_adam(with_loss):
    opt = optimizers.make("nn_adam")
    tx = opt.as_optax(opt.init(jax.random.key(0)), 10)
    ref = optax.adam(1e-3)
    params = _params()
    s, s_ref = tx.init(params), ref.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for i in range(5):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)) * 10.0 ** (i - 2), params)
        kwargs = {"loss": jnp.float32(5.0 - i)} if with_loss else {}
        u, s = update(g, s, params, **kwargs)
        u_ref, s_ref = ref_update(g, s_ref, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
            # optax rounds 1 - 0.999**t in float32 (~1e-5 relative); nn_adam's EMA weight does not.
            np.testing.assert_allclose(a, b, rtol=3e-5, atol=1e-10)


@functools.cache
def _rnn_mlp_run(with_loss, steps=3):
    """Jitted: `steps` rnn_mlp updates with fixed grads and the given losses (or no `loss=`)."""
    opt = optimizers.make("rnn_mlp")
    tx = opt.as_optax(opt.init(jax.random.key(0)), 10)
    params = _params()
    grads = jax.tree.map(jnp.cos, params)

    @jax.jit
    def run(losses):
        state = tx.init(params)
        for i in range(steps):
            u, state = tx.update(grads, state, params, **({"loss": losses[i]} if with_loss else {}))
        return u, state

    return run


def _rnn_mlp_updates(losses):
    return _rnn_mlp_run(losses is not None)(jnp.asarray(losses or [0.0], jnp.float32))


def test_rnn_mlp_uses_the_loss_and_works_without_it():
    u_down, s_down = _rnn_mlp_updates([3.0, 2.0, 1.0])
    u_up, s_up = _rnn_mlp_updates([1.0, 2.0, 3.0])
    u_none, s_none = _rnn_mlp_updates(None)
    # Running loss statistics: min and bias-corrected EMA (decay 0.9) of the losses seen.
    assert float(s_down.loss_min) == 1.0 and float(s_up.loss_min) == 1.0
    mean_up = (0.1 * 0.81 * 1 + 0.1 * 0.9 * 2 + 0.1 * 3) / (1 - 0.9**3)
    assert float(s_up.loss_mean) / (1 - 0.9**3) == pytest.approx(mean_up, rel=1e-5)
    assert int(s_none.loss_count) == 0 and int(s_up.loss_count) == 3
    for u in (u_down, u_up, u_none):
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))

    def diff(a, b):
        return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True))

    assert diff(u_down, u_up) > 0  # different loss trajectories → different updates
    assert diff(u_none, u_up) > 0


@pytest.mark.parametrize("name", LEARNED)
def test_meta_param_count_and_state_floats_per_param(name):
    opt = optimizers.make(name)
    theta = opt.init(jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(theta)) == META_PARAMS[name]
    params = {"w": jnp.zeros((100, 99)), "b": jnp.zeros((99,)), "s": jnp.zeros(())}  # 10k parameters
    n = 10_000
    state = opt.as_optax(theta, 10).init(params)
    floats = sum(x.size for x in jax.tree.leaves(state) if x.dtype == jnp.float32)
    extra = floats - STATE_PER_PARAM[name] * n
    assert 0 <= extra < 0.03 * n, extra  # only small per-tensor extras (LSTM states, EMA weights)


@functools.cache
def _meta_grad(name):
    """Jitted θ ↦ gradient of the loss after 3 unrolled inner steps on a quadratic."""
    opt = optimizers.make(name)
    a = jnp.linspace(0.5, 2.0, 6)

    def loss(p):
        return 0.5 * jnp.sum(a * p["x"] ** 2) + jnp.sum(p["w"] ** 2)

    params = {"x": jnp.linspace(-1.0, 1.0, 6), "w": jnp.full((2, 3), 0.5)}

    def meta_loss(th):
        tx = opt.as_optax(th, 10)
        p, s = params, tx.init(params)
        for _ in range(3):
            value, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p, loss=value)
            p = optax.apply_updates(p, u)
        return loss(p)

    return jax.jit(jax.grad(meta_loss))


@pytest.mark.parametrize("name", LEARNED)
def test_theta_is_meta_trainable(name):
    opt = optimizers.make(name)
    theta = opt.init(jax.random.key(0))
    if name == "nn_adam":
        # θ₀ has a zero head (exact Adam), so only the head gets gradients until it moves.
        g = _meta_grad(name)(theta)
        assert np.any(g["head"]["w"] != 0) and np.any(g["head"]["b"] != 0)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
        theta = jax.tree.map(lambda x: x + 0.01, theta)
    grads = _meta_grad(name)(theta)
    for path, x in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(x)), path
        assert np.any(x != 0), path
