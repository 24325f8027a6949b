"""Task augmentations (closed forms and statistics) and task mixtures (weights, cost balance)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import task_zoo
from task_zoo.augment import split_augment

SPEC = task_zoo.TaskSpec("quadratic", {"dim": 6, "log10_condition": 1.0, "noise": 0.0, "seed": 3})


def augmented(scale: float, noise: float) -> task_zoo.TaskSpec:
    augment = {"param_scale": scale, "grad_noise": noise}
    return task_zoo.TaskSpec("quadratic", {**SPEC.kwargs, "augment": augment})


def test_reparameterisation_rescales_parameters_and_gradients():
    base, wrapped = task_zoo.task(SPEC), task_zoo.task(augmented(4.0, 0.0))
    key, batch = jax.random.key(0), base.batch(jax.random.key(1), task_zoo.TRAIN)
    q = wrapped.init(key)
    np.testing.assert_allclose(4.0 * q["x"], base.init(key)["x"], rtol=1e-6)  # p = s·q
    assert float(wrapped.loss(q, key, batch)) == pytest.approx(float(base.loss(base.init(key), key, batch)))
    grad_q = jax.grad(wrapped.loss)(q, key, batch)["x"]
    grad_p = jax.grad(base.loss)(base.init(key), key, batch)["x"]
    np.testing.assert_allclose(grad_q, 4.0 * grad_p, rtol=1e-5)  # ∇q = s·∇p


def test_gradient_noise_has_the_stated_mean_and_spread():
    """2000 noisy gradients: mean within 4 standard errors of the clean one, std within 5%."""
    clean, noisy = task_zoo.task(SPEC), task_zoo.task(augmented(1.0, 0.3))
    params, batch = clean.init(jax.random.key(0)), clean.batch(jax.random.key(1), task_zoo.TRAIN)
    keys = jax.random.split(jax.random.key(2), 2000)
    grads = jax.vmap(lambda k: jax.grad(noisy.loss)(params, k, batch)["x"])(keys)
    truth = jax.grad(clean.loss)(params, keys[0], batch)["x"]
    clean_loss = float(clean.loss(params, keys[0], batch))
    assert float(noisy.loss(params, keys[0], batch)) == pytest.approx(clean_loss)
    np.testing.assert_array_less(np.abs(grads.mean(0) - truth), 4 * 0.3 / np.sqrt(2000))
    np.testing.assert_allclose(grads.std(0), 0.3, rtol=0.05)


def test_augmented_tasks_of_one_shape_share_a_compiled_program():
    loss = jax.jit(lambda task, params, key, batch: task.loss(params, key, batch))
    for scale, noise in [(0.5, 0.0), (3.0, 0.2)]:
        task = task_zoo.task(augmented(scale, noise))
        loss(task, task.init(jax.random.key(0)), jax.random.key(1), task.batch(jax.random.key(2), "train"))
    assert loss._cache_size() == 1


@pytest.mark.parametrize("augment", [1.0, {"param_scale": -1.0}, {"param_scale": 1.0, "extra": 2}])
def test_bad_augmentations_are_refused(augment):
    with pytest.raises(ValueError, match="augment|param_scale"):
        split_augment(task_zoo.TaskSpec("quadratic", {**SPEC.kwargs, "augment": augment}))


def test_sampled_augmentations_stay_in_their_ranges():
    augmentation = task_zoo.Augmentation(param_scale=(0.1, 10.0), grad_noise=(0.0, 0.5))
    for i in range(50):
        spec = augmentation.apply(jax.random.key(i), SPEC)
        _, values = split_augment(spec)
        assert 0.1 <= values["param_scale"] <= 10.0 and 0.0 <= values["grad_noise"] <= 0.5
        assert task_zoo.TaskSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="augmentation ranges"):
        task_zoo.Augmentation(param_scale=(0.0, 1.0))


def test_mixture_by_weight_and_balanced_by_cost():
    small, large = task_zoo.family("quadratic", dims=(8,)), task_zoo.family("quadratic", dims=(64,))
    by_weight = task_zoo.Mixture([small, large], [1.0, 3.0])
    np.testing.assert_allclose(by_weight.probabilities, [0.25, 0.75])
    by_cost = task_zoo.Mixture([small, large], [1.0, 1.0], balance="cost")
    # The quadratic's cost is linear in its dimension: 8x the FLOPs, 1/8 the probability.
    np.testing.assert_allclose(by_cost.probabilities, [8 / 9, 1 / 9])
    dims = [by_cost.sample(jax.random.key(i)).kwargs["dim"] for i in range(900)]
    # 900 draws of p = 8/9: the count of small ones is within 4 standard deviations (≈ 38).
    assert abs(dims.count(8) - 800) < 4 * np.sqrt(900 * 8 / 9 * 1 / 9)
    with pytest.raises(ValueError, match="balance"):
        task_zoo.Mixture([small], [1.0], balance="flops")


def test_augmented_tasks_train():
    task = task_zoo.task(augmented(0.2, 0.05))
    params = task.init(jax.random.key(0))
    batch = task.batch(jax.random.key(1), task_zoo.TEST)
    start = float(task.loss(params, jax.random.key(2), batch))
    for i in range(200):
        grads = jax.grad(task.loss)(params, jax.random.key(i), batch)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    assert float(task.loss(params, jax.random.key(3), batch)) < 0.1 * start
    assert jnp.isfinite(task.loss(params, jax.random.key(3), batch))
