"""Closed-form checks of the hand-designed optimizers, Lookahead, LGL2O and adafac_mlp.

The generic contract (jit, vmap, finiteness, descent) is covered for all of them by
test_optimizers.py; here each rule is compared with a hand computation or with optax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import optimizers, task_zoo
from metaopt.tuning import random_search


def _params():
    k = jax.random.split(jax.random.key(0), 2)
    return {"b": jax.random.normal(k[0], (5,)), "w": jax.random.normal(k[1], (3, 4))}


def _grads(params, i):
    return jax.tree.map(lambda x: jnp.sin(x * (i + 1)) + 0.1 * i, params)


def _tx(name, **hparams):
    opt = optimizers.make(name, **hparams)
    return opt.as_optax(opt.init(jax.random.key(0)), 10)


def test_sgd_step_is_minus_lr_grad():
    tx, p = _tx("sgd", learning_rate=0.3), _params()
    u, _ = tx.update(_grads(p, 0), tx.init(p), p, loss=1.0)
    for a, g in zip(jax.tree.leaves(u), jax.tree.leaves(_grads(p, 0)), strict=True):
        np.testing.assert_array_equal(a, -jnp.float32(0.3) * g)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_hand_recurrence(nesterov):
    lr, mu = 0.1, 0.8
    tx, p = _tx("momentum", learning_rate=lr, momentum=mu, nesterov=nesterov), _params()
    s, v = tx.init(p), jax.tree.map(jnp.zeros_like, p)
    for i in range(3):
        g = _grads(p, i)
        u, s = tx.update(g, s, p)
        v = jax.tree.map(lambda v, g: mu * v + g, v, g)  # v_t = μ v_{t-1} + g_t
        want = jax.tree.map(lambda v, g: -lr * (g + mu * v) if nesterov else -lr * v, v, g)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name, hparams, ref",
    [
        ("adamw", {"learning_rate": 3e-3, "weight_decay": 0.1}, optax.adamw(3e-3, weight_decay=0.1)),
        ("lamb", {"learning_rate": 2e-3, "weight_decay": 0.01}, optax.lamb(2e-3, weight_decay=0.01)),
        ("lars", {"learning_rate": 0.5, "weight_decay": 1e-3}, optax.lars(0.5, weight_decay=1e-3)),
    ],
)
def test_matches_optax(name, hparams, ref):
    tx, p = _tx(name, **hparams), _params()
    s, s_ref = tx.init(p), ref.init(p)
    for i in range(3):
        g = _grads(p, i)
        u, s = tx.update(g, s, p, loss=1.0)
        u_ref, s_ref = ref.update(g, s_ref, p)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
            np.testing.assert_array_equal(a, b)
        p = optax.apply_updates(p, u)


def test_adam_cosine_matches_a_numpy_adam_on_warm_up_and_cosine():
    """20 steps, 2 of them warm-up, checked against Adam written out in float64 NumPy with the
    schedule in closed form: lr·t/2 for t < 2, then lr·(1 + cos(π(t−2)/18))/2."""
    lr, b1, b2, eps, steps = 0.01, 0.9, 0.95, 1e-8, 20
    opt = optimizers.make("adam_cosine", learning_rate=lr, b2=b2, warmup=0.1)
    tx, p = opt.as_optax({}, steps), _params()
    state, x = tx.init(p), {k: np.asarray(v, np.float64) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(v) for k, v in x.items()}
    for t in range(steps):
        g = _grads(p, t)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        rate = lr * t / 2 if t < 2 else lr * (1 + np.cos(np.pi * (t - 2) / 18)) / 2
        for k in x:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk**2
            x[k] = x[k] - rate * (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps)
            np.testing.assert_allclose(p[k], x[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="0 <= warmup < 1"):
        optimizers.make("adam_cosine", warmup=1.0)


def test_adam_cosine_tunes_its_rate_and_beta2():
    """β2 is searched beside the rate (as a traced float): the trials differ in both."""
    task = task_zoo.family("quadratic", dims=(4,)).sample(jax.random.key(1))
    result = random_search(jax.random.key(0), "adam_cosine", task, num_steps=20, trials=4)
    b2s = {t["hparams"]["b2"] for t in result.trials}
    assert len(b2s) == 4 and all(0.9 <= b <= 0.999 for b in b2s)
    assert result.best_hparams is not None and np.isfinite(result.best_loss)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam_cosine", "adamw", "lamb", "lars", "mfac"])
def test_hand_designed_contract_and_search_space(name):
    opt = optimizers.make(name)
    assert opt.learned is False and opt.init(jax.random.key(0)) == {}
    assert "learning_rate" in opt.search_space
    for hp, (kind, *_) in opt.search_space.items():
        assert hp in opt.hparams and kind in ("log_uniform", "uniform", "choice")


def test_lookahead_slow_weights_after_k_steps():
    k, alpha, lr = 3, 0.25, 0.1
    inner = {"name": "sgd", "hparams": {"learning_rate": lr}}
    tx = _tx("lookahead", inner=inner, sync_period=k, slow_step_size=alpha)
    p0 = _params()
    p, s = p0, tx.init(p0)
    fast = p0
    for i in range(k):
        g = _grads(p, i)
        u, s = tx.update(g, s, p)
        fast = jax.tree.map(lambda f, g: f - lr * g, fast, g)  # the inner SGD, by hand
        p = optax.apply_updates(p, u)
        if i < k - 1:  # between syncs the params are the fast weights
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(fast), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    want = jax.tree.map(lambda s, f: s + alpha * (f - s), p0, fast)  # slow + α(fast − slow)
    for a, b, c in zip(jax.tree.leaves(p), jax.tree.leaves(want), jax.tree.leaves(s.slow), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(c, b, rtol=1e-6, atol=1e-6)
    # The next cycle starts from the new slow weights.
    u, s = tx.update(_grads(p, k), s, p)
    want = jax.tree.map(lambda w, g: w - lr * g, want, _grads(p, k))
    for a, b in zip(jax.tree.leaves(optax.apply_updates(p, u)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_lookahead_and_lgl2o_pass_theta_through():
    key = jax.random.key(3)
    ref = optimizers.make("small_fc").init(key)
    for opt in (optimizers.make("lookahead", inner="small_fc"), optimizers.make("lgl2o")):
        assert opt.learned is True
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), opt.init(key), ref))
        assert optimizers.make(opt.name, **opt.hparams) == opt
    assert optimizers.make("lookahead").learned is False  # default inner: adam


def test_lookahead_learning_rate_replaces_the_inner_optimizers_for_tuning():
    opt = optimizers.make("lookahead", learning_rate=0.03,
                          inner={"name": "momentum", "hparams": {"momentum": 0.5}})
    assert opt.inner == optimizers.make("momentum", learning_rate=0.03, momentum=0.5)
    assert optimizers.make("lookahead", **opt.hparams) == opt
    assert "learning_rate" not in optimizers.make("lookahead").hparams  # unset: hparams as before
    with pytest.raises(ValueError, match="small_fc has none"):
        optimizers.make("lookahead", inner="small_fc", learning_rate=0.1)
    task = task_zoo.family("quadratic", dims=(4,)).sample(jax.random.key(1))
    result = random_search(jax.random.key(0), "lookahead", task, 20, 2)
    assert all(set(r["hparams"]) >= {"learning_rate", "slow_step_size"} for r in result.trials)


def _sgd(lr):
    return {"name": "sgd", "hparams": {"learning_rate": lr}}


@pytest.mark.parametrize(
    "learned_lr, fallback_lr, kept_lr",
    [
        (-0.1, 0.01, 0.01),  # the "learned" update ascends (g·u > 0): replaced by the fallback's
        (0.5, 0.01, 0.5),  # the learned update predicts a larger decrease: kept
    ],
)
def test_lgl2o_first_order_rule(learned_lr, fallback_lr, kept_lr):
    tx = _tx("lgl2o", learned=_sgd(learned_lr), fallback=_sgd(fallback_lr))
    p = _params()
    g = _grads(p, 1)
    u, s = tx.update(g, tx.init(p), p, loss=1.0)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(a, -kept_lr * b, rtol=1e-6)
    assert int(s.learned_steps) == (kept_lr == learned_lr)


def test_lgl2o_exact_rule_with_loss_fn_and_both_states_advance():
    h = 2.0  # loss 0.5·h·x²; lr = 1.5/h overshoots to x → −0.5x (loss × 0.25), 3/h to −2x (× 4)
    x = {"x": jnp.asarray([1.0, -2.0])}
    loss_fn = lambda p: 0.5 * h * jnp.sum(p["x"] ** 2)  # noqa: E731
    g = jax.grad(loss_fn)(x)
    fallback = {"name": "adam", "hparams": {"learning_rate": 0.1}}
    for lr, keep in ((3.0 / h, False), (1.5 / h, True)):
        tx = _tx("lgl2o", learned=_sgd(lr), fallback=fallback)
        u_first, _ = tx.update(g, tx.init(x), x)  # first order: big predicted decrease, kept
        np.testing.assert_allclose(u_first["x"], -lr * g["x"], rtol=1e-6)
        u, s = tx.update(g, tx.init(x), x, loss_fn=loss_fn)
        want = -lr * g["x"] if keep else -0.1 * jnp.sign(g["x"])  # adam's first step: −lr·sign(g)
        np.testing.assert_allclose(u["x"], want, rtol=1e-5)
        assert int(s.fallback[0].count) == 1  # the fallback's state advances whichever is taken


def test_adafac_mlp_sizes_and_meta_gradients():
    opt = optimizers.make("adafac_mlp")
    theta = opt.init(jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(theta)) == 2249
    state = opt.as_optax(theta, 10).init({"w": jnp.zeros((64, 32))})
    per_param = sum(x.size for x in jax.tree.leaves((state.momenta, state.rms)))
    assert per_param == 4 * 64 * 32  # 3 momenta + 1 rms; the Adafactor factors are O(rows+cols)
    assert sum(x.size for x in jax.tree.leaves((state.rows, state.cols))) == 3 * (64 + 32)

    p = _params()

    def meta_loss(th):
        tx = opt.as_optax(th, 10)
        s = tx.init(p)
        _, s = tx.update(_grads(p, 0), s, p)
        u, _ = tx.update(_grads(p, 1), s, p)
        return sum(jnp.sum(jnp.sin(7 * x) * x) for x in jax.tree.leaves(u))

    grads = jax.jit(jax.grad(meta_loss))(theta)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(leaf)), path
    for name in ("momentum", "rms", "adafactor"):  # the decays are learnable
        assert np.any(grads["decays"][name] != 0), name
