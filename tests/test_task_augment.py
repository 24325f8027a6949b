"""Task augmentations (closed forms and statistics) and task mixtures (weights, cost balance)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import task_zoo
from metaopt.task_zoo.augment import split_augment

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


MLP = task_zoo.TaskSpec("mlp", {"width": 8, "depth": 2, "activation": "tanh", "batch_size": 16, "seed": 5})


def scaled_mlp(seed: int, tensor=(1e-3, 1e3), element=(1e-3, 1e3), param_scale=2.0) -> task_zoo.TaskSpec:
    augment = {"param_scale": param_scale, "tensor_scale": list(tensor), "element_scale": list(element),
               "scale_seed": seed}
    return task_zoo.TaskSpec("mlp", {**MLP.kwargs, "augment": augment})


def test_per_tensor_and_per_parameter_scales_keep_the_loss_and_scale_the_gradient():
    base, wrapped = task_zoo.task(MLP), task_zoo.task(scaled_mlp(7))
    key, batch = jax.random.key(0), base.batch(jax.random.key(1), task_zoo.TRAIN)
    p, q = base.init(key), wrapped.init(key)
    scales = jax.tree.map(lambda s: 2.0 * np.asarray(s, np.float64), wrapped.scales)
    # q = p / S (S = param_scale · tensor · element), and the loss at the mapped parameters is the same.
    for qi, pi, si in zip(jax.tree.leaves(q), jax.tree.leaves(p), jax.tree.leaves(scales), strict=True):
        np.testing.assert_allclose(np.asarray(qi) * si, pi, rtol=1e-5, atol=1e-7)
    assert float(wrapped.loss(q, key, batch)) == pytest.approx(float(base.loss(p, key, batch)), rel=1e-5)
    # ∇q = S ⊙ ∇p, elementwise (chain rule through p = S ⊙ q).
    grad_q, grad_p = jax.grad(wrapped.loss)(q, key, batch), jax.grad(base.loss)(p, key, batch)
    leaves = zip(jax.tree.leaves(grad_q), jax.tree.leaves(grad_p), jax.tree.leaves(scales), strict=True)
    for gq, gp, si in leaves:
        np.testing.assert_allclose(np.asarray(gq), si * np.asarray(gp), rtol=1e-4, atol=1e-9)


def test_drawn_scales_follow_their_ranges_and_seed():
    a, b, c = (task_zoo.task(scaled_mlp(s, element=(1.0, 1.0))) for s in (3, 3, 4))
    for sa, sb in zip(jax.tree.leaves(a.scales), jax.tree.leaves(b.scales), strict=True):
        np.testing.assert_array_equal(sa, sb)  # deterministic in the seed
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.scales), jax.tree.leaves(c.scales),
                                                         strict=True))
    for s in jax.tree.leaves(a.scales):  # element range (1, 1): one value per tensor, within (1e-3, 1e3)
        assert np.all(s == s.ravel()[0]) and 1e-3 <= float(s.ravel()[0]) <= 1e3
    # Per-parameter: log10 of 20k draws is uniform on [-1, 1]: mean 0 ± 4 SE (SE = 0.577/√n), all in range.
    wide = task_zoo.task(TaskSpecWide := task_zoo.TaskSpec("mlp", {**MLP.kwargs, "width": 128, "augment": {
        "element_scale": [0.1, 10.0], "scale_seed": 1}}))
    logs = np.concatenate([np.log10(np.asarray(x)).ravel() for x in jax.tree.leaves(wide.scales)])
    assert logs.size > 10_000 and np.all(np.abs(logs) <= 1 + 1e-6), TaskSpecWide
    assert abs(logs.mean()) < 4 * (2 / np.sqrt(12)) / np.sqrt(logs.size)


@pytest.mark.parametrize("augment", [
    {"tensor_scale": [1.0, 10.0]},  # no scale_seed
    {"tensor_scale": [10.0, 1.0], "scale_seed": 1},
    {"element_scale": [0.0, 1.0], "scale_seed": 1},
    {"element_scale": [1.0, 2.0], "scale_seed": -1},
])
def test_bad_scale_ranges_are_refused_with_what_to_do(augment):
    with pytest.raises(ValueError, match="tensor_scale.*element_scale.*scale_seed"):
        split_augment(task_zoo.TaskSpec("mlp", {**MLP.kwargs, "augment": augment}))
    with pytest.raises(ValueError, match="augmentation ranges"):
        task_zoo.Augmentation(tensor_scale=(2.0, 1.0))


def test_sampled_scale_augmentations_round_trip_and_share_a_compiled_program():
    augmentation = task_zoo.Augmentation(tensor_scale=(0.1, 10.0), element_scale=(0.5, 2.0))
    loss = jax.jit(lambda task, params, key, batch: task.loss(params, key, batch))
    for i in range(3):
        spec = augmentation.apply(jax.random.key(i), MLP)
        assert task_zoo.TaskSpec.from_json(spec.to_json()) == spec
        task = task_zoo.task(spec)
        loss(task, task.init(jax.random.key(0)), jax.random.key(1), task.batch(jax.random.key(2), "train"))
    assert loss._cache_size() == 1


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
