"""The long_horizon, shifted and hand_designed evaluation suites: what they hold, that every task
builds and trains, and that their tasks lie outside the meta-training mix."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import pytest

from metaopt import evaluation, optimizers, task_zoo

# The meta-training mix the evaluation suites are kept apart from: MLP classifiers on 8x8
# digits of these depths, widths and activations (less two shapes that out_of_distribution
# holds out), and noisy quadratics of these dimensions.
MIX_MLP_DEPTHS, MIX_MLP_WIDTHS, MIX_ACTIVATIONS = range(1, 4), range(16, 129), {"relu", "tanh", "gelu"}
MIX_HELD_OUT = {(4, 64, "tanh"), (3, 128, "gelu")}  # (depth, width, activation)
MIX_QUADRATIC_DIMS = range(8, 33)
ROOT = pathlib.Path(__file__).resolve().parents[1]
EVALUATION_SUITES = ("in_distribution", "out_of_distribution", "long_horizon", "shifted", "hand_designed")


def in_meta_training_mix(spec: task_zoo.TaskSpec) -> bool:
    kw = spec.kwargs
    if spec.name == "quadratic":
        return kw["dim"] in MIX_QUADRATIC_DIMS
    if spec.name == "mlp":
        shape = (kw["depth"], kw["width"], kw["activation"])
        return (kw.get("dataset", "digits") == "digits" and kw["depth"] in MIX_MLP_DEPTHS
                and kw["width"] in MIX_MLP_WIDTHS and kw["activation"] in MIX_ACTIVATIONS
                and shape not in MIX_HELD_OUT)
    return False


def test_the_mix_predicate_knows_the_mix():
    mlp = {"width": 32, "depth": 1, "activation": "relu", "batch_size": 64, "seed": 0}
    assert in_meta_training_mix(task_zoo.TaskSpec("mlp", mlp))
    assert in_meta_training_mix(task_zoo.TaskSpec("quadratic", {"dim": 16}))
    for suite in ("in_distribution", "smoke"):
        assert all(in_meta_training_mix(t.spec) for t in evaluation.load_suite(suite).tasks), suite
    ood = evaluation.load_suite("out_of_distribution")
    assert not any(in_meta_training_mix(t.spec) for t in ood.tasks)  # 4x64 tanh, 3x128 gelu held out


def test_long_horizon_is_out_of_distributions_networks_at_5000_steps():
    long, ood = evaluation.load_suite("long_horizon"), evaluation.load_suite("out_of_distribution")
    names = ["mlp_wide_256", "mlp_deep_4x64_tanh", "mlp_wide_deep_3x128_gelu", "cnn_16x2"]
    assert [t.name for t in long.tasks] == names
    same = {t.name: t.spec for t in ood.tasks}
    assert all(t.spec == same[t.name] and t.steps == 5000 for t in long.tasks)
    assert (long.seeds, long.tuning_seed, long.baselines, long.trials) == ((0, 1, 2), 1000, ("adam",), 16)


def test_shifted_lies_outside_the_meta_training_mix():
    shifted = evaluation.load_suite("shifted")
    assert len(shifted.tasks) >= 6 and all(t.steps == 1000 for t in shifted.tasks)
    assert (shifted.seeds, shifted.baselines, shifted.trials) == ((0, 1, 2), ("adam",), 16)
    specs = {t.name: t.spec for t in shifted.tasks}
    assert not [n for n, s in specs.items() if in_meta_training_mix(s)]
    families = {s.name for s in specs.values()}
    assert {"mlp", "autoencoder", "logistic", "least_squares"} <= families and "quadratic" not in families
    mlps = [s.kwargs for s in specs.values() if s.name == "mlp"]
    assert any(k["depth"] >= 6 and k["width"] in (32, 64) for k in mlps)
    assert any(k["depth"] == 1 and k["width"] == 512 for k in mlps)
    (lsq,) = [s for s in specs.values() if s.name == "least_squares"]
    assert 10 ** lsq.kwargs["log10_condition"] > 1e3
    lms = [s for s in specs.values() if s.name in ("transformer_lm", "lstm_lm")]
    assert lms and all(s.kwargs["corpus"] == "pydoc" for s in lms)
    assert {s.kwargs["dataset"] for s in specs.values() if s.name == "logistic"} <= {"breast_cancer", "wine"}
    header = evaluation.SUITES_DIR.joinpath("shifted.yaml").read_text().split("\nname:")[0]
    assert all(f"# - {name}:" in header for name in specs)  # one reason per task


_init = jax.jit(lambda task, key: task.init(key))


@jax.jit
def _sgd_step(task, params, key):
    """(train loss, whether every gradient entry is finite, test loss, params after one SGD step)."""
    loss, grads = jax.value_and_grad(task.loss)(params, key, task.batch(key, task_zoo.TRAIN))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    test = task.loss(params, key, task.batch(key, task_zoo.TEST))
    return loss, finite, test, jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)


@pytest.mark.parametrize("suite", ["long_horizon", "shifted",
                                   pytest.param("hand_designed", marks=pytest.mark.slow)])  # 20 s; built fast
def test_every_task_builds_and_trains_a_few_steps(suite):
    # one compile of one step per task (a scan of steps, or steps unrolled, compiles slower)
    for t in evaluation.load_suite(suite).tasks:
        task = task_zoo.task(t.spec)
        params = _init(task, jax.random.key(0))
        for i in range(3):
            loss, finite, test, params = _sgd_step(task, params, jax.random.key(i))
            assert bool(jnp.isfinite(loss)) and bool(finite) and bool(jnp.isfinite(test)), (t.name, i)


@pytest.mark.parametrize("recipe_file", sorted(p.name for p in (ROOT / "examples").glob("nominal_mix*.yaml")))
def test_the_reference_recipe_never_trains_on_an_evaluation_suites_tasks(recipe_file):
    """Every reference recipe (examples/nominal_mix*.yaml, v2 on) against every held-out suite: no
    task of out_of_distribution, long_horizon or shifted can be drawn from their mix."""
    import itertools

    from metaopt.jobspec import load_job_spec

    recipe = load_job_spec(ROOT / "examples" / recipe_file)
    mix = {t.family: t.kwargs for t in recipe.tasks}
    assert set(mix) == {"mlp", "quadratic"}
    mlp = mix["mlp"]
    drawable = set(itertools.product(mlp["depths"], mlp["widths"], mlp["activations"]))
    for name in ("out_of_distribution", "long_horizon", "shifted"):
        for task in evaluation.load_suite(name).tasks:
            kw = task.spec.kwargs
            if task.spec.name == "mlp":
                assert (kw["depth"], kw["width"], kw["activation"]) not in drawable, (name, task.name)
            else:
                assert task.spec.name not in mix, (name, task.name)


def test_the_design_validation_suite_lies_outside_the_mix_and_every_evaluation_suite():
    """Hyperparameters of the reference design are chosen on examples/suites/design_validation.yaml,
    so none of its problems may be a meta-training problem or an evaluation suite's problem: no
    shared architecture (whatever the seed or batch size), no shared text corpus or table."""
    val = evaluation.load_suite(ROOT / "examples" / "suites" / "design_validation.yaml")
    assert len(val.tasks) >= 6 and not [t.name for t in val.tasks if in_meta_training_mix(t.spec)]

    def problem(spec):
        kwargs = {k: v for k, v in spec.kwargs.items() if k not in ("seed", "batch_size")}
        return spec.name, tuple(sorted(kwargs.items()))

    held_out = [t.spec for s in EVALUATION_SUITES for t in evaluation.load_suite(s).tasks]
    assert not {problem(s) for s in held_out} & {problem(t.spec) for t in val.tasks}
    data = {s.kwargs.get("corpus", s.kwargs.get("dataset")) for s in held_out} - {None, "digits"}
    assert data and not data & {t.spec.kwargs.get("corpus", t.spec.kwargs.get("dataset")) for t in val.tasks}


def test_hand_designed_runs_every_tunable_hand_designed_optimizer_on_the_new_families():
    """A hand-designed optimizer added to the zoo with a search space must join the suite."""
    suite = evaluation.load_suite("hand_designed")
    hand = [n for n in optimizers.names()
            if not optimizers.make(n).learned and getattr(optimizers.make(n), "search_space", None)]
    assert sorted(suite.baselines) == sorted(hand) and len(hand) >= 11
    assert all(task_zoo.task(t.spec) for t in suite.tasks)  # every task builds (trained in the slow test)
    families = {t.spec.name for t in suite.tasks}
    assert {"sparse_mlp", "sparse_cnn", "epinet", "cnn", "transformer_lm"} <= families
    assert not [t.name for t in suite.tasks if in_meta_training_mix(t.spec)]
    assert suite.tuning_seed not in suite.seeds and len(suite.seeds) >= 3
