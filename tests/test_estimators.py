"""PES and truncated ES against a closed-form Gaussian-smoothed meta-gradient.

Inner problem: f(x) = a·x²/2 in one dimension, from x₀, trained by gradient descent with a
learned step size θ. Each truncation j (of K steps) runs at θ + ε_j, ε_j ~ N(0, σ²) drawn
afresh per truncation, so x after step s of truncation j is

    x = x₀ · Π_{i<j} μ_i^K · μ_j^s,   μ_i = 1 − a(θ + ε_i),

and the expected loss factorises into Gaussian moments E[μ^n] (μ ~ N(1 − aθ, (aσ)²)).
PES estimates d/dθ E[mean loss of truncation j] without bias; truncated ES ignores the
dependence through the earlier truncations and is biased for j > 1.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from workers.estimators import EstimatorConfig, make_estimator

A, X0, THETA, SIGMA, K, J = 1.0, 1.0, 0.1, 0.05, 5, 3
RUNS, PARTICLES = 40, 2000  # 40 independent means of 2000 antithetic pairs each


@flax.struct.dataclass
class ScalarQuadratic:
    """f(x) = a·x²/2 from a fixed x₀; deterministic (empty batches)."""

    a: jax.Array

    def init(self, key):
        return {"x": jnp.full((1,), X0, jnp.float32)}

    def loss(self, params, key, batch):
        return 0.5 * self.a * jnp.sum(params["x"] ** 2)

    def batch(self, key, split):
        return ()


@dataclasses.dataclass(frozen=True)
class FakeLearnedStepSize:
    """A fake learned optimizer for this test only: θ = {"lr": scalar}, update = −lr·g."""

    name: str = "fake_learned_step_size"
    hparams: tuple = ()

    def init(self, key):
        return {"lr": jnp.asarray(THETA, jnp.float32)}

    def as_optax(self, theta, num_steps):
        def update(grads, state, params=None, **extra):
            return jax.tree.map(lambda g: -theta["lr"] * g, grads), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def gaussian_moment(n: int, mean, std):
    """E[μⁿ] for μ ~ N(mean, std²)."""
    return sum(
        math.comb(n, k) * mean ** (n - k) * std**k * math.prod(range(k - 1, 0, -2))
        for k in range(0, n + 1, 2)
    )


def smoothed_truncation_loss(theta, j: int):
    """E over ε of the mean loss of truncation j (1-based), as a function of θ."""
    mean, std = 1 - A * theta, A * SIGMA
    before = gaussian_moment(2 * K, mean, std) ** (j - 1)
    within = sum(gaussian_moment(2 * s, mean, std) for s in range(K)) / K
    return 0.5 * A * X0**2 * before * within


def run_estimates(kind: str) -> np.ndarray:
    """[RUNS, J] estimates: each run is fresh particles unrolled for J truncations."""
    estimator = make_estimator(
        kind, FakeLearnedStepSize(), num_particles=PARTICLES, truncation_length=K,
        inner_horizon=K * J, sigma=SIGMA, stagger=False, loss_normalization="none",
    )
    task = ScalarQuadratic(a=jnp.asarray(A, jnp.float32))
    theta = FakeLearnedStepSize().init(None)
    out = np.zeros((RUNS, J))
    for run in range(RUNS):
        key = jax.random.key(run)
        state = estimator.init(jax.random.fold_in(key, 1000), theta, task)
        for j in range(J):
            state, grad, _ = estimator.estimate(jax.random.fold_in(key, j), theta, state, task)
            out[run, j] = float(grad[0])
    return out


@pytest.fixture(scope="module")
def truth():
    return np.array([jax.grad(smoothed_truncation_loss)(THETA, j) for j in range(1, J + 1)])


def test_pes_matches_closed_form_smoothed_gradient(truth):
    estimates = run_estimates("pes")
    mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / math.sqrt(RUNS)
    # Within 4 standard errors and 3% of the truth, in every truncation.
    assert np.all(np.abs(mean - truth) < 4 * stderr), (mean, truth, stderr)
    assert np.all(np.abs(mean - truth) < 0.03 * np.abs(truth)), (mean, truth)


def test_truncated_es_is_biased_after_the_first_truncation(truth):
    estimates = run_estimates("truncated_es")
    mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / math.sqrt(RUNS)
    # First truncation: nothing came before, so truncated ES is unbiased there too.
    assert abs(mean[0] - truth[0]) < 4 * stderr[0]
    # Later: it misses how θ shaped the starting state, a bias of many standard errors.
    assert np.all(np.abs(mean[1:] - truth[1:]) > 20 * stderr[1:]), (mean, truth, stderr)
    assert np.all(np.abs(mean[1:] - truth[1:]) > 0.3 * np.abs(truth[1:]))


def test_pes_accumulator_resets_with_the_inner_problem():
    """After the horizon the pair resets, and the estimate again only credits the fresh ε."""
    estimator = make_estimator(
        "pes", FakeLearnedStepSize(), num_particles=4, truncation_length=K,
        inner_horizon=K, sigma=SIGMA, stagger=False,
    )
    task = ScalarQuadratic(a=jnp.asarray(A, jnp.float32))
    theta = FakeLearnedStepSize().init(None)
    state = estimator.init(jax.random.key(0), theta, task)
    state, _, metrics = estimator.estimate(jax.random.key(1), theta, state, task)
    assert int(metrics["resets"]) == 0
    first_acc = np.asarray(state.accumulator["lr"])
    state, _, metrics = estimator.estimate(jax.random.key(2), theta, state, task)
    assert int(metrics["resets"]) == 4  # every pair hit its horizon at the first step
    assert np.all(np.asarray(state.step) == K)
    # ξ is now exactly the fresh ε: it no longer contains the first truncation's.
    assert not np.allclose(np.asarray(state.accumulator["lr"]), first_acc)
    assert np.all(np.abs(np.asarray(state.accumulator["lr"])) < 5 * SIGMA)


def test_initial_loss_normalisation_rescales_each_inner_run():
    """With "initial", losses are divided by the inner run's first loss (here a·x₀²/2)."""
    task = ScalarQuadratic(a=jnp.asarray(A, jnp.float32))
    theta = FakeLearnedStepSize().init(None)
    grads = {}
    for mode in ("none", "initial"):
        estimator = make_estimator(
            "pes", FakeLearnedStepSize(), num_particles=16, truncation_length=K,
            inner_horizon=K * J, sigma=SIGMA, stagger=False, loss_normalization=mode,
        )
        state = estimator.init(jax.random.key(0), theta, task)
        for j in range(J):
            state, grad, _ = estimator.estimate(jax.random.key(j + 1), theta, state, task)
        grads[mode] = float(grad[0])
    assert grads["initial"] == pytest.approx(grads["none"] / (0.5 * A * X0**2), rel=1e-5)


def test_config_rejects_a_truncation_longer_than_the_horizon():
    with pytest.raises(ValueError, match="truncation_length <= inner_horizon"):
        EstimatorConfig(truncation_length=50, inner_horizon=20)
