"""Meta-learning more than optimizers: a job's `meta_objective` (metaopt/learnables.py), here
Adam's learned learning-rate schedule, meta-trained by the learner and Ray workers, published as
an artifact of kind "schedule" and used as one; plugins of the kind by import path."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch  # noqa: F401  (metaopt.torch below needs it; imported first, as a user would)
import yaml

import metaopt.torch
from metaopt import evaluation, learnables, registry, task_zoo
from metaopt.jobspec import JobSpecError, OptimizerSpec, check_runnable, load_job_spec, parse_job_spec
from metaopt.learnables import AdamSchedule, LearnedLoss
from metaopt.workers.estimators import make_estimator
from tests.jsonout import last_json

MLP = {"family": "mlp",
       "kwargs": {"widths": [32], "depths": [1], "activations": ["relu"], "batch_sizes": [64]}}


def test_the_schedule_interpolates_log_rates_between_its_knots():
    """exp of the piecewise-linear log-rate through the knots, spread over steps 0..num_steps-1
    (NumPy's interp as the truth), flat beyond the run."""
    schedule = AdamSchedule(knots=5)
    theta = {"log_lr": jnp.log(jnp.asarray([1e-3, 1e-2, 3e-3, 1e-4, 5e-4], jnp.float32))}
    lr = schedule.as_schedule(theta, num_steps=101)
    counts = np.array([0, 10, 25, 40, 50, 99, 100, 150])
    knots = np.asarray(theta["log_lr"])
    expected = np.exp(np.interp(np.minimum(counts / 100, 1.0), np.linspace(0, 1, 5), knots))
    np.testing.assert_allclose([float(lr(c)) for c in counts], expected, rtol=1e-5)
    assert np.allclose(np.exp(schedule.init_theta(None)["log_lr"]), 1e-3)


def test_its_objective_trains_as_optax_adam_under_the_same_schedule():
    """The meta-objective's steps are optax.adam's under the schedule, loss for loss, with the
    estimators' keys (data key of step t = fold_in(episode key, t + 1), split into batch, loss)."""
    schedule = AdamSchedule(knots=3, init_lr=3e-3)
    theta = {"log_lr": jnp.log(jnp.asarray([3e-3, 1e-2, 1e-3], jnp.float32))}
    task = task_zoo.task(task_zoo.family("mlp", **MLP["kwargs"]).sample(jax.random.key(0)))
    objective = schedule.objective(task, num_steps=20)
    episode = jax.random.key(5)
    state, losses = objective.init_state(episode, theta), []
    for t in range(20):
        state, loss = objective.step(theta, state, jax.random.fold_in(episode, t + 1))
        losses.append(float(loss))

    tx = optax.adam(lambda c: schedule.as_schedule(theta, 20)(c))
    params = task.init(jax.random.fold_in(episode, 0))
    opt_state, expected = tx.init(params), []
    for t in range(20):
        batch_key, loss_key = jax.random.split(jax.random.fold_in(episode, t + 1))
        loss, grads = jax.value_and_grad(task.loss)(params, loss_key, task.batch(batch_key, "train"))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        expected.append(float(loss))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_with_weight_decay_it_is_adamw_under_both_schedules_and_can_take_a_held_out_loss():
    """weight_decay > 0: θ gains log_wd knots and the steps are optax's own AdamW with both
    schedules injected (optax.inject_hyperparams, another code path), update for update; with
    held_out the loss of a step is the task's on a test batch after it."""
    schedule = AdamSchedule(knots=3, init_lr=3e-3, weight_decay=0.1, held_out=True)
    theta = {"log_lr": jnp.log(jnp.asarray([3e-3, 1e-2, 1e-3])),
             "log_wd": jnp.log(jnp.asarray([0.5, 0.05, 2.0]))}
    assert set(schedule.init_theta(None)) == {"log_lr", "log_wd"}
    np.testing.assert_allclose(np.exp(schedule.init_theta(None)["log_wd"]), 0.1, rtol=1e-6)
    task = task_zoo.task(task_zoo.family("mlp", **MLP["kwargs"]).sample(jax.random.key(0)))
    objective = schedule.objective(task, num_steps=12)
    episode = jax.random.key(5)
    state = objective.init_state(episode, theta)
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule.as_schedule(theta, 12),
                                               weight_decay=schedule.as_weight_decay_schedule(theta, 12))
    params = task.init(jax.random.fold_in(episode, 0))
    opt_state = tx.init(params)
    for t in range(12):
        state, loss = objective.step(theta, state, jax.random.fold_in(episode, t + 1))
        batch_key, loss_key = jax.random.split(jax.random.fold_in(episode, t + 1))
        grads = jax.grad(task.loss)(params, loss_key, task.batch(batch_key, "train"))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state[0], params)
        held_out = task.loss(params, loss_key, task.batch(batch_key, "test"))
        np.testing.assert_allclose(float(loss), float(held_out), rtol=1e-5)
    with pytest.raises(ValueError, match="learned no weight decay"):
        AdamSchedule().as_weight_decay_schedule(AdamSchedule().init_theta(None), 10)


def test_pes_estimates_the_schedule_s_gradient():
    """PES on the schedule objective: a finite estimate of θ's size, and rates too small (1e-5,
    on an MLP Adam trains at 1e-3) are pushed up: the estimate is negative at every knot but the
    last, whose rate acts on no step of the truncations unrolled."""
    schedule = AdamSchedule(knots=4, init_lr=1e-5)
    task = task_zoo.task(task_zoo.family("mlp", **MLP["kwargs"]).sample(jax.random.key(1)))
    objective = schedule.objective(task, num_steps=40)
    estimator = make_estimator("pes", num_particles=32, truncation_length=10, inner_horizon=40,
                               sigma=0.1, loss_normalization="log")
    theta = schedule.init_theta(None)
    state, total = estimator.init(jax.random.key(0), theta, objective), 0
    for j in range(3):
        state, grad, _ = estimator.estimate(jax.random.key(j + 1), theta, state, objective)
        total = total + np.asarray(grad)
    assert total.shape == (4,) and np.all(np.isfinite(total))
    assert np.all(total[:3] < 0), total


@pytest.mark.parametrize(("changes", "message"), [
    ({"meta_objective": {"name": "adam_schedule"}, "optimizer": {"name": "nominal_mlp"}},
     "meta-learns its optimizer or its meta_objective, not both"),
    ({"meta_objective": {"name": "adam_schedule"}, "eval": {"suite": "smoke"}}, "in-run evaluation"),
    ({"meta_objective": {"name": "no_such_thing"}},
     r"unknown meta-objective 'no_such_thing'; built-in: \['adam_schedule', 'in_context_learner', "
     r"'learned_loss'\]"),
    ({"meta_objective": {"name": "adam_schedule", "hparams": {"knotz": 3}}},
     r"unknown hyperparameter\(s\) \['knotz'\]"),
    ({"meta_objective": {"name": "adam_schedule", "hparams": {"weight_decay": -0.1}}},
     r"weight_decay >= 0, got knots=8, init_lr=0.001, weight_decay=-0.1"),
    ({"meta_objective": {"name": "in_context_learner", "hparams": {"d_model": 30}}},
     r"d_model \(30\) must be a multiple of heads \(4\)"),
    ({"meta_objective": {"name": "in_context_learner", "hparams": {"num_tasks": 2**30}}},
     r"ids from 1073741824 on are meta-test tasks"),
    ({"meta_objective": {"name": "in_context_learner", "hparams": {"context": 0}}},
     r"sizes must be positive integers"),
])
def test_a_wrong_meta_objective_is_refused_with_what_to_do(changes, message):
    with pytest.raises(JobSpecError, match=message):
        parse_job_spec({"name": "x", "tasks": [MLP], **changes})


@pytest.mark.slow
def test_a_meta_trained_schedule_beats_its_start_and_its_artifact_is_a_schedule(tmp_path):
    """`metaopt train` (learner, Ray workers) on a schedule that starts 30x too small for the
    MLPs of the mix; then, on 3 MLPs of the family it never trained on (other seeds), Adam under
    the published schedule ends lower than under the starting one, each of the 3. Slow (~25 s,
    mostly Ray's start): in `make test`, the learned loss's run below takes a learnable through
    the service, PES's schedule gradient is checked above, and a published schedule's uses and
    refusals below."""
    spec = {"name": "sched", "seed": 0, "tasks": [MLP],
            "meta_objective": {"name": "adam_schedule", "hparams": {"knots": 4, "init_lr": 3e-5}},
            "estimator": {"num_particles": 4, "truncation_length": 20, "inner_horizon": 100,
                          "loss_normalization": "log"},
            "outer": {"learning_rate": 0.05, "meta_batch_size": 4}, "workers": {"count": 2},
            "stop": {"max_outer_steps": 25}}
    trained, summary = meta_train(tmp_path, spec)
    assert trained.kind == "schedule" and trained.optimizer_name == "adam_schedule"
    manifest = json.loads((tmp_path / "out/registry/sched/1/manifest.json").read_text())
    assert manifest["kind"] == "schedule" and manifest["learned"]["hparams"]["knots"] == 4

    start = AdamSchedule(knots=4, init_lr=3e-5)
    family = task_zoo.family("mlp", **MLP["kwargs"])
    for seed in range(100, 103):
        task = task_zoo.task(family.sample(jax.random.key(seed)))
        final = {"trained": _final_loss(task, trained.as_optax(num_steps=100)),
                 "start": _final_loss(task, start.as_optax(start.init_theta(None), 100))}
        assert final["trained"] < final["start"], (seed, final, np.exp(trained.theta["log_lr"]))
    assert summary["artifact"].startswith("sched:")


def meta_train(folder, spec: dict):
    """`metaopt train` of `spec` in `folder`, as a user runs it: (its artifact loaded, its summary)."""
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "metaopt.cli", "train", "job.yaml", "--out", "out", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    return metaopt.load(summary["artifact"], registry=summary["registry"]), summary


def _final_loss(task, tx, steps: int = 100) -> float:
    params = task.init(jax.random.key(0))
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        batch_key, loss_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(task.loss)(params, loss_key, task.batch(batch_key, "train"))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        params, state = step(params, state, jax.random.key(t))
    return float(task.loss(params, jax.random.key(0), task.batch(jax.random.key(0), "test")))


def test_a_published_schedule_is_a_schedule_and_refuses_the_uses_of_other_kinds(tmp_path):
    start = AdamSchedule(knots=4, init_lr=3e-5)
    ref = registry.publish(str(tmp_path), "sched", "adam_schedule", {"knots": 4, "init_lr": 3e-5},
                           start.init_theta(None), {"note": "test"}, kind="schedule")
    trained = registry.load(ref, str(tmp_path))
    assert trained.kind == "schedule" and trained.optimizer_name == "adam_schedule"
    np.testing.assert_allclose(trained.as_schedule(num_steps=100)(50), 3e-5, rtol=1e-5)
    with pytest.raises(AttributeError, match=r"sched:1 holds a schedule \(adam_schedule\), which offers "
                                             r"\['as_optax', 'as_schedule', 'as_weight_decay_schedule'\], "
                                             r"not .as_loss"):
        trained.as_loss()
    with pytest.raises(NotImplementedError, match="holds a schedule .* runs learned optimizers only"):
        metaopt.torch.from_trained(trained, [torch.zeros(3, requires_grad=True)], num_steps=10)
    with pytest.raises(evaluation.EvalInputError, match="`metaopt eval` evaluates optimizers"):
        evaluation.resolve_ref(ref, str(tmp_path))


def test_an_optimizer_artifact_refuses_the_uses_of_other_kinds(tmp_path):
    ref = registry.publish(str(tmp_path), "opt", "adam", {}, {}, {"note": "test"})
    trained = registry.load(ref, str(tmp_path))
    assert trained.kind == "optimizer"
    with pytest.raises(AttributeError, match=r"opt:1 holds an optimizer \(adam\): use .as_optax"):
        trained.as_schedule(num_steps=10)


PLUGIN = '''
import dataclasses
import jax.numpy as jnp
from metaopt.learnables import AdamSchedule, LearnedLoss


@dataclasses.dataclass(frozen=True)
class TwoPhase(AdamSchedule):
    """A user's own schedule: two knots."""
    knots: int = 2
    name = "two_phase"
'''


def test_a_plugin_meta_objective_by_import_path(tmp_path, monkeypatch):
    """Checked on a tiny sample before a job starts, recorded in its artifact by import path and
    source sha256, and needed to use the artifact."""
    (tmp_path / "my_objectives.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "broken_objectives.py").write_text(
        "from metaopt.learnables import AdamSchedule\n\nclass Broken(AdamSchedule):\n"
        "    def objective(self, task, num_steps):\n        raise RuntimeError('no objective here')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_job_spec({"name": "x", "tasks": [MLP],
                           "meta_objective": {"name": "my_objectives:TwoPhase"}})
    assert spec.plugins == ["my_objectives:TwoPhase"]
    check_runnable(spec)
    broken = parse_job_spec({"name": "x", "tasks": [MLP],
                             "meta_objective": {"name": "broken_objectives:Broken"}})
    with pytest.raises(JobSpecError, match=r"meta_objective.name: meta-objective 'broken_objectives:Broken': "
                                           r"objective\(task, num_steps\) .* RuntimeError: no objective"):
        check_runnable(broken)

    learnable = learnables.make("my_objectives:TwoPhase")  # as the learner publishes it
    assert learnable.name == "my_objectives:TwoPhase" and learnable.kind == "schedule"
    ref = registry.publish(str(tmp_path / "reg"), "two", learnable.name, learnable.hparams,
                           learnable.init_theta(None), {}, kind=learnable.kind)
    trained = registry.load(ref, str(tmp_path / "reg"))
    assert trained.manifest["learned"]["plugin"]["import_path"] == "my_objectives:TwoPhase"
    assert float(trained.as_schedule(num_steps=10)(5)) == pytest.approx(1e-3)
    with pytest.raises(AttributeError, match=r"offers \['as_optax', 'as_schedule', "
                                                 r"'as_weight_decay_schedule'\], not .as_loss"):
        trained.as_loss()


@pytest.mark.parametrize(("example", "name"), [
    ("adam_schedule", "adam_schedule"), ("adamw_schedule", "adam_schedule"), ("learned_loss", "learned_loss"),
    ("in_context_learner", "in_context_learner")])
def test_the_example_job_specs_meta_learn_what_they_say(example, name):
    spec = load_job_spec(pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{example}.yaml")
    assert spec.meta_objective.name == name and spec.optimizer == OptimizerSpec()


def _numpy_loss(theta, logits, labels):
    """L_θ in float64 NumPy: cross-entropy plus Σ_c w1·tanh(W0ᵀ(p_c, y_c) + b0) + b1."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    onehot = np.eye(logits.shape[1])[labels]
    pairs = np.stack([np.exp(log_p), onehot], -1)
    t = {k: np.asarray(v, np.float64) for k, v in theta.items()}
    correction = np.tanh(pairs @ t["w0"] + t["b0"]) @ t["w1"] + t["b1"]
    return np.mean(-(log_p * onehot).sum(1) + correction.sum(1))


def test_the_learned_loss_is_cross_entropy_until_trained_and_its_correction_as_written():
    learned = LearnedLoss(hidden=4)
    logits = jax.random.normal(jax.random.key(0), (16, 10)) * 3
    labels = jax.random.randint(jax.random.key(1), (16,), 0, 10)
    untrained = learned.init_theta(jax.random.key(2))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert float(learned.as_loss(untrained)(logits, labels)) == pytest.approx(float(ce), rel=1e-6)
    theta = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), untrained)
    np.testing.assert_allclose(float(learned.as_loss(theta)(logits, labels)),
                               _numpy_loss(theta, logits, np.asarray(labels)), rtol=1e-5)


def test_a_learned_loss_needs_tasks_that_give_logits_and_says_so():
    spec = parse_job_spec({"name": "x", "tasks": [MLP, {"family": "quadratic"}],
                           "meta_objective": {"name": "learned_loss"}})
    with pytest.raises(JobSpecError, match=r"tasks.1.family: meta_objective 'learned_loss' needs tasks that "
                                           r"give \['logits'\], which family 'quadratic' does not"):
        check_runnable(spec)


def test_a_published_loss_is_a_loss_and_refuses_the_uses_of_other_kinds(tmp_path):
    """The fast half of the slow service run below: the artifact of kind "loss" round-trips and
    computes what its θ says; the uses of other kinds are refused by name."""
    start = LearnedLoss()
    theta = jax.tree.map(lambda x: x + 0.01, start.init_theta(jax.random.key(0)))
    ref = registry.publish(str(tmp_path), "loss", "learned_loss", {}, theta, {"note": "test"}, kind="loss")
    trained = registry.load(ref, str(tmp_path))
    assert trained.kind == "loss" and trained.optimizer_name == "learned_loss"
    logits, labels = jax.random.normal(jax.random.key(1), (5, 10)), jnp.arange(5)
    want = start.as_loss(theta)(logits, labels)
    np.testing.assert_allclose(trained.as_loss()(logits, labels), want, rtol=1e-6)
    with pytest.raises(AttributeError, match=r"loss:1 holds a loss \(learned_loss\), which offers "):
        trained.as_optax(num_steps=100)


@pytest.mark.slow
def test_a_meta_trained_loss_trains_models_that_generalise_better_and_its_artifact_is_a_loss(tmp_path):
    """`metaopt train` (learner, Ray workers) meta-trains the loss for 40 outer steps, its
    meta-loss the held-out cross-entropy along 100-step runs; then on 3 MLPs of the family it
    never trained on, Adam on the learned loss ends with a lower held-out cross-entropy (on the
    whole test split) than Adam on cross-entropy, each of the 3."""
    spec = {"name": "loss", "seed": 0, "tasks": [MLP], "meta_objective": {"name": "learned_loss"},
            "estimator": {"num_particles": 4, "truncation_length": 20, "inner_horizon": 100,
                          "sigma": 0.05, "loss_normalization": "none"},
            "outer": {"learning_rate": 0.03, "meta_batch_size": 4}, "workers": {"count": 2},
            "stop": {"max_outer_steps": 40}}
    trained, _ = meta_train(tmp_path, spec)
    assert trained.kind == "loss"
    cross_entropy = LearnedLoss().as_loss(LearnedLoss().init_theta(jax.random.key(0)))
    family = task_zoo.family("mlp", **MLP["kwargs"])
    for seed in range(100, 103):
        task = task_zoo.task(family.sample(jax.random.key(seed)))
        held_out = {"learned": _held_out_ce(task, trained.as_loss()),
                    "cross-entropy": _held_out_ce(task, cross_entropy)}
        assert held_out["learned"] < held_out["cross-entropy"], (seed, held_out)
    with pytest.raises(AttributeError, match=r"loss:1 holds a loss \(learned_loss\), which offers "):
        trained.as_optax(num_steps=100)


def _held_out_ce(task, loss, steps: int = 100) -> float:
    params, tx = task.init(jax.random.key(0)), optax.adam(1e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        batch = task.batch(key, "train")
        grads = jax.grad(lambda p: loss(task.logits(p, batch["x"]), batch["y"]))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        params, state = step(params, state, jax.random.key(t))
    full = task.full("test")
    logits = task.logits(params, full["x"])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, full["y"]).mean())
