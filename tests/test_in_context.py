"""The in-context learner (GPICL, metaopt/learnables/in_context.py): its tokens, that a prediction
sees only the labelled examples before it, its generated tasks, its refusals, and a real
meta-training through the learner whose artifact classifies from context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaopt import task_zoo
from metaopt.jobspec import JobSpecError, check_runnable, parse_job_spec
from metaopt.learnables.in_context import TEST_IDS, InContextLearner, standardised
from tests.test_learnables import MLP, meta_train

SMALL = {"features": 64, "classes": 10, "context": 16, "sequences": 16, "d_model": 32, "layers": 1,
         "heads": 2}


def _digits(split: str) -> dict:
    task = task_zoo.task(task_zoo.family("mlp", **MLP["kwargs"]).sample(jax.random.key(0)))
    return standardised(task.full(split))


def test_each_token_is_its_query_and_the_labelled_example_before_it():
    learner = InContextLearner(features=3, classes=4)
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    y = np.array([[0, 3, 1, 2, 2], [1, 1, 0, 3, 0]])
    tokens = np.asarray(learner.tokens(jnp.asarray(x), jnp.asarray(y)))
    assert tokens.shape == (2, 5, 3 + 3 + 4 + 1)
    for b in range(2):
        for t in range(5):
            first = (np.zeros(3), np.zeros(4), [0.0])
            previous = (x[b, t - 1], np.eye(4)[y[b, t - 1]], [1.0]) if t else first
            np.testing.assert_array_equal(tokens[b, t], np.concatenate([x[b, t], *previous]))


def test_a_prediction_sees_only_the_labelled_examples_before_it():
    learner = InContextLearner(**SMALL)
    theta = jax.jit(jax.tree.map, static_argnums=0)(  # a head that is not zero
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape),
        learner.init_theta(jax.random.key(0)))
    x, y = jax.jit(learner.sequence, static_argnums=3)(_digits("train"), 3, jax.random.key(2), 12)
    run = jax.jit(lambda x, y: learner.logits(theta, learner.tokens(x[None], y[None]))[0])
    logits = run(x, y)
    t = 6  # its own label and everything after it changed: positions up to t predict the same
    x2 = x.at[t + 1:].set(jax.random.normal(jax.random.key(3), x[t + 1:].shape))
    y2 = y.at[t:].set((y[t:] + 1) % 10)
    changed = run(x2, y2)
    np.testing.assert_allclose(changed[: t + 1], logits[: t + 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed[t + 1:], logits[t + 1:])
    # as_classifier(context, queries) predicts each query as the position after the context does
    predict = learner.as_classifier(theta)
    np.testing.assert_allclose(predict(x[:t], y[:t], x[t:t + 1])[0], logits[t], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="this learner takes 64 input features"):
        predict(x[:t, :10], y[:t], x[t:t + 1, :10])


def test_a_generated_task_is_a_fixed_projection_and_label_permutation_of_its_id():
    learner, data = InContextLearner(**SMALL), _digits("test")
    key = jax.random.key(5)
    x, y = learner.sequence(data, jnp.int32(TEST_IDS + 1), key, 40)
    again_x, again_y = learner.sequence(data, jnp.int32(TEST_IDS + 1), key, 40)
    other_x, other_y = learner.sequence(data, jnp.int32(7), key, 40)
    np.testing.assert_array_equal(x, again_x) and np.testing.assert_array_equal(y, again_y)
    idx = jax.random.choice(key, data["y"].shape[0], (40,), replace=False)  # the same examples...
    base = np.asarray(data["y"][idx])
    for labels in (np.asarray(y), np.asarray(other_y)):  # ...their labels under a bijection
        mapping = {}
        for before, after in zip(base, labels, strict=True):
            assert mapping.setdefault(before, after) == after
        assert len(set(mapping.values())) == len(mapping)
    # a projection: the task's inputs are the examples times one matrix, another for another id
    a, *_ = np.linalg.lstsq(np.asarray(data["x"][idx]), np.asarray(x), rcond=None)
    np.testing.assert_allclose(np.asarray(data["x"][idx]) @ a, x, atol=1e-4)
    assert not np.allclose(x, other_x)


def test_tasks_without_their_data_or_of_another_shape_are_refused_before_anything_starts():
    spec = parse_job_spec({"name": "x", "tasks": [MLP, {"family": "quadratic"}],
                           "meta_objective": {"name": "in_context_learner"}})
    with pytest.raises(JobSpecError, match=r"tasks.1.family: meta_objective 'in_context_learner' needs "
                                           r"tasks that give \['full', 'num_classes'\], which family "
                                           r"'quadratic' does not"):
        check_runnable(spec)
    spec = parse_job_spec({"name": "x", "tasks": [MLP],
                           "meta_objective": {"name": "in_context_learner", "hparams": {"features": 32}}})
    with pytest.raises(JobSpecError, match="has features=32, classes=10, but the task has 64 features"):
        check_runnable(spec)


def test_metaopt_train_says_how_to_use_what_it_trained():
    from metaopt.cli import _use_of

    learner = parse_job_spec({"name": "x", "tasks": [MLP], "meta_objective": {"name": "in_context_learner"}})
    assert _use_of(learner) == ("classifier", "as_classifier()")
    assert _use_of(parse_job_spec({"name": "x", "tasks": [MLP]})) == ("optimizer", "as_optax(num_steps=1000)")


def _one_task_spec(outer_steps: int) -> dict:
    return {"name": "icl", "seed": 0, "tasks": [MLP],
            "meta_objective": {"name": "in_context_learner", "hparams": {**SMALL, "num_tasks": 1}},
            "estimator": {"kind": "tbptt", "num_particles": 1, "truncation_length": 1, "inner_horizon": 100,
                          "loss_normalization": "none"},
            "outer": {"learning_rate": 0.003, "meta_batch_size": 2}, "workers": {"count": 2},
            "stop": {"max_outer_steps": outer_steps}}


@pytest.mark.slow
def test_metaopt_train_meta_trains_it_by_backprop_and_publishes_a_classifier(tmp_path):
    """The short half of the run below: `metaopt train` (learner, Ray workers computing the
    meta-gradient by TBPTT) for 5 outer steps publishes a classifier that labels queries from
    context, and refuses to be an optimizer. (Slow for make test's time: `metaopt train` with Ray
    workers is tested fast on optimizers, and what it does with this objective is above.)"""
    trained, summary = meta_train(tmp_path, _one_task_spec(5))
    assert trained.kind == "classifier" and trained.optimizer_name == "in_context_learner"
    assert summary["outer_steps"] == 5
    assert np.isfinite([summary["meta_loss_first"], summary["meta_loss_last"]]).all()
    x, y = InContextLearner(**SMALL).sequence(_digits("test"), 0, jax.random.key(0), 32)
    assert trained.as_classifier()(x[:16], y[:16], x[16:]).shape == (16, 10)
    with pytest.raises(AttributeError, match=r"icl:1 holds a classifier \(in_context_learner\)"):
        trained.as_optax(num_steps=100)


@pytest.mark.slow
def test_a_learner_meta_trained_on_one_task_memorises_it_and_its_artifact_is_a_classifier(tmp_path):
    """`metaopt train` (learner, Ray workers computing the meta-gradient by backprop) on a single
    generated task: its meta-loss falls from chance (ln 10) and the published classifier, with
    16 examples in context, labels that task's *test* images well (128 sequences × 16 queries,
    at least 50% against 10% chance) and tasks it never saw at chance (below 25%): with one
    training task it memorises, as GPICL finds."""
    trained, summary = meta_train(tmp_path, _one_task_spec(100))
    assert trained.kind == "classifier" and trained.optimizer_name == "in_context_learner"
    assert summary["meta_loss_first"] > 2.0 and summary["meta_loss_last"] < 1.0, summary
    learner, data, predict = InContextLearner(**SMALL), _digits("test"), trained.as_classifier()

    def accuracy(task_ids) -> float:
        keys = jax.random.split(jax.random.key(9), len(task_ids))
        x, y = jax.vmap(lambda i, k: learner.sequence(data, i, k, 32))(jnp.asarray(task_ids), keys)
        logits = jax.vmap(predict)(x[:, :16], y[:, :16], x[:, 16:])
        return float((logits.argmax(-1) == y[:, 16:]).mean())

    assert accuracy(np.zeros(128, np.int32)) > 0.5
    assert accuracy(TEST_IDS + np.arange(128)) < 0.25
    with pytest.raises(AttributeError, match=r"icl:1 holds a classifier \(in_context_learner\), "
                                             r"which offers \['as_classifier'\]"):
        trained.as_optax(num_steps=100)
