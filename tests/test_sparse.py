"""Sparse training tasks (task_zoo/sparse.py): ERK budgets, masked and BCOO storage against dense
references, RigL against a NumPy reference, the slot resets of the optimizer state, and the loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import evaluation, inner, optimizers, task_zoo
from metaopt.optimizers.slots import SlotResetError
from metaopt.task_zoo import TRAIN, TaskSpec
from metaopt.task_zoo.sparse import drop_fraction, erk_densities, rigl_layer

MLP = {"width": 48, "depth": 2, "sparsity": 0.9, "activation": "tanh", "batch_size": 16, "seed": 5}
CNN = {"channels": 8, "depth": 2, "sparsity": 0.8, "activation": "relu", "batch_size": 16, "seed": 6}


def _task(family="sparse_mlp", **kw):
    return task_zoo.task(TaskSpec(family, {**(MLP if family == "sparse_mlp" else CNN), **kw}))


def _nonzero_params(task, key=0):
    """Params with non-zero biases too, so every path of the network is exercised."""
    params = task.init(jax.random.key(key))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(key + 1), x.shape), params)


def test_erk_densities_meet_the_budget_and_cap_dense_layers():
    shapes = [(64, 512), (512, 512), (512, 10)]
    for density in (0.05, 0.2, 0.5):
        d = erk_densities(shapes, density)
        sizes = [math.prod(s) for s in shapes]
        assert sum(di * n for di, n in zip(d, sizes, strict=True)) == pytest.approx(density * sum(sizes))
        assert all(0 < di <= 1 for di in d)
        free = [i for i, di in enumerate(d) if di < 1]  # uncapped layers keep ERK's proportions
        scale = [d[i] * sizes[i] / sum(shapes[i]) for i in free]
        assert scale == pytest.approx([scale[0]] * len(free))
    assert erk_densities(shapes, 0.5)[2] == 1.0  # the small head fills up first
    assert erk_densities(shapes, 1.0) == [1.0, 1.0, 1.0]  # sparsity 0: the dense network


@pytest.mark.parametrize("family", ["sparse_mlp", "sparse_cnn"])
def test_masked_and_bcoo_storage_give_the_same_loss_and_gradients(family):
    masked, bcoo = _task(family), _task(family, storage="bcoo")
    params = _nonzero_params(masked)
    batch = masked.batch(jax.random.key(3), TRAIN)
    lm, gm = jax.jit(jax.value_and_grad(masked.loss))(params, jax.random.key(4), batch)
    lb, gb = jax.jit(jax.value_and_grad(bcoo.loss))(params, jax.random.key(4), batch)
    np.testing.assert_allclose(lb, lm, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gb), jax.tree.leaves(gm), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sparse_mlp_is_a_dense_mlp_with_the_other_weights_at_zero():
    """The loss against a float64 NumPy MLP whose weights are the scattered values."""
    task = _task()
    params = _nonzero_params(task)
    batch = task.batch(jax.random.key(3), TRAIN)
    x = np.asarray(batch["x"], np.float64)
    for i, (name, fan_in, fan_out) in enumerate(task.layers):
        w = np.zeros(fan_in * fan_out)
        w[np.asarray(task.topology[name])] = np.asarray(params[name]["w"], np.float64)
        x = x @ w.reshape(fan_in, fan_out) + np.asarray(params[name]["b"], np.float64)
        if i < len(task.layers) - 1:
            x = np.tanh(x)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    want = -logp[np.arange(len(x)), np.asarray(batch["y"])].mean()
    np.testing.assert_allclose(task.loss(params, jax.random.key(0), batch), want, rtol=1e-5)


def test_sparse_cnn_convolves_with_the_scattered_kernels():
    task = _task("sparse_cnn")
    params = _nonzero_params(task)
    batch = task.batch(jax.random.key(3), TRAIN)
    dense = task.weights(params, "masked")
    x = batch["x"].reshape(-1, *task.image_shape)
    for name, fan_in, fan_out in task.layers[:-1]:
        kernel = dense[name].reshape(3, 3, fan_in // 9, fan_out)
        x = jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=(
            "NHWC", "HWIO", "NHWC")) + params[name]["b"])
    logits = x.reshape(x.shape[0], -1) @ dense["head"] + params["head"]["b"]
    np.testing.assert_allclose(task.logits(dense, params, batch["x"]), logits, rtol=1e-5, atol=1e-6)


def _rigl_numpy(values, index, grad, k):
    order = np.argsort(np.abs(values), kind="stable")
    dropped = order[:k]
    active = set(np.delete(index, dropped).tolist())
    candidates = [p for p in np.argsort(-np.abs(grad), kind="stable") if p not in active][:k]
    index, values = index.copy(), values.copy()
    index[dropped], values[dropped] = candidates, 0.0
    return values, index, np.isin(np.arange(len(values)), dropped)


def test_rigl_drops_the_smallest_and_grows_the_largest_gradients_like_numpy():
    rng = np.random.default_rng(0)
    for k in (0, 1, 7, 20):
        values = rng.permutation(np.linspace(-1, 1, 20)).astype(np.float32)  # distinct magnitudes but ±
        values += np.float32(1e-3) * np.arange(20, dtype=np.float32)
        index = np.sort(rng.choice(100, 20, replace=False)).astype(np.int32)
        grad = rng.permutation(np.arange(100, dtype=np.float32))  # distinct magnitudes
        got = rigl_layer(jnp.asarray(values), jnp.asarray(index), jnp.asarray(grad), jnp.int32(k))
        want = _rigl_numpy(values, index, grad, k)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), w)


def test_the_drop_fraction_follows_the_cosine_and_stops_at_t_end():
    fractions = [float(drop_fraction(jnp.float32(t), 1000, 0.3, 0.75)) for t in (0, 375, 750, 900)]
    np.testing.assert_allclose(fractions, [0.3, 0.15, 0.0, 0.0], atol=1e-7)


def test_rewiring_keeps_the_count_of_weights_and_happens_on_schedule_only():
    task = _task(rewire_every=10)
    params = task.init(jax.random.key(0))
    rewire = jax.jit(task.rewire, static_argnums=2)
    for step in (9, 11, 80):  # not a multiple of 10, and past rewire_until = 0.75 of 100 steps
        topology, same, regrown = rewire(params, jnp.int32(step), 100, jax.random.key(1))
        assert not any(bool(r.any()) for r in jax.tree.leaves(regrown))
        for name in topology:
            np.testing.assert_array_equal(topology[name], task.topology[name])
    for step in (10, 30, 50):
        topology, new, regrown = rewire(params, jnp.int32(step), 100, jax.random.key(step))
        fraction = float(drop_fraction(jnp.float32(step), 100, 0.3, 0.75))
        for name, _, _ in task.layers:
            index = np.asarray(topology[name])
            assert index.shape == task.topology[name].shape and len(set(index.tolist())) == index.size
            moved = np.asarray(regrown[name]["w"])
            assert moved.sum() == math.floor(fraction * index.size) > 0
            assert not np.asarray(new[name]["w"])[moved].any()  # grown weights start at zero
            assert not np.asarray(regrown[name]["b"]).any()


@pytest.mark.parametrize("name", ["adam", "momentum", "lookahead", "nominal_mlp"])
def test_reset_slots_zeroes_the_regrown_slots_and_nothing_else(name):
    opt = optimizers.make(name, **({"momentum": 0.9} if name == "momentum" else {}))
    tx = opt.as_optax(opt.init(jax.random.key(0)), 100)
    params = {"a": jnp.ones(6), "b": {"c": jnp.ones(4)}}
    grads = jax.tree.map(lambda p: jnp.arange(1.0, p.size + 1.0), params)
    state = tx.init(params)
    update = jax.jit(lambda s: tx.update(grads, s, params, loss=jnp.float32(1.0))[1])
    state = update(update(state))
    regrown = {"a": jnp.arange(6) % 2 == 0, "b": {"c": jnp.array([False, True, False, False])}}
    reset = optimizers.reset_slots(opt, tx, state, regrown)
    before, after = jax.tree.leaves(state), jax.tree.leaves(reset)
    touched = 0
    for x, y in zip(before, after, strict=True):
        if x.shape[-1:] in ((6,), (4,)) and x.size > 1:  # a per-parameter array of leaf a or c
            mask = np.asarray(regrown["a"] if x.shape[-1] == 6 else regrown["b"]["c"])
            np.testing.assert_array_equal(np.asarray(y)[..., mask], 0)
            np.testing.assert_array_equal(np.asarray(y)[..., ~mask], np.asarray(x)[..., ~mask])
            touched += int(np.any(np.asarray(x)[..., mask] != 0))
        else:
            np.testing.assert_array_equal(y, x)
    assert touched >= 2  # the test saw non-zero state in both leaves' copies


def test_mfac_forgets_the_regrown_coordinates_in_its_window():
    opt = optimizers.make("mfac", window=4, momentum=0.5)
    tx = opt.as_optax({}, 10)
    params = {"w": jnp.ones(5)}
    state = tx.init(params)
    for i in range(3):
        _, state = tx.update({"w": jnp.arange(5.0) + i}, state, params)
    regrown = {"w": jnp.array([True, False, False, True, False])}
    reset = optimizers.reset_slots(opt, tx, state, regrown)
    window = reset[0]
    assert not np.asarray(window.grads)[:, [0, 3]].any()
    np.testing.assert_allclose(window.grads[:, [1, 2, 4]], state[0].grads[:, [1, 2, 4]])
    np.testing.assert_allclose(window.gram, window.grads @ window.grads.T, rtol=1e-6)
    velocity = jax.tree.leaves(reset[1])[-1]
    assert not np.asarray(velocity)[[0, 3]].any() and np.asarray(velocity)[[1, 2, 4]].all()


def test_optimizers_that_cannot_run_a_rewired_task_are_refused_with_the_way_out():
    task = _task()
    for name in ("small_fc", "adafac_mlp", "rnn_mlp", "nn_adam", "lstm_l2l", "lgl2o"):
        opt = optimizers.make(name)
        reason = inner.check(task, opt, opt.init(jax.random.key(0)), 100)
        assert name in reason and "rewire_every: 0" in reason
        with pytest.raises(SlotResetError, match="regrown"):
            optimizers.reset_slots(opt, opt.as_optax(opt.init(jax.random.key(0)), 10), None, None)
    assert "per-layer statistics" in inner.check(task, optimizers.make("kfac"), {}, 100)
    static = _task(rewire_every=0)  # static sparse training: nothing to reset
    small_fc = optimizers.make("small_fc")
    assert inner.check(static, small_fc, small_fc.init(jax.random.key(0)), 100) is None
    assert inner.check(task, optimizers.make("adam"), {}, 100) is None


def test_the_loop_rewires_between_steps_and_resets_the_regrown_state():
    opt = optimizers.make("adam", learning_rate=0.01)
    tx = opt.as_optax({}, 20)
    carries = {}
    for every in (5, 0):  # RigL after the 5th update, and the same run without it
        task = _task(rewire_every=every)
        carry = inner.init(task, tx, task.init(jax.random.key(0)))
        step = jax.jit(lambda c, k, i, task=task: inner.step(task, opt, tx, c, (k, k), i, 20))
        for i in range(5):
            carry, loss = step(carry, jax.random.key(i), jnp.int32(i))
            assert np.isfinite(loss)
        carries[every] = carry
    rewired, static = carries[5], carries[0]
    assert static[2] is None
    for name, _, _ in task.layers:
        moved = np.asarray(rewired[2][name]) != np.asarray(task.topology[name])
        assert moved.any()
        mu, mu_static = np.asarray(rewired[1][0].mu[name]["w"]), np.asarray(static[1][0].mu[name]["w"])
        assert not mu[moved].any() and mu_static[moved].any()  # reset where a new weight arrived
        np.testing.assert_array_equal(mu[~moved], mu_static[~moved])  # untouched elsewhere
        assert not np.asarray(rewired[0][name]["w"])[moved].any()
    now = inner.current(_task(rewire_every=5), rewired)
    assert now.topology is rewired[2]


@pytest.mark.slow  # default run: the training loop's rewiring, and the refusal with the way out, above
def test_evaluation_rewires_and_a_baseline_that_cannot_run_sits_the_task_out(tmp_path):
    keys = jax.random.wrap_key_data(jnp.stack([jax.random.key_data(jax.random.key(0))]))
    static = evaluation._train(_task(rewire_every=0), "adam", {"learning_rate": 0.01}, {}, 60, keys, 30)
    rewired = evaluation._train(_task(rewire_every=20), "adam", {"learning_rate": 0.01}, {}, 60, keys, 30)
    np.testing.assert_array_equal(static[0][:, :20], rewired[0][:, :20])  # the same until the first rewiring
    assert not np.array_equal(static[0][:, 20:], rewired[0][:, 20:])  # (after the 20th update)
    suite = evaluation.Suite("tiny", "", (evaluation.SuiteTask("s", TaskSpec("sparse_mlp", MLP), 30),),
                             seeds=(0,), tuning_seed=9, baselines=("adam", "kfac"), trials=1, test_points=2)
    result = evaluation.evaluate("sgd", suite, progress=False)
    task = result["tasks"][0]
    assert "per-layer statistics" in task["baselines"]["kfac"]["refused"]
    assert task["best_baseline"] == "adam" and result["aggregate"]["mean_auc"]["kfac"] is None
    evaluation.write_report(result, tmp_path)
    with pytest.raises(evaluation.EvalInputError, match="cannot train task 's'"):
        evaluation.evaluate("small_fc", suite, progress=False)


def test_meta_training_rewires_a_sparse_task_and_batches_halves_as_one_at_a_time():
    """LearnedOptimizerTraining carries the topology and step count; step_batch (the CPU path)
    gives what one half at a time gives."""
    from metaopt.workers.objective import LearnedOptimizerTraining

    task = _task(rewire_every=3)
    objective = LearnedOptimizerTraining(task, optimizers.make("nominal_mlp"), 12)
    theta = objective.init_theta(jax.random.key(0))
    thetas = jax.tree.map(lambda x: jnp.stack([x, 1.01 * x]), theta)
    states = jax.vmap(objective.init_state)(jax.random.split(jax.random.key(1), 2), thetas)
    batch, one = jax.jit(objective.step_batch), jax.jit(objective.step)
    singles = [jax.tree.map(lambda x, i=i: x[i], states) for i in range(2)]
    for t in range(4):  # the third update is followed by a rewiring
        keys = jax.random.split(jax.random.key(10 + t), 2)
        states, losses = batch(thetas, states, keys)
        for i in range(2):
            singles[i], loss = one(jax.tree.map(lambda x, i=i: x[i], thetas), singles[i], keys[i])
            np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
    assert int(states[3][0]) == 4
    for i in range(2):
        half = jax.tree.map(lambda x, i=i: x[i], states)
        for a, b in zip(jax.tree.leaves(singles[i]), jax.tree.leaves(half), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = states[2]["layer_0"][0] != task.topology["layer_0"]
    assert bool(moved.any())


def test_a_job_that_meta_trains_an_optimizer_that_cannot_reset_on_sparse_tasks_is_refused():
    from metaopt.jobspec import JobSpecError, check_runnable, parse_job_spec

    def spec(optimizer, rewire_every=100):
        return parse_job_spec({"name": "x", "optimizer": {"name": optimizer}, "tasks": [
            {"family": "sparse_mlp", "kwargs": {"widths": [32], "rewire_every": rewire_every}}]})

    with pytest.raises(JobSpecError, match="tasks.0.family: small_fc cannot reset"):
        check_runnable(spec("small_fc"))
    check_runnable(spec("small_fc", rewire_every=0))  # static sparse training
    check_runnable(spec("nominal_mlp"))


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, "sparsity must lie in"),
    ({"sparsity": -0.1}, "sparsity must lie in"),
    ({"storage": "csr"}, "storage must be one of"),
    ({"rewire_every": -1}, "rewire_every >= 0"),
    ({"drop_fraction": 1.5}, "drop_fraction"),
    ({"width": 0}, "width and depth"),
])
def test_bad_specs_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _task(**kwargs)


def test_bad_family_settings_are_refused():
    with pytest.raises(ValueError, match="sparsities"):
        task_zoo.family("sparse_mlp", sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="storage"):
        task_zoo.family("sparse_cnn", storage="csr")


def test_optax_updates_only_touch_active_weights():
    """What an optimizer sees: one value per active weight, nothing for the absent ones."""
    task = _task()
    params = task.init(jax.random.key(0))
    for name, fan_in, fan_out in task.layers:
        nnz = params[name]["w"].size
        assert nnz == task.topology[name].size < fan_in * fan_out
    grads = jax.jit(jax.grad(task.loss))(params, jax.random.key(1), task.batch(jax.random.key(2), TRAIN))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert optax.tree_utils.tree_norm(grads) > 0
