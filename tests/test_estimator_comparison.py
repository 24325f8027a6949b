"""Full-run ES and TBPTT against closed forms on the scalar quadratic of test_estimators.

Inner problem: f(x) = a·x²/2 from x₀, gradient descent with a learned step size θ, so
x_t = x₀·μ^t with μ = 1 − aθ and the whole-run meta-loss (loss_normalization "none") is
L(θ) = (1/H) Σ_{t<H} a·x₀²·μ^{2t}/2. Full ES perturbs θ once per run, so its target is
E_ε[L(θ + ε)], which factorises into Gaussian moments E[μ^{2t}], μ ~ N(1 − aθ, (aσ)²).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import optimizers, task_zoo
from metaopt.workers.estimators import ESTIMATORS, make_estimator
from metaopt.workers.objective import LearnedOptimizerTraining
from tests.test_estimators import THETA, X0, A, FakeLearnedStepSize, ScalarQuadratic, gaussian_moment

SIGMA, H = 0.05, 10
RUNS, PAIRS = 30, 2000  # full ES: 30 independent estimates, each a mean over 2000 antithetic pairs


def smoothed_full_run_loss(theta, sigma=SIGMA, horizon=H):
    mean, std = 1 - A * theta, A * sigma
    return sum(0.5 * A * X0**2 * gaussian_moment(2 * t, mean, std) for t in range(horizon)) / horizon


def full_run_loss(theta, horizon=H):
    return sum(0.5 * A * X0**2 * (1 - A * theta) ** (2 * t) for t in range(horizon)) / horizon


def _setup(kind, **settings):
    settings = {"num_particles": 4, "truncation_length": H, "inner_horizon": H, "sigma": SIGMA,
                "stagger": False, "loss_normalization": "none", **settings}
    estimator = make_estimator(kind, **settings)
    task = ScalarQuadratic(a=jnp.asarray(A, jnp.float32))
    objective = LearnedOptimizerTraining(task, FakeLearnedStepSize(), settings["inner_horizon"])
    return estimator, objective, FakeLearnedStepSize().init(None)


def test_full_es_matches_closed_form_smoothed_full_run_gradient():
    estimator, task, theta = _setup("full_es", num_particles=PAIRS)
    state = estimator.init(jax.random.key(0), theta, task)
    estimates = []
    for run in range(RUNS):
        state, grad, _ = estimator.estimate(jax.random.key(run + 1), theta, state, task)
        estimates.append(float(grad[0]))
    estimates = np.array(estimates)
    mean, stderr = estimates.mean(), estimates.std(ddof=1) / math.sqrt(RUNS)
    expected = float(jax.grad(smoothed_full_run_loss)(THETA))
    # Within 4 standard errors (of 30 means of 2000 pairs) and 5% of the truth.
    assert abs(mean - expected) < 4 * stderr, (mean, expected, stderr)
    assert abs(mean - expected) < 0.05 * abs(expected), (mean, expected)


def test_tbptt_over_a_whole_run_is_the_exact_full_run_gradient():
    """K = horizon: one truncation is the whole run, so TBPTT is exact (σ plays no part)."""
    estimator, task, theta = _setup("tbptt", truncation_length=H, sigma=123.0)
    state = estimator.init(jax.random.key(0), theta, task)
    state, grad, metrics = estimator.estimate(jax.random.key(1), theta, state, task)
    expected = float(jax.grad(full_run_loss)(THETA))
    np.testing.assert_allclose(float(grad[0]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mean_loss"]), full_run_loss(THETA), rtol=1e-5)


def test_tbptt_is_the_truncation_gradient_and_biased_for_the_full_run():
    """K < horizon: each estimate is ∇θ of its truncation's loss with the carried-in x fixed;
    their mean over the run misses how θ shaped the carried-in state."""
    k = H // 2
    estimator, task, theta = _setup("tbptt", truncation_length=k)
    state = estimator.init(jax.random.key(0), theta, task)
    grads = []
    for j in range(H // k):
        state, grad, _ = estimator.estimate(jax.random.key(j + 1), theta, state, task)
        x_start = X0 * (1 - A * THETA) ** (j * k)  # a constant to the truncation's gradient

        def truncation_loss(th, x_start=x_start):
            return sum(0.5 * A * x_start**2 * (1 - A * th) ** (2 * s) for s in range(k)) / k

        np.testing.assert_allclose(float(grad[0]), float(jax.grad(truncation_loss)(THETA)), rtol=1e-5)
        grads.append(float(grad[0]))
    full = float(jax.grad(full_run_loss)(THETA))
    # The mean over truncations estimates the full-run gradient, off by more than 30% here.
    assert abs(np.mean(grads) - full) > 0.3 * abs(full), (grads, full)


def _quadratic_task():
    spec = task_zoo.TaskSpec("quadratic", {"dim": 4, "log10_condition": 1.0, "noise": 0.1, "seed": 0})
    return task_zoo.task(spec)


def _check_interface(kind, optimizer, task):
    estimator = make_estimator(kind, num_particles=2, truncation_length=3, inner_horizon=6)
    task = LearnedOptimizerTraining(task, optimizer, 6)
    assert estimator.config.num_particles == 2
    assert hasattr(estimator.estimate, "lower") and hasattr(estimator.init, "lower")  # jitted
    theta = optimizer.init(jax.random.key(0))
    state = estimator.init(jax.random.key(1), theta, task)
    for k in range(2):
        state, grad, metrics = estimator.estimate(jax.random.key(2 + k), theta, state, task)
    size = sum(x.size for x in jax.tree.leaves(theta))
    assert grad.shape == (size,) and grad.dtype == jnp.float32
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    assert np.isfinite(float(metrics["mean_loss"])) and "resets" in metrics


@pytest.mark.parametrize("kind", ESTIMATORS)
def test_every_estimator_shares_the_interface(kind):
    """Two calls each, on the scalar problem and on a task_zoo quadratic: jitted `init` and
    `estimate`, a flat finite float32 estimate of θ's size, a finite mean_loss."""
    for task in (ScalarQuadratic(a=jnp.asarray(A, jnp.float32)), _quadratic_task()):
        _check_interface(kind, FakeLearnedStepSize(), task)


@pytest.mark.slow  # ~10 s of compilation on a shared CPU
def test_tbptt_differentiates_through_a_real_learned_optimizer():
    _check_interface("tbptt", optimizers.make("small_fc"), _quadratic_task())


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown estimator"):
        make_estimator("reinforce")
