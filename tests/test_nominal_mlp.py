"""nominal_mlp against truth: at θ₀ it is AdamW on a cosine schedule (a slow NumPy reference);
the learned correction's per-tensor RMS is held at its bound; the per-tensor law scales the step
as its closed form says; a user's schedule replaces the default one. (The conformance suite in
test_optimizers.py covers no recompilation, stable state and finite updates for zero, tiny and
huge gradients for every registered optimizer, this one included.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import optimizers
from metaopt.optimizers.nominal_mlp import NUM_FEATURES, tensor_features


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"b": jax.random.normal(k[0], (5,)), "w": jax.random.normal(k[1], (4, 3)),
            "conv": 0.1 * jax.random.normal(k[2], (3, 3, 2, 4))}


def _grads(params, i):
    return jax.tree.map(lambda x: jnp.sin(x * (i + 1)) * 10.0 ** (i % 5 - 2), params)


def _numpy_adamw_cosine(params, grads_seq, lr, num_steps, wd, kappa=0.0, bound=4.6, eps=1e-8, b1=0.9,
                        b2=0.999, warm=0, hold=False, pace=False, init=0.0, threshold=0.0, coef=0.0,
                        stable=0):
    """Slow reference, float64 arithmetic on float32 parameters: AdamW (bias-corrected) at lr·t/W
    for the first `warm` steps W, at lr for the next `stable` S, then
    lr·0.5·(1 + cos(π (t - W - S) / (T - W - S))); with kappa, each
    tensor's Adam step also times α_T,
    log α_T += kappa · cos(g_t, m_{t-1}/√v_{t-1}) (with `hold`, not during the first W steps; with
    `pace`, times the schedule's rate over its peak), from log α_T = `init`, less `threshold` from
    the cosine. With coef > 0 the rate also times Prodigy's d (Mishchenko & Defazio 2023, Alg. 4),
    written out over the whole parameter vector: λ = d² lr(t) bc_t, r ← β3 r + λ <g, x0 - x>,
    s ← β3 s + λ g, d ← max(d, coef · r / ||s||_1), the step taken at the d before the update, and
    Adam's moments (and eps) on d·g."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    log_alpha = dict.fromkeys(p, init)
    x0 = {k: x.copy() for k, x in p.items()}
    s = {k: np.zeros_like(x) for k, x in p.items()}
    d, r, beta3 = 1e-6, 0.0, math.sqrt(b2)
    out = []
    for t, grads in enumerate(grads_seq):
        decay = 0.5 * (1 + math.cos(math.pi * max(t - warm - stable, 0) / (num_steps - warm - stable)))
        rate = lr * t / warm if t < warm else lr * decay
        fraction, d_step = rate / lr, 1.0  # the schedule's, before d: the pace of α_T
        if coef > 0:
            weight = d * d * rate * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            r = beta3 * r + weight * sum(np.vdot(grads[k], x0[k] - p[k]) for k in p)
            s = {k: beta3 * s[k] + weight * np.asarray(grads[k], np.float64) for k in p}
            norm = sum(np.abs(x).sum() for x in s.values())
            rate, d_step, d = rate * d, d, max(d, coef * r / norm if norm > 0 else 0.0)
        step = {}
        for k in p:
            g = d_step * np.asarray(grads[k], np.float64)  # the moments average d·g, as Prodigy's
            d_prev = m[k] / (np.sqrt(v[k]) + 1e-30)
            cos = np.vdot(g, d_prev) / (np.linalg.norm(g) * np.linalg.norm(d_prev) + 1e-30)
            if not (hold and t < warm):
                step_k = kappa * (cos - threshold) * (fraction if pace else 1.0)
                log_alpha[k] = float(np.clip(log_alpha[k] + step_k, -bound, bound))
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
            step[k] = -rate * (math.exp(log_alpha[k]) * mhat / (np.sqrt(vhat) + eps * d_step) + wd * p[k])
            p[k] = (p[k] + step[k]).astype(np.float32).astype(np.float64)  # float32 params, as the test's
        out.append(step)
    return out


@pytest.mark.parametrize(("weight_decay", "kappa", "warmup", "hold", "pace", "init", "threshold"),
                         [(0.0, 0.0, 0.0, False, False, 0.0, 0.0), (0.1, 0.0, 0.0, False, False, 0.0, 0.0),
                          (0.1, 0.3, 0.0, False, False, 0.0, 0.0), (0.0, 0.3, 0.25, False, False, 0.0, 0.0),
                          (0.0, 0.3, 0.25, True, False, 0.0, 0.0), (0.1, 0.3, 0.25, False, True, 0.0, 0.0),
                          (0.0, 0.3, 0.25, True, True, 0.0, 0.0), (0.1, 0.3, 0.25, False, True, -0.4, 0.0),
                          (0.0, 0.3, 0.25, False, True, 0.0, 0.2), (0.0, 0.3, 0.0, False, False, 0.3, -0.1)])
def test_untrained_is_adamw_on_a_cosine_schedule(weight_decay, kappa, warmup, hold, pace, init, threshold):
    """kappa > 0: AdamW whose per-tensor rate follows the hypergradient (the NumPy reference's),
    through a linear warm-up or, with `rate_after_warmup`, only after it; with `rate_on_schedule`
    at the schedule's pace; from `rate_init`, with `rate_threshold` taken from the cosine."""
    _check_against_numpy(0.01, 8, weight_decay=weight_decay, rate_adaptation=kappa, warmup=warmup,
                         rate_after_warmup=hold, rate_on_schedule=pace, rate_init=init,
                         rate_threshold=threshold)


@pytest.mark.parametrize(("stable", "rms_decay", "kappa"), [(0.375, 0.999, 0.0), (0.0, 0.95, 0.0),
                                                          (0.25, 0.9, 0.3)])
def test_a_stable_phase_and_adams_beta2(stable, rms_decay, kappa):
    """`stable`: the peak held for that fraction of the run after a warm-up of 2 of 8 steps, the
    cosine over the rest (warm-up, stable, decay); `rms_decay`: Adam's β2; both beside α_T at the
    schedule's pace."""
    _check_against_numpy(0.01, 8, warmup=0.25, stable=stable, rms_decay=rms_decay, rate_adaptation=kappa,
                         rate_on_schedule=kappa > 0)


@pytest.mark.parametrize(("coef", "warmup", "kappa", "weight_decay"),
                         [(1.0, 0.0, 0.0, 0.0), (0.5, 0.25, 0.0, 0.0), (0.5, 0.25, 0.3, 0.1)])
def test_with_rate_estimate_the_rate_is_prodigys_estimate(coef, warmup, kappa, weight_decay):
    """`rate_estimate`: the peak rate is Prodigy's d times learning_rate (here 1, its convention),
    through a warm-up from 0 (whose first step adds nothing to the estimate) and beside α_T. Over
    40 steps d climbs from 1e-6 by orders of magnitude, so the reference is checked where the
    estimate moves, not only at its start."""
    _check_against_numpy(1.0, 40, weight_decay=weight_decay, rate_adaptation=kappa, warmup=warmup,
                         rate_estimate=coef, rate_on_schedule=kappa > 0)


def test_the_estimated_rate_never_falls_and_grows_to_the_distance_it_must_cover():
    """On sum((p - p*)²) with p* two units from the start along every coordinate, d climbs from 1e-6
    to the order of that distance (a coordinate's distance is what Adam's unit-size step at rate d
    must cover), never falling, and the run gets there."""
    opt = optimizers.make("nominal_mlp", learning_rate=1.0, rate_estimate=1.0)
    params = _params()
    target = jax.tree.map(lambda x: x + 2.0, params)

    def loss(p):
        return sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target),
                                                              strict=True))

    tx = opt.as_optax(opt.init(jax.random.key(0)), 200)
    state, update, ds = tx.init(params), jax.jit(tx.update), []
    for _ in range(200):
        u, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, u)
        ds.append(float(state.estimate.d))
    assert all(b >= a for a, b in zip(ds, ds[1:], strict=False))
    assert 0.1 < ds[-1] < 20.0, ds[-1]
    assert loss(params) < 1e-2 * 2.0 ** 2 * sum(x.size for x in jax.tree.leaves(params))


def _check_against_numpy(lr, num_steps, **hparams):
    opt = optimizers.make("nominal_mlp", learning_rate=lr, rate_range=0.5, **hparams)
    tx = opt.as_optax(opt.init(jax.random.key(3)), num_steps)
    params = _params()
    state, update = tx.init(params), jax.jit(tx.update)
    grads_seq = [_grads(params, i) for i in range(num_steps)]
    expected = _numpy_adamw_cosine(
        params, grads_seq, lr, num_steps, hparams.get("weight_decay", 0.0),
        hparams.get("rate_adaptation", 0.0), bound=0.5, warm=round(hparams.get("warmup", 0.0) * num_steps),
        hold=hparams.get("rate_after_warmup", False), pace=hparams.get("rate_on_schedule", False),
        init=hparams.get("rate_init", 0.0), threshold=hparams.get("rate_threshold", 0.0),
        coef=hparams.get("rate_estimate", 0.0), stable=round(hparams.get("stable", 0.0) * num_steps),
        b2=hparams.get("rms_decay", 0.999))
    p = params
    for i, g in enumerate(grads_seq):
        u, state = update(g, state, p)
        for k in p:
            np.testing.assert_allclose(u[k], expected[i][k], rtol=1e-4, atol=1e-9)  # float32 params
        p = optax.apply_updates(p, u)


@pytest.mark.parametrize("relative", [False, True])
def test_the_learned_correction_is_held_at_its_bound_per_tensor(relative):
    """Absolute: rms_T(c) = bound. Relative: rms_T(c) = bound · rms_T(d), d being Adam's direction."""
    bound = 0.5
    opt = optimizers.make("nominal_mlp", correction_bound=bound, relative_correction=relative)
    theta = opt.init(jax.random.key(0))
    theta["mlp"]["w1"] = 100.0 * jax.random.normal(jax.random.key(1), theta["mlp"]["w1"].shape)
    params = _params()
    grads = _grads(params, 1)
    lr = 1e-3
    # A constant schedule, so the step is lr · (d + c) and d is the same as the untrained one's.
    learned = opt.as_optax(theta, 10, learning_rate=optax.constant_schedule(lr))
    plain = opt.as_optax(opt.init(jax.random.key(0)), 10, learning_rate=optax.constant_schedule(lr))
    u, _ = learned.update(grads, learned.init(params), params)
    d, _ = plain.update(grads, plain.init(params), params)
    for k in params:
        direction = -np.asarray(d[k], np.float64) / lr
        correction = -np.asarray(u[k], np.float64) / lr - direction
        rms = np.sqrt(np.mean(correction ** 2))
        expected = bound * (np.sqrt(np.mean(direction ** 2)) if relative else 1.0)
        assert rms == pytest.approx(expected, rel=1e-3), k


def test_the_elementwise_gain_reweights_each_element_of_adams_step_and_never_reverses_it():
    """With `elementwise_correction` the step on each element is d_i · (1 + bound · tanh(MLP(x)_i)):
    a learned gain within [1 - bound, 1 + bound] of Adam's own step, whatever θ. A θ that saturates
    the MLP one way or the other puts the gains at either end, and Adam's sign is kept."""
    bound = 0.75
    opt = optimizers.make("nominal_mlp", correction_bound=bound, elementwise_correction=True)
    params, grads, lr = _params(), _grads(_params(), 1), 1e-3
    plain = opt.as_optax(opt.init(jax.random.key(0)), 10, learning_rate=optax.constant_schedule(lr))
    d, _ = plain.update(grads, plain.init(params), params)
    for sign in (1.0, -1.0):
        theta = opt.init(jax.random.key(0))
        theta["mlp"]["b0"] = jnp.ones_like(theta["mlp"]["b0"])  # every hidden unit active
        theta["mlp"]["w1"] = sign * 100.0 * jnp.ones_like(theta["mlp"]["w1"])
        learned = opt.as_optax(theta, 10, learning_rate=optax.constant_schedule(lr))
        u, _ = learned.update(grads, learned.init(params), params)
        gains = np.concatenate([np.ravel(np.asarray(u[k], np.float64) / np.asarray(d[k], np.float64))
                                for k in params])
        assert np.all(gains >= 1 - bound - 1e-5) and np.all(gains <= 1 + bound + 1e-5)
        np.testing.assert_allclose(np.median(gains), 1 + sign * bound, atol=1e-4)
    # Where Adam does not move an element, neither does the gain: a zero gradient stays a zero step.
    zero = jax.tree.map(jnp.zeros_like, grads)
    u0, _ = learned.update(zero, learned.init(params), params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u0))


def test_the_per_tensor_law_scales_the_step_as_its_closed_form():
    opt = optimizers.make("nominal_mlp")
    theta = opt.init(jax.random.key(0))
    w = jnp.asarray([0.3, -0.2, 0.5], jnp.float32)
    theta["tensor"] = {"w": w, "b": jnp.float32(0.1)}
    params, grads = _params(), _grads(_params(), 2)
    tx, tx0 = opt.as_optax(theta, 10), opt.as_optax(opt.init(jax.random.key(0)), 10)
    u, _ = tx.update(grads, tx.init(params), params)
    u0, _ = tx0.update(grads, tx0.init(params), params)
    for k, p in params.items():
        x = np.asarray(p, np.float64)
        fan_in = x.size // x.shape[-1] if x.ndim >= 2 else 1
        f = np.asarray([np.log10(np.sqrt(np.mean(x ** 2)) + 1e-8) + 1, np.log10(fan_in) - 1.5, x.ndim <= 1])
        np.testing.assert_allclose(tensor_features(p), f, rtol=1e-5, atol=1e-6)
        z = 0.1 + float(np.dot(np.asarray(w, np.float64), f))
        multiplier = math.exp(4 * math.tanh(z / 4))
        np.testing.assert_allclose(u[k], multiplier * np.asarray(u0[k]), rtol=1e-4, atol=1e-10)


def test_a_users_schedule_replaces_the_default_and_a_rate_keeps_the_cosine():
    opt = optimizers.make("nominal_mlp")
    theta = opt.init(jax.random.key(0))
    params = _params()
    tx = opt.as_optax(theta, 100, learning_rate=optax.constant_schedule(2e-3))
    ref = optax.adam(2e-3)
    s, s_ref = tx.init(params), ref.init(params)
    for i in range(4):
        g = _grads(params, i)
        u, s = tx.update(g, s, params)
        u_ref, s_ref = ref.update(g, s_ref, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=3e-5, atol=1e-10)
    # A float rate keeps the cosine: step 0 at the full rate, the middle at half of it.
    opt = optimizers.make("nominal_mlp", warmup=0.0)
    tx = opt.as_optax(theta, 2, learning_rate=0.5)
    g = {"x": jnp.ones((3,))}
    s = tx.init(g)
    u0, s = tx.update(g, s, g)
    u1, s = tx.update(g, s, g)
    np.testing.assert_allclose(u0["x"], -0.5, rtol=1e-5)
    np.testing.assert_allclose(u1["x"], -0.25, rtol=1e-5)


def _log_rates_on_a_slope(tx, num_steps: int) -> list[float]:
    """log α_T after each of `num_steps` steps of `tx` on f(x) = x²/2 from x = 1 (4 elements, one
    tensor): the gradient is x itself."""
    x = {"x": jnp.ones((4,))}
    state, seen = tx.init(x), []
    for _ in range(num_steps):
        u, state = tx.update(x, state, x)
        x = optax.apply_updates(x, u)
        seen.append(float(state.log_rate[0]))
    return seen


def test_the_adapted_rate_grows_on_a_slope_and_shrinks_on_an_overshoot():
    """On f(x) = x²/2 from x = 1, a rate far too small keeps each gradient along the last step
    (cos = 1): log α_T climbs by κ a step up to its range. A rate far too large throws x past 0,
    so the next gradient is against the last step (cos = -1, log α_T falls by κ); as the momentum
    turns, steps against it keep log α_T at or below 0 throughout."""
    kappa, bound, num_steps = 0.2, 1.0, 12
    for lr in (1e-4, 3.0):
        opt = optimizers.make("nominal_mlp", rate_adaptation=kappa, rate_range=bound)
        tx = opt.as_optax(opt.init(jax.random.key(0)), num_steps, learning_rate=optax.constant_schedule(lr))
        seen = _log_rates_on_a_slope(tx, num_steps)
        if lr < 1:  # step 1 has no previous step (cos 0); then +κ a step until the range
            np.testing.assert_allclose(seen, [min(kappa * i, bound) for i in range(num_steps)], atol=1e-5)
        else:
            assert seen[0] == 0.0 and seen[1] == pytest.approx(-kappa, abs=1e-5), seen
            assert max(seen) <= 1e-6 and min(seen) >= -bound - 1e-6 and seen[-1] < 0, seen


def test_with_rate_after_warmup_the_rate_is_held_through_the_warm_up_then_climbs():
    """The slope of the test above, with a warm-up of 3 of 12 steps: log α_T stays exactly 0 for
    those 3 steps, whatever the gradients say, then climbs by κ a step (the previous step exists
    by then, so the first active step already has cos = 1)."""
    kappa, bound, num_steps = 0.2, 1.0, 12
    opt = optimizers.make("nominal_mlp", rate_adaptation=kappa, rate_range=bound, warmup=0.25,
                          rate_after_warmup=True)
    tx = opt.as_optax(opt.init(jax.random.key(0)), num_steps, learning_rate=optax.constant_schedule(1e-4))
    seen = _log_rates_on_a_slope(tx, num_steps)
    np.testing.assert_allclose(seen, [0.0] * 3 + [min(kappa * i, bound) for i in range(1, num_steps - 2)],
                               atol=1e-5)


def test_with_rate_on_schedule_the_rate_climbs_at_the_pace_of_the_users_schedule():
    """The slope of the test above on the user's own schedule, 1e-4 for 4 steps then 2.5e-5: with
    `rate_on_schedule` log α_T climbs by κ a step while the schedule is at its peak, then by κ/4."""
    kappa, num_steps = 0.2, 8
    schedule = optax.piecewise_constant_schedule(1e-4, {4: 0.25})
    opt = optimizers.make("nominal_mlp", rate_adaptation=kappa, rate_range=5.0, rate_on_schedule=True)
    tx = opt.as_optax(opt.init(jax.random.key(0)), num_steps, learning_rate=schedule)
    seen = _log_rates_on_a_slope(tx, num_steps)
    np.testing.assert_allclose(seen, [0.0, 0.2, 0.4, 0.6, 0.65, 0.7, 0.75, 0.8], atol=1e-5)


def test_meta_parameter_count_and_bad_hparams():
    opt = optimizers.make("nominal_mlp", hidden=16)
    n = sum(x.size for x in jax.tree.leaves(opt.init(jax.random.key(0))))
    assert n == NUM_FEATURES * 16 + 16 + 16 + 1 + 3 + 1 == 213  # the module docstring's count
    for bad in ({"hidden": 0}, {"warmup": 1.0}, {"correction_bound": -1.0}, {"rate_adaptation": -0.1},
                {"rate_range": -1.0}, {"rate_init": -3.0, "rate_range": 2.3}, {"rate_threshold": 1.0},
                {"rate_estimate": -0.5}, {"rate_estimate": float("nan")}, {"stable": 0.8, "warmup": 0.2},
                {"stable": -0.1}, {"rms_decay": 1.0}, {"rms_decay": 0.0}):
        with pytest.raises(ValueError, match="nominal_mlp needs"):
            optimizers.make("nominal_mlp", **bad)


def test_a_large_tensor_goes_through_the_mlp_in_chunks_with_the_same_result():
    from metaopt.optimizers.nominal_mlp import CHUNK, NUM_ELEMENT_FEATURES, _mlp_apply

    opt = optimizers.make("nominal_mlp")
    mlp = opt.init(jax.random.key(0))["mlp"]
    mlp["w1"] = jax.random.normal(jax.random.key(1), mlp["w1"].shape)
    n = 2 * CHUNK + 1001  # three chunks, the last one padded
    x = jax.random.normal(jax.random.key(2), (NUM_ELEMENT_FEATURES, n))
    bias = jax.random.normal(jax.random.key(3), (opt.hidden,))
    w0, w1 = np.asarray(mlp["w0"][:NUM_ELEMENT_FEATURES], np.float64), np.asarray(mlp["w1"], np.float64)
    h = np.maximum(w0.T @ np.asarray(x, np.float64) + np.asarray(bias, np.float64)[:, None], 0.0)
    expected = (w1.T @ h)[0] + float(mlp["b1"][0])
    np.testing.assert_allclose(jax.jit(_mlp_apply)(mlp, x, bias), expected, rtol=1e-4, atol=1e-4)


def test_a_warm_up_schedule_from_zero_keeps_the_step_features_in_range_and_bad_rates_are_refused():
    """The step feature lr(t)/peak must stay in [0, 1] under a user's warm-up from 0 (dividing by
    lr(0) = 0 saturated the correction at its bound). θ here makes c = 0.1 · lr(t)/peak."""
    from metaopt.optimizers.nominal_mlp import NUM_ELEMENT_FEATURES, NUM_TENSOR_FEATURES

    opt = optimizers.make("nominal_mlp")
    plain = opt.init(jax.random.key(0))
    theta = jax.tree.map(jnp.zeros_like, plain)
    theta["mlp"]["w0"] = theta["mlp"]["w0"].at[NUM_ELEMENT_FEATURES + NUM_TENSOR_FEATURES + 2, 0].set(1.0)
    theta["mlp"]["w1"] = theta["mlp"]["w1"].at[0, 0].set(0.1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, 20)
    params = _params()
    txs = [opt.as_optax(th, 20, learning_rate=schedule) for th in (theta, plain)]
    states = [tx.init(params) for tx in txs]
    for i in range(4):
        (u, states[0]), (d, states[1]) = (tx.update(_grads(params, i), st, params)
                                          for tx, st in zip(txs, states, strict=True))
        lr = float(schedule(i))
        if lr == 0:
            continue
        for k in params:
            correction = -(np.asarray(u[k], np.float64) - np.asarray(d[k], np.float64)) / lr
            np.testing.assert_allclose(correction, 0.1 * lr / 3e-3, rtol=1e-3)
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive, finite learning_rate"):
            opt.as_optax(theta, 20, learning_rate=bad)
