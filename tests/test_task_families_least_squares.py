"""The least_squares family against numpy truth: the spectrum it promises, the least-squares
solution at the noise floor, gradient descent reaching it. (The contract every family meets is
checked in test_task_zoo.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import task_zoo
from metaopt.task_zoo import TEST, TRAIN, TaskSpec
from metaopt.task_zoo.least_squares import make_data, split_sizes

# the spec of the shifted suite's least-squares task
SHIFTED = {"n_features": 64, "n_samples": 1024, "log10_condition": 3.5, "noise": 0.1, "batch_size": 32,
           "seed": 45}


def _spec(**overrides) -> TaskSpec:
    return TaskSpec("least_squares", {**SHIFTED, **overrides})


def test_condition_number_and_spectrum_are_what_the_spec_asks():
    for log10_condition in (0.0, 1.0, 3.5):
        kw = {**SHIFTED, "log10_condition": log10_condition}
        x = make_data(kw)["train_x"]
        n_train, _ = split_sizes(kw["n_samples"])
        assert x.shape == (n_train, 64)
        np.testing.assert_allclose(np.linalg.cond(x), 10**log10_condition, rtol=1e-9)
        expected = np.sqrt(n_train) * np.logspace(0, -log10_condition, 64)
        np.testing.assert_allclose(np.linalg.svd(x, compute_uv=False), expected, rtol=1e-9)
    # the float32 arrays the task trains on keep it to float32 rounding
    t = task_zoo.task(_spec())
    assert np.linalg.cond(np.asarray(t.train_x, np.float64)) == pytest.approx(10**3.5, rel=1e-3)
    assert t.train_x.dtype == t.train_y.dtype == jnp.float32


def test_test_rows_share_the_train_rows_second_moment():
    # 10,000 Gaussian test rows: each entry of their second-moment matrix has std <= sqrt(2) /
    # sqrt(10,000) ~ 0.014 times the top eigenvalue (1 here); 0.07 is five of those
    kw = {**SHIFTED, "n_features": 8, "n_samples": 50_000, "log10_condition": 1.0}
    data = make_data(kw)
    train, test = data["train_x"], data["test_x"]
    assert test.shape == (10_000, 8)
    np.testing.assert_allclose(test.T @ test / len(test), train.T @ train / len(train), atol=0.07)


def test_least_squares_solution_reaches_the_noise_floor():
    kw = dict(SHIFTED)
    data = make_data(kw)
    t = task_zoo.task(_spec())
    n_train, d, noise = len(data["train_y"]), kw["n_features"], kw["noise"]
    w_hat = np.linalg.lstsq(data["train_x"], data["train_y"], rcond=None)[0]
    residual = np.mean((data["train_x"] @ w_hat - data["train_y"]) ** 2)
    at_w_hat = float(t.loss({"w": jnp.asarray(w_hat, jnp.float32)}, None, t.full(TRAIN)))
    assert at_w_hat == pytest.approx(residual, rel=1e-3)  # the task's loss is numpy's MSE
    # the residual of a least-squares fit is noise^2 * chi^2(n - d) / n: mean noise^2 (n - d) / n,
    # relative std sqrt(2 / (n - d)) = 5.1% here; allow four of those
    floor = noise**2 * (n_train - d) / n_train
    assert residual == pytest.approx(floor, rel=4 * np.sqrt(2 / (n_train - d)))
    # it is the minimum: below the generating weights' loss, with a vanishing gradient
    at_w_star = float(t.loss({"w": t.w_star}, None, t.full(TRAIN)))
    assert at_w_hat < at_w_star
    grad = jax.grad(t.loss)({"w": jnp.asarray(w_hat, jnp.float32)}, None, t.full(TRAIN))["w"]
    assert float(jnp.abs(grad).max()) < 1e-4
    # far from it at init: w ~ N(0, I) misses w_star by sqrt(2) in every direction
    assert float(t.loss(t.init(jax.random.key(0)), None, t.full(TRAIN))) > 100 * floor


def test_gradient_descent_reaches_the_floor_on_a_well_conditioned_instance():
    spec = _spec(log10_condition=0.5, n_features=16)
    t = task_zoo.task(spec)
    data = make_data(dict(spec.kwargs))
    w_hat = np.linalg.lstsq(data["train_x"], data["train_y"], rcond=None)[0]
    optimum = np.mean((data["train_x"] @ w_hat - data["train_y"]) ** 2)
    # Hessian 2/n X^T X = 2 V diag(s^2) V^T: largest eigenvalue 2, so lr = 1/2; condition 10,
    # so 300 full-batch steps shrink the excess loss by (1 - 1/10)^600 ~ 1e-27
    full = t.full(TRAIN)

    @jax.jit
    def run(task, key):
        def step(p, _):
            return jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(task.loss)(p, None, full)), None

        return jax.lax.scan(step, task.init(key), None, length=300)[0]

    final = run(t, jax.random.key(0))
    assert float(t.loss(final, None, full)) == pytest.approx(optimum, rel=1e-4)
    np.testing.assert_allclose(final["w"], w_hat, atol=1e-4)
    # the test split, drawn from the same population, is at the noise level too: noise^2 plus
    # the estimation error of w_hat (d / n_train of it), within 4 std (sqrt(2 / 204) = 9.9% each)
    test_loss = float(t.loss(final, None, t.full(TEST)))
    assert test_loss == pytest.approx(0.1**2 * (1 + 16 / 820), rel=4 * np.sqrt(2 / 204))


def test_bad_specs_and_settings_say_what_to_change():
    with pytest.raises(ValueError, match="raise n_samples"):
        task_zoo.task(_spec(n_samples=70))  # 56 train rows < 64 features
    with pytest.raises(ValueError, match="log10_condition must be 0"):
        task_zoo.task(_spec(n_features=1))
    with pytest.raises(ValueError, match="must be >= 0"):
        task_zoo.task(_spec(noise=-0.1))
    with pytest.raises(ValueError, match="max\\(n_features\\) = 64"):
        task_zoo.family("least_squares", n_features=(64,), n_samples=(64,))
    fam = task_zoo.family("least_squares", log10_condition=(3.0, 3.0), n_features=(8,))
    spec = fam.sample(jax.random.key(0))
    assert spec.kwargs["log10_condition"] == 3.0 and spec.kwargs["n_features"] == 8
    batch, size = task_zoo.task(spec).batch(jax.random.key(1), TRAIN), spec.kwargs["batch_size"]
    assert batch["x"].shape == (size, 8) and batch["y"].shape == (size,)
