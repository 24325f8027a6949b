"""metaopt.evaluation and `metaopt eval`: suites, tuned baselines, metrics, reports."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from typer.testing import CliRunner

from metaopt import evaluation, optimizers, registry, task_zoo
from metaopt.cli import app
from tests.jsonout import last_json

TASK_KEYS = {"name", "spec", "steps", "best_baseline", "target_loss", "final_loss_ratio", "test_loss_ratio",
             "capped", "win", "ref", "baselines", "elapsed_s"}
RUN_KEYS = {"final_train_loss", "final_test_loss", "auc", "diverged_seeds", "per_seed", "curve", "test_curve",
            "steps_to_reach"}
FAKE = "test_fake_nan_on_one_seed"
AGGREGATE_KEYS = {"num_tasks", "wins", "win_rate", "reached_tasks", "reached_fraction", "geomean_speedup",
                  "geomean_final_loss_ratio", "geomean_test_loss_ratio", "diverged_ratio_cap", "capped_tasks",
                  "mean_auc", "diverged_runs"}


@pytest.fixture(scope="module")
def smoke():
    return evaluation.load_suite("smoke")


@pytest.fixture(scope="module")
def momentum_result(smoke):
    return evaluation.evaluate("momentum", smoke, progress=False)


@pytest.fixture(scope="module")
def baseline_cache(tmp_path_factory):
    """A tuned-baselines folder the tests of this module share."""
    return tmp_path_factory.mktemp("baselines")


@pytest.fixture(scope="module")
def learned_registry(tmp_path_factory):
    reg = str(tmp_path_factory.mktemp("registry"))
    opt = optimizers.make("small_fc")
    theta = jax.tree.map(np.asarray, opt.init(jax.random.key(0)))
    ref = registry.publish(reg, "small-fc-init", "small_fc", opt.hparams, theta, {"test": True})
    return reg, ref


def test_shipped_suites_load_and_are_what_they_say():
    assert {"smoke", "in_distribution", "out_of_distribution", "long_horizon", "shifted"} <= set(
        evaluation.suite_names())  # the last two: tests/test_suites.py
    smoke = evaluation.load_suite("smoke")
    assert 2 <= len(smoke.tasks) <= 3 and all(t.steps <= 200 for t in smoke.tasks) and len(smoke.seeds) == 1
    ind = evaluation.load_suite("in_distribution")
    assert len(ind.tasks) == 8 and len(ind.seeds) == 3 and all(t.steps == 1000 for t in ind.tasks)
    assert {t.spec.name for t in ind.tasks} == {"quadratic", "mlp"}
    ood = evaluation.load_suite("out_of_distribution")
    assert {"mlp", "cnn"} <= {t.spec.name for t in ood.tasks}
    assert {"transformer_lm", "lstm_lm"} & {t.spec.name for t in ood.tasks}
    for suite in (smoke, ind, ood):
        assert suite.tuning_seed not in suite.seeds and suite.baselines == ("adam",)


def test_suite_errors_are_clear(tmp_path):
    with pytest.raises(evaluation.EvalInputError, match=r"unknown suite 'nope'.*smoke"):
        evaluation.load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nseeds: [0, 1]\ntuning_seed: 1\nbaselines: [small_fc]\nbogus: 1\n"
        "tasks:\n  - {spec: {name: nofamily, kwargs: {}}, steps: 100}\n"
        "  - {spec: {name: quadratic}, steps: 2}\n"
    )
    with pytest.raises(evaluation.EvalInputError) as err:
        evaluation.load_suite(bad)
    text = str(err.value)
    for needle in ("bogus", "tuning_seed 1 is also an evaluation seed", "small_fc", "nofamily",
                   "steps must be an int >= 10"):
        assert needle in text, text


def test_steps_to_reach_on_a_constructed_curve():
    curve = [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 1.0, 1.0]
    assert evaluation.steps_to_reach(curve, 4.0) == 4  # the 4th loss is the first <= 4
    assert evaluation.steps_to_reach(curve, 3.0, window=2) == 5  # mean(4, 2) = 3 at step 5
    assert evaluation.steps_to_reach(curve, 0.5) is None
    assert evaluation.steps_to_reach(curve, float("nan")) is None
    assert evaluation.steps_to_reach([np.nan, 1.0], 2.0) == 2  # a NaN step never counts


def test_ref_resolution_errors_are_clear(tmp_path):
    with pytest.raises(evaluation.EvalInputError, match="pass the registry"):
        evaluation.resolve_ref("quickstart:3")
    with pytest.raises(evaluation.EvalInputError, match="no published optimizer named 'quickstart'"):
        evaluation.resolve_ref("quickstart", str(tmp_path))
    assert evaluation.resolve_ref("adam").kind == "hand-designed"
    assert evaluation.resolve_ref("small_fc").kind == "builtin-learned"


def _check_result(result, suite, ref):
    assert result["ref"] == ref and result["suite"] == "smoke"
    assert result["seeds"] == list(suite.seeds) and suite.tuning_seed not in result["seeds"]
    assert set(result["aggregate"]) == AGGREGATE_KEYS
    assert result["aggregate"]["num_tasks"] == len(suite.tasks) == len(result["tasks"])
    agg = result["aggregate"]
    # the aggregate recomputed from the per-task numbers
    wins = sum(t["ref"]["final_train_loss"] < t["target_loss"] for t in result["tasks"])
    assert agg["wins"] == wins and agg["win_rate"] == wins / agg["num_tasks"]
    reached = [t["ref"]["speedup"] for t in result["tasks"] if t["ref"]["speedup"] is not None]
    assert agg["reached_tasks"] == len(reached)
    ratios = [t["ref"]["final_train_loss"] / t["target_loss"] for t in result["tasks"]]
    assert agg["geomean_final_loss_ratio"] == pytest.approx(np.exp(np.mean(np.log(ratios))), rel=1e-12)
    for t, st in zip(result["tasks"], suite.tasks, strict=True):
        assert set(t) == TASK_KEYS and t["name"] == st.name and t["steps"] == st.steps
        assert set(t["elapsed_s"]) == {"tuning", "training"} and t["elapsed_s"]["training"] > 0
        assert RUN_KEYS | {"speedup"} <= set(t["ref"])
        assert len(t["ref"]["curve"]) == st.steps and len(t["ref"]["per_seed"]) == len(suite.seeds)
        assert t["ref"]["test_curve"]["steps"][-1] == st.steps and len(t["ref"]["test_curve"]["loss"]) >= 2
        adam = t["baselines"]["adam"]
        assert RUN_KEYS | {"hparams", "tuning"} <= set(adam)
        # the tuner ran: one record per trial, and the evaluated hparams are its best trial's
        assert len(adam["tuning"]["trials"]) == suite.trials
        best = min(adam["tuning"]["trials"], key=lambda r: r["final_loss"])
        assert adam["hparams"] == best["hparams"]
        assert t["target_loss"] == adam["final_train_loss"]
        # the best baseline reaches its own final loss, at the latest on the last step
        assert adam["steps_to_reach"] is not None and adam["steps_to_reach"] <= st.steps
        assert t["win"] == (t["ref"]["final_train_loss"] < t["target_loss"])
        if t["ref"]["steps_to_reach"] is None:
            assert t["ref"]["speedup"] is None
        else:
            assert t["ref"]["speedup"] == pytest.approx(adam["steps_to_reach"] / t["ref"]["steps_to_reach"])
        assert 0 < t["ref"]["auc"] < 2
    json.dumps(result, allow_nan=False)  # strict JSON


def test_smoke_with_a_hand_designed_ref(momentum_result, smoke, tmp_path):
    _check_result(momentum_result, smoke, "momentum")
    assert momentum_result["ref_kind"] == "hand-designed"
    # Each task's compiled programs are let go: kept, a long suite exhausted the process's memory maps.
    assert evaluation._program.cache_info().currsize == 0
    written = evaluation.write_report(momentum_result, tmp_path / "report")
    assert json.loads(pathlib.Path(written["json"]).read_text())["aggregate"] == momentum_result["aggregate"]
    pngs = [pathlib.Path(p) for k, p in written.items() if k != "json"]
    assert len(pngs) == len(smoke.tasks) + 1
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    table = evaluation.format_table(momentum_result)
    assert all(t.name in table for t in smoke.tasks)
    head = evaluation.headline(momentum_result)
    agg = momentum_result["aggregate"]
    assert head.startswith(f"wins {agg['wins']}/2, geomean final-loss ratio ")
    assert table.splitlines()[-1].startswith(f"momentum on smoke: {head}")
    if agg["geomean_speedup"] is not None:  # a speedup is never shown without its share of tasks
        assert f"geomean speedup {agg['geomean_speedup']:.2f}x over {agg['reached_tasks']}/2 tasks" in head


def test_smoke_with_a_learned_ref_from_a_registry(learned_registry, smoke, momentum_result, baseline_cache):
    reg, ref = learned_registry
    result = evaluation.evaluate(ref, smoke, registry=reg, progress=False, baseline_cache=baseline_cache)
    _check_result(result, smoke, ref)
    assert result["ref_kind"] == "registry" and result["ref_optimizer"] == "small_fc"
    assert len(list(baseline_cache.glob("*.json"))) == len(smoke.tasks)  # one tuned baseline per task
    # a second evaluation reads the tuned baselines from the shared folder
    cached = evaluation.evaluate("momentum", smoke, progress=False, baseline_cache=baseline_cache)
    # momentum_result tuned afresh, without a folder: tuning is deterministic, so the baselines are
    # identical whatever REF is and wherever they came from
    for tasks in zip(result["tasks"], cached["tasks"], momentum_result["tasks"], strict=True):
        adams = [t["baselines"]["adam"] for t in tasks]
        for key in ("hparams", "tuning", "final_train_loss", "per_seed"):
            assert adams[0][key] == adams[1][key] == adams[2][key], key
    assert cached["aggregate"] == momentum_result["aggregate"]


@dataclasses.dataclass(frozen=True)
class NaNOnOneSeedFake:
    """A test fake, not an optimizer to use: Adam, except that on a task whose parameters are one
    vector (the smoke suite's quadratic) it returns NaN updates from the first step if the
    vector's first initial entry is above `nan_if_first_param_above`, a seed-dependent condition."""

    learning_rate: float = 0.05
    nan_if_first_param_above: float = math.inf

    name = FAKE
    description = "test fake: Adam that diverges on one seed of one task"
    learned = False

    @property
    def hparams(self):
        return dataclasses.asdict(self)

    def init(self, key):
        return {}

    def as_optax(self, theta, num_steps):
        adam = optax.adam(self.learning_rate)

        def init(params):
            leaves = jax.tree.leaves(params)
            one_vector = len(leaves) == 1 and leaves[0].ndim == 1
            poisoned = one_vector and leaves[0][0] > self.nan_if_first_param_above
            return adam.init(params), jnp.asarray(poisoned)

        def update(grads, state, params=None, **extra):
            inner, poisoned = state
            updates, inner = adam.update(grads, inner, params)
            updates = jax.tree.map(lambda u: jnp.where(poisoned, jnp.nan, u), updates)
            return updates, (inner, poisoned)

        return optax.GradientTransformationExtraArgs(init, update)


def test_a_diverged_seed_loses_its_task_and_counts_at_the_cap(smoke, baseline_cache, monkeypatch):
    seeds = [0, 1, 2]
    quadratic = task_zoo.task(smoke.tasks[0].spec)
    assert jax.tree.leaves(quadratic.init(jax.random.key(0)))[0].shape == (8,)
    # the initial parameters of each seed, drawn as evaluation draws them: the largest first entry
    # alone is above the threshold, so exactly that seed of that task diverges
    firsts = [float(quadratic.init(jax.random.split(jax.random.key(s), 3)[0])["x"][0]) for s in seeds]
    top, second = sorted(firsts)[-1], sorted(firsts)[-2]
    threshold = (top + second) / 2
    monkeypatch.setitem(optimizers.registry._REGISTRY, FAKE,
                        functools.partial(NaNOnOneSeedFake, nan_if_first_param_above=threshold))
    result = evaluation.evaluate(FAKE, smoke, seeds=seeds, progress=False, baseline_cache=baseline_cache)
    q, mlp = result["tasks"]
    cap = evaluation.DIVERGED_RATIO_CAP
    assert q["ref"]["diverged_seeds"] == 1 and mlp["ref"]["diverged_seeds"] == 0
    assert [p["final_train_loss"] is None for p in q["ref"]["per_seed"]] == [f == top for f in firsts]
    assert q["ref"]["final_train_loss"] is None and not q["win"]  # lost, not dropped
    assert q["capped"] and not mlp["capped"]
    assert q["final_loss_ratio"] == q["test_loss_ratio"] == cap
    # hand computation over BOTH tasks: the capped quadratic and the measured MLP
    mlp_ratio = mlp["ref"]["final_train_loss"] / mlp["target_loss"]
    mlp_test_ratio = mlp["ref"]["final_test_loss"] / mlp["baselines"]["adam"]["final_test_loss"]
    agg = result["aggregate"]
    assert agg["num_tasks"] == 2 and agg["capped_tasks"] == 1 and agg["diverged_runs"]["ref"] == 1
    assert agg["geomean_final_loss_ratio"] == pytest.approx(math.sqrt(cap * mlp_ratio), rel=1e-12)
    assert agg["geomean_test_loss_ratio"] == pytest.approx(math.sqrt(cap * mlp_test_ratio), rel=1e-12)
    assert agg["mean_auc"]["ref"] == pytest.approx((cap + mlp["ref"]["auc"]) / 2, rel=1e-12)
    # dropping the diverged task (the old behaviour) would have reported the MLP's ratio alone
    assert agg["geomean_final_loss_ratio"] > 10 * mlp_ratio
    assert agg["wins"] == int(mlp["win"])
    table = evaluation.format_table(result)
    q_row = next(line for line in table.splitlines() if line.startswith(q["name"]))
    mlp_row = next(line for line in table.splitlines() if line.startswith(mlp["name"]))
    assert q_row.split()[-2:] == ["1/3", "0/3"] and mlp_row.split()[-2:] == ["0/3", "0/3"]
    assert "1e+03 (cap)" in q_row
    ratio = agg["geomean_final_loss_ratio"]
    summary = table.splitlines()[-1]
    assert f"wins {agg['wins']}/2, geomean final-loss ratio {ratio:.3g}x over all 2 tasks" in summary
    json.dumps(result, allow_nan=False)


def test_aggregates_of_hand_built_tasks_match_hand_computed_figures():
    """Three tasks whose figures are written out: REF wins two, reaches the target on two (2x and
    8x faster), and its one diverged seed is charged at the cap in the mean AUC."""
    def task(win, ratio, speedup, auc, diverged=0):
        return {"win": win, "final_loss_ratio": ratio, "test_loss_ratio": 2 * ratio, "capped": bool(diverged),
                "ref": {"speedup": speedup, "auc": auc, "diverged_seeds": diverged},
                "baselines": {"adam": {"auc": 0.5, "diverged_seeds": 0}}}

    tasks = [task(True, 0.5, 2.0, 0.2), task(True, 0.25, 8.0, 0.4), task(False, 8.0, None, 0.3, diverged=1)]
    agg = evaluation._aggregate(tasks, ["adam"])
    assert agg["num_tasks"] == 3 and agg["wins"] == 2 and agg["win_rate"] == pytest.approx(2 / 3)
    assert agg["reached_tasks"] == 2 and agg["reached_fraction"] == pytest.approx(2 / 3)
    assert agg["geomean_speedup"] == pytest.approx(4.0)  # sqrt(2 * 8)
    assert agg["geomean_final_loss_ratio"] == pytest.approx(1.0)  # cbrt(0.5 * 0.25 * 8)
    assert agg["geomean_test_loss_ratio"] == pytest.approx(2.0)
    assert agg["capped_tasks"] == 1 and agg["diverged_runs"] == {"ref": 1, "adam": 0}
    cap = evaluation.DIVERGED_RATIO_CAP
    assert agg["mean_auc"] == {"ref": pytest.approx((0.2 + 0.4 + cap) / 3), "adam": pytest.approx(0.5)}


def test_charged_ratios_cover_every_case():
    cap = evaluation.DIVERGED_RATIO_CAP
    ratio = evaluation._charged_ratio
    assert ratio(2.0, 4.0) == 0.5 and ratio(5e4, 1.0) == 5e4  # measured ratios are kept, even above the cap
    assert ratio(math.inf, 1.0) == ratio(math.nan, math.inf) == cap  # REF diverged
    assert ratio(1.0, math.inf) == 1 / cap  # only the baseline diverged
    assert ratio(0.0, 0.0) == 1.0 and ratio(1.0, 0.0) == cap and ratio(0.0, 1.0) == 1 / cap
    with pytest.raises(ValueError, match="positive and finite"):
        evaluation._geomean([1.0, math.inf])


def test_cli_bad_input_is_exit_code_2(tmp_path):
    runner = CliRunner()
    cases = [
        (["eval", "momentum", "--suite", "nope"], "unknown suite"),
        (["eval", "quickstart:1", "--suite", "smoke"], "--registry"),
        (["eval", "not-an-optimizer", "--suite", "smoke", "--registry", str(tmp_path)], "no published"),
        (["eval", "momentum", "--suite", "smoke", "--baselines", "adam,small_fc"], "cannot be tuned"),
    ]
    for args, needle in cases:
        done = runner.invoke(app, args)
        assert done.exit_code == 2, (args, done.output)
        assert needle in done.output, (args, done.output)


def test_cli_eval_end_to_end(tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(
        "name: tiny\ndescription: one quadratic\nseeds: [0]\ntuning_seed: 7\ntrials: 2\ntest_points: 2\n"
        "tasks:\n  - {name: q, spec: {name: quadratic, kwargs: {dim: 4, log10_condition: 1.0, noise: 0.0, "
        "seed: 1}}, steps: 30}\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "metaopt.cli", "eval", "momentum", "--suite", str(suite), "--seeds", "2",
         "--baselines", "sgd", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    line = last_json(done.stdout)
    assert line["ref"] == "momentum" and line["suite"] == "tiny" and line["seeds"] == [0, 1]
    assert line["baselines"] == ["sgd"] and line["num_tasks"] == 1 and line["out"] == str(out)
    result = json.loads((out / "result.json").read_text())
    assert set(result["tasks"][0]["baselines"]) == {"sgd"} and result["tuning_seed"] == 7
    assert all(len(b["tuning"]["trials"]) == 2 for b in result["tasks"][0]["baselines"].values())
    assert (out / "summary.png").stat().st_size > 0 and (out / "tasks" / "q.png").stat().st_size > 0
