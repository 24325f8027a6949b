"""The task zoo: the contract every family must meet, plus per-family training checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import task_zoo
from metaopt.task_zoo import TEST, TRAIN, TaskSpec

FAMILIES = task_zoo.families()


def _step_loss(task, key):
    """init -> train batch -> loss, the path every inner-training loop takes."""
    k_init, k_batch, k_loss = jax.random.split(key, 3)
    params = task.init(k_init)
    return task.loss(params, k_loss, task.batch(k_batch, TRAIN))


def _same_shape_pair(fam):
    """Two different sampled specs whose tasks have identical treedef and leaf shapes."""
    seen = {}
    for i in range(200):
        spec = fam.sample(jax.random.key(i))
        t = task_zoo.task(spec)
        sig = (jax.tree.structure(t), tuple(jnp.shape(x) for x in jax.tree.leaves(t)))
        if sig in seen and seen[sig] != spec:
            return seen[sig], spec
        seen.setdefault(sig, spec)
    raise AssertionError(f"no two same-shape tasks in 200 samples of {fam.name}")


BUILTINS = ["autoencoder", "cnn", "epinet", "least_squares", "logistic", "lstm_lm", "mlp", "quadratic",
            "sparse_cnn", "sparse_mlp", "transformer_lm"]


def test_registry_lists_builtins():
    assert FAMILIES == BUILTINS
    for name in FAMILIES:
        assert task_zoo.family(name).name == name


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_deterministic_and_json_roundtrip(name):
    fam = task_zoo.family(name)
    a, b = fam.sample(jax.random.key(7)), fam.sample(jax.random.key(7))
    assert a == b and a.name == name
    assert fam.sample(jax.random.key(8)) != a  # the seed alone differs almost surely
    assert TaskSpec.from_json(a.to_json()) == a
    # the round-tripped spec builds a task with identical arrays
    t1, t2 = task_zoo.task(a), task_zoo.task(TaskSpec.from_json(a.to_json()))
    jax.tree.map(np.testing.assert_array_equal, t1, t2)


@pytest.mark.parametrize("name", FAMILIES)
def test_jitted_loss_and_grad_finite(name):
    t = task_zoo.task(task_zoo.family(name).sample(jax.random.key(0)))
    loss = jax.jit(_step_loss)(t, jax.random.key(1))
    assert loss.shape == () and loss.dtype == jnp.float32 and jnp.isfinite(loss)

    @jax.jit
    def grad(task, key):
        params = task.init(key)
        return jax.grad(task.loss)(params, key, task.batch(key, TEST))

    leaves = jax.tree.leaves(grad(t, jax.random.key(2)))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    params = t.init(jax.random.key(3))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    first = next(task_zoo.batches(t, jax.random.key(4), TRAIN))
    assert jax.tree.structure(first) == jax.tree.structure(t.batch(jax.random.key(5), TRAIN))


@pytest.mark.parametrize("name", FAMILIES)
def test_same_shape_tasks_share_one_compilation(name):
    spec1, spec2 = _same_shape_pair(task_zoo.family(name))
    # a fresh function: jax.jit shares its cache between wrappers of one function object
    fn = jax.jit(lambda task, key: _step_loss(task, key))
    fn(task_zoo.task(spec1), jax.random.key(0))
    fn(task_zoo.task(spec2), jax.random.key(0))
    # the optional init_scale is a leaf too: changing it changes the loss, not the program
    t3, t4 = (task_zoo.task(TaskSpec(name, {**spec1.kwargs, "init_scale": s})) for s in (0.5, 2))
    assert float(fn(t3, jax.random.key(0))) != float(fn(t4, jax.random.key(0)))
    assert fn._cache_size() == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_specs_raise_helpful_errors(name):
    spec = task_zoo.family(name).sample(jax.random.key(0))
    missing = TaskSpec(name, {k: v for k, v in spec.kwargs.items() if k != "seed"})
    with pytest.raises(ValueError, match=r"missing kwargs \['seed'\]"):
        task_zoo.task(missing)
    with pytest.raises(ValueError, match="unknown kwargs.*bogus"):
        task_zoo.task(TaskSpec(name, {**spec.kwargs, "bogus": 1}))
    with pytest.raises(ValueError, match="seed must be int"):
        task_zoo.task(TaskSpec(name, {**spec.kwargs, "seed": "zero"}))


def test_unknown_family_and_bad_family_kwargs():
    with pytest.raises(ValueError, match=r"unknown task family 'nope'.*'lstm_lm', 'mlp'"):
        task_zoo.family("nope")
    with pytest.raises(ValueError, match="unknown task family 'nope'.*spec"):
        task_zoo.task(TaskSpec("nope", {}))
    with pytest.raises(ValueError, match="accepted kwargs"):
        task_zoo.family("quadratic", dimz=(8,))
    with pytest.raises(ValueError, match="activations"):
        task_zoo.family("mlp", activations=("sigmoid",))
    with pytest.raises(ValueError, match="already registered"):
        task_zoo.register("mlp", task_zoo.QuadraticFamily)
    with pytest.raises(ValueError, match="split"):
        task_zoo.task(task_zoo.family("quadratic").sample(jax.random.key(0))).batch(
            jax.random.key(0), "valid"
        )


def test_quadratic_family_overrides_and_closed_form():
    fam = task_zoo.family("quadratic", dims=(8,), log10_condition=(0.0, 2.0), noise=(0.0, 0.1))
    spec = fam.sample(jax.random.key(3))
    kw = spec.kwargs
    assert kw["dim"] == 8 and 0 <= kw["log10_condition"] <= 2 and 0 <= kw["noise"] <= 0.1
    t = task_zoo.task(spec)
    c = np.asarray(t.curvature)
    np.testing.assert_allclose([c.min(), c.max()], [1.0, 10 ** kw["log10_condition"]], rtol=1e-5)
    # the closed-form minimiser: zero test loss, zero test gradient
    at_min = {"x": t.center}
    zero = t.batch(jax.random.key(0), TEST)
    assert float(t.loss(at_min, None, zero)) == 0.0
    assert float(jnp.abs(jax.grad(t.loss)(at_min, None, zero)["x"]).max()) == 0.0
    # expected train loss at the minimiser is 0.5 * noise^2 * mean(curvature)
    noisy = jax.vmap(lambda k: t.loss(at_min, None, t.batch(k, TRAIN)))(
        jax.random.split(jax.random.key(1), 4000)
    )
    np.testing.assert_allclose(noisy.mean(), 0.5 * kw["noise"] ** 2 * c.mean(), rtol=0.1)


def test_quadratic_gradient_descent_reaches_minimum():
    fam = task_zoo.family("quadratic", dims=(16,), log10_condition=(0.0, 2.0), noise=(0.1, 0.1))
    t = task_zoo.task(fam.sample(jax.random.key(0)))
    lr = t.dim / float(t.curvature.max())  # 1/L for the Hessian diag(curvature) / dim

    @jax.jit
    def run(task, key):
        params = task.init(key)

        def step(p, k):
            g = jax.grad(task.loss)(p, k, task.batch(k, TRAIN))
            return jax.tree.map(lambda a, b: a - lr * b, p, g), None

        final, _ = jax.lax.scan(step, params, jax.random.split(key, 400))
        test = task.batch(key, TEST)
        return task.loss(params, key, test), task.loss(final, key, test)

    before, after = run(t, jax.random.key(1))
    # closed-form minimum of the test loss is 0; noisy GD hovers within O(lr * noise^2) of it
    assert float(after) < 0.02 * float(before) and float(after) < 0.01


def test_mlp_adam_learns_digits():
    spec = TaskSpec(
        "mlp", {"width": 32, "depth": 1, "activation": "relu", "batch_size": 64, "seed": 0}
    )
    t = task_zoo.task(spec)
    assert t.train_x.shape == (1500, 64) and t.test_x.shape[0] == 1797 - 1500
    opt = optax.adam(1e-2)

    @jax.jit
    def run(task, key):
        params = task.init(key)

        def step(carry, k):
            p, s = carry
            g = jax.grad(task.loss)(p, k, task.batch(k, TRAIN))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (final, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, 300))
        return task.accuracy(params, task.full(TEST)), task.accuracy(final, task.full(TEST))

    before, after = run(t, jax.random.key(0))
    assert float(before) < 0.3 and float(after) > 0.85  # chance is 0.1


@pytest.mark.parametrize("name", FAMILIES)
def test_cost_estimates_count_parameters_exactly(name):
    fam = task_zoo.family(name)
    for key in jax.random.split(jax.random.key(7), 3):
        spec = fam.sample(key)
        cost = task_zoo.cost(spec)
        shapes = jax.eval_shape(task_zoo.task(spec).init, jax.random.key(0))
        assert cost.parameters == sum(x.size for x in jax.tree.leaves(shapes)), spec
        assert cost.flops_per_step >= cost.parameters > 0
    assert fam.description and "\n" not in fam.description
