"""DMD features (metaopt.optimizers.dmd) against truth: a slow NumPy exact DMD (an SVD of the
snapshot matrix, Tu et al. 2014) on the same histories, closed forms (geometric decay, a sign flip,
a decaying rotation) and a history of zeros; then nominal_mlp's `dmd_history` option: its state
keeps the last steps before the schedule, θ₀ is still AdamW, the features reach the MLP (ablating
them changes a trained step), and a θ of the other layout is refused."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import optimizers
from metaopt.optimizers import dmd
from metaopt.optimizers.hand_designed import cosine_schedule


def _numpy_dmd(history: np.ndarray, rank: int = 2, rcond: float = dmd.RCOND):
    """(ŝ, ρ, |arg λ_max|) by exact DMD in float64: X = U Σ Vᵀ truncated to `rank` (and to the
    singular values above rcond · σ_max), Ã = Uᵀ Y V Σ⁻¹, ŝ = U Ã Uᵀ s_k, λ = eig(Ã)."""
    s = np.asarray(history, np.float64).reshape(history.shape[0], -1).T  # (n, k)
    x, y = s[:, :-1], s[:, 1:]
    u, sigma, vt = np.linalg.svd(x, full_matrices=False)
    r = min(rank, int(np.sum(sigma > rcond * sigma[0])))
    u, sigma, v = u[:, :r], sigma[:r], vt[:r].T
    a_tilde = u.T @ y @ v / sigma[None, :]
    prediction = u @ (a_tilde @ (u.T @ s[:, -1]))
    eig = np.linalg.eigvals(a_tilde)
    top = eig[np.argmax(np.abs(eig))]
    return prediction.reshape(history.shape[1:]), float(np.abs(top)), float(abs(np.angle(top)))


@pytest.mark.parametrize(("k", "shape", "seed"), [(3, (7,), 0), (5, (4, 3, 2), 1), (8, (50,), 2), (4, (), 3)])
def test_decompose_matches_a_numpy_exact_dmd(k, shape, seed):
    """Random histories (n up to 50, k 3-8; a scalar's too): float32 Gram arithmetic against a
    float64 SVD, to 1e-3 relative (the Gram squares the condition number; these are well
    conditioned)."""
    rng = np.random.default_rng(seed)
    # Steps of a noisy linear system, as an optimizer's are, so the modes are well separated.
    n = math.prod(shape)
    mix = rng.normal(size=(n, n)) * 0.3 / math.sqrt(max(n, 1)) + 0.8 * np.eye(n)
    steps = [rng.normal(size=n)]
    for _ in range(k - 1):
        steps.append(mix @ steps[-1] + 0.05 * rng.normal(size=n))
    history = np.stack(steps).reshape(k, *shape).astype(np.float32)
    prediction, radius, angle = dmd.decompose(jnp.asarray(history))
    want_prediction, want_radius, want_angle = _numpy_dmd(history)
    scale = np.sqrt(np.mean(want_prediction ** 2)) + 1e-12
    np.testing.assert_allclose(np.asarray(prediction), want_prediction, atol=1e-3 * scale, rtol=1e-3)
    assert float(radius) == pytest.approx(want_radius, rel=1e-3)
    assert float(angle) == pytest.approx(want_angle, abs=1e-3)


def test_closed_forms_decay_sign_flip_rotation_and_zeros():
    """s_t = 0.9^t s: ρ 0.9, arg 0, ŝ = 0.9 s_k. s_t = (-1)^t s: ρ 1, arg π. A rotation by ω = 0.7
    shrinking by 0.95 a step, in a random plane of R^20: ρ 0.95, arg 0.7, ŝ the next step exactly.
    Zeros: ŝ 0, ρ 0, and the features at their floors."""
    s = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    decay = jnp.stack([0.9 ** t * s for t in range(5)])
    prediction, radius, angle = dmd.decompose(decay)
    np.testing.assert_allclose(np.asarray(prediction), 0.9 ** 5 * np.asarray(s), rtol=1e-4)
    assert (float(radius), float(angle)) == pytest.approx((0.9, 0.0), abs=1e-4)
    flip = jnp.stack([(-1.0) ** t * s for t in range(4)])
    assert [float(x) for x in dmd.decompose(flip)[1:]] == pytest.approx([1.0, math.pi], abs=1e-4)

    plane = np.linalg.qr(np.random.default_rng(0).normal(size=(20, 2)))[0]
    rotation = [plane @ (0.95 ** t * np.array([math.cos(0.7 * t), math.sin(0.7 * t)])) for t in range(7)]
    history = jnp.asarray(np.stack(rotation[:6]), jnp.float32)
    prediction, radius, angle = dmd.decompose(history)
    np.testing.assert_allclose(np.asarray(prediction), rotation[6], atol=1e-5)
    assert (float(radius), float(angle)) == pytest.approx((0.95, 0.7), abs=1e-4)

    element, tensor = dmd.features(jnp.zeros((4, 3, 2)))
    assert element.shape == (1, 6) and not np.any(np.asarray(element))
    assert np.asarray(tensor).tolist() == [-1.0, 0.0]
    with pytest.raises(ValueError, match="at least 3 steps"):
        dmd.decompose(jnp.zeros((2, 5)))


def test_features_are_scale_free_clipped_and_carry_no_gradient():
    """Scaling a history by 1e-6 or 1e6 leaves every feature as it was; a prediction far above the
    last step is clipped to ±PREDICTION_CLIP; autodiff through them gives zeros, never NaN (eigh's
    derivative is undefined at the repeated eigenvalues of a history of zeros)."""
    history = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3, 4)), jnp.float32)
    element, tensor = dmd.features(history)
    for scale in (1e-6, 1e6):
        e, t = dmd.features(history * scale)
        np.testing.assert_allclose(np.asarray(e), np.asarray(element), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(np.asarray(t), np.asarray(tensor), rtol=1e-3, atol=1e-4)
    growth = jnp.stack([3.0 ** t * jnp.ones(6) for t in range(4)]).at[-1].multiply(1e-3)
    assert float(jnp.max(jnp.abs(dmd.features(growth)[0]))) <= dmd.PREDICTION_CLIP

    def total(h):
        e, t = dmd.features(h)
        return jnp.sum(e) + jnp.sum(t)

    for h in (jnp.zeros((4, 5)), history):
        grad = jax.grad(total)(h)
        assert np.all(np.asarray(grad) == 0.0)


def _run(opt, theta, steps=12, ablate=()):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros(3)}
    tx = opt.as_optax(theta, 40, ablate=ablate)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for i in range(steps):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(3.0 * p + i) + 0.2, params)
        u, state = update(grads, state, params)
        params = jax.tree.map(jnp.add, params, u)
        out.append((u, state))
    return out


def test_nominal_mlp_keeps_the_steps_before_the_schedule_and_theta0_is_still_adamw():
    """With dmd_history 4 the state holds the last 4 steps, each the update over -lr(t) (no
    weight decay here), oldest first; at θ₀ (a zero output layer) the updates are the option-off
    optimizer's, bit for bit."""
    with_dmd = optimizers.make("nominal_mlp", dmd_history=4, rate_adaptation=0.1)
    without = optimizers.make("nominal_mlp", rate_adaptation=0.1)
    a = _run(with_dmd, with_dmd.init(jax.random.key(0)))
    b = _run(without, without.init(jax.random.key(0)))
    for (ua, _), (ub, _) in zip(a, b, strict=True):
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    schedule = [float(cosine_schedule(0.03, 40, 0.05)(t)) for t in range(12)]
    last_state = a[-1][1]
    w_index = 1  # leaves in key order: b, w
    for j, t in enumerate(range(8, 12)):
        want = -np.asarray(a[t][0]["w"]) / schedule[t]
        np.testing.assert_allclose(np.asarray(last_state.history[w_index][j]), want, rtol=1e-5)


def test_a_trained_theta_reads_the_dmd_features_and_a_theta_of_the_other_layout_is_refused():
    opt = optimizers.make("nominal_mlp", dmd_history=3)
    assert opt.num_features == (6, 14) and "dmd" in opt.feature_groups
    theta = opt.init(jax.random.key(0))
    theta["mlp"]["w1"] = 0.5 * jax.random.normal(jax.random.key(1), theta["mlp"]["w1"].shape)
    full = _run(opt, theta)[-1][0]["w"]
    ablated = _run(opt, theta, ablate=("dmd",))[-1][0]["w"]
    assert float(jnp.max(jnp.abs(full - ablated))) > 1e-6
    with pytest.raises(ValueError, match="takes 11 features.*dmd_history=3 takes 14"):
        opt.as_optax(optimizers.make("nominal_mlp").init(jax.random.key(0)), 10)
    with pytest.raises(ValueError, match="dmd_history"):
        optimizers.make("nominal_mlp", dmd_history=2)
    with pytest.raises(ValueError, match="cannot ablate"):
        optimizers.make("nominal_mlp").as_optax(optimizers.make("nominal_mlp").init(jax.random.key(0)),
                                                10, ablate=("dmd",))
