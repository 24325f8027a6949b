"""In-run evaluation: the job spec's eval section, choosing the checkpoint to publish, the
evaluation process's ticks (a real spawned process), and the run's metrics.jsonl and plot.
The real run is in test_end_to_end (metrics.jsonl, plot, published best θ) and test_dashboards
(the gauges in a real Prometheus)."""

from __future__ import annotations

import json
import logging
import math
import time

import matplotlib.image
import numpy as np
import pytest
import safetensors.numpy

from metaopt.evaluation import suite_names
from metaopt.inrun_eval import RECORDS_FILE, InRunEvaluator, best_evaluation, theta_file
from metaopt.jobspec import EvalSpec, JobSpecError, parse_job_spec
from metaopt.learner.core import OuterStep
from metaopt.learner.metrics import LearnerMetrics
from metaopt.run_report import family_series, plot_run, read_metrics, running_mean
from tests.inrun_spec import TINY_SUITE

MINIMAL = {"name": "j", "tasks": [{"family": "quadratic"}]}


# --- the job spec ---------------------------------------------------------------------------------

def test_eval_is_off_unless_asked_and_has_documented_defaults():
    assert parse_job_spec(MINIMAL).eval is None
    settings = parse_job_spec({**MINIMAL, "eval": {"suite": "in_distribution"}}).eval
    assert (settings.suite, settings.every_minutes, settings.seeds, settings.publish) == (
        "in_distribution", 10.0, 1, "last")
    assert parse_job_spec({**MINIMAL, "eval": {"suite": str(TINY_SUITE), "seeds": 1}}).eval.seeds == 1


@pytest.mark.parametrize("section, expected", [
    ({"suite": "nosuch"}, ["eval.suite: unknown suite 'nosuch'", *suite_names()]),
    ({"suite": "missing/suite.yaml"}, ["eval.suite: cannot read suite file missing/suite.yaml"]),
    ({}, ["eval.suite: Field required"]),
    ({"suite": "smoke", "every_minutes": 0}, ["eval.every_minutes: Input should be greater than 0"]),
    ({"suite": "smoke", "every_minutes": -5}, ["eval.every_minutes: Input should be greater than 0"]),
    ({"suite": "smoke", "seeds": 0}, ["eval.seeds: Input should be greater than or equal to 1"]),
    ({"suite": "in_distribution", "seeds": 4},
     ["eval: seeds (4) exceeds the 3 evaluation seed(s) of suite 'in_distribution' ([0, 1, 2])"]),
    ({"suite": "smoke", "publish": "first"}, ["eval.publish: Input should be 'last' or 'best'"]),
    ({"suite": "smoke", "every": 5}, ["eval.every: Extra inputs are not permitted"]),
    ("smoke", ["eval: Input should be a valid dictionary"]),
])
def test_a_bad_eval_section_is_refused_naming_the_field_and_the_fix(section, expected):
    with pytest.raises(JobSpecError) as err:
        parse_job_spec({**MINIMAL, "eval": section})
    for phrase in expected:
        assert phrase in str(err.value), str(err.value)


def test_an_invalid_suite_file_is_refused_with_its_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntasks: []\nseeds: [0]\n")
    with pytest.raises(JobSpecError, match=r"(?s)eval\.suite: invalid suite file .*bad\.yaml.*tasks must be"):
        parse_job_spec({**MINIMAL, "eval": {"suite": str(bad)}})


# --- which checkpoint is published ----------------------------------------------------------------

def _record(step, wins, ratio, **more):
    return {"kind": "eval", "outer_step": step, "wins": wins, "num_tasks": 3, "win_share": wins / 3,
            "geomean_final_loss_ratio": ratio, "suite": "tiny", "seeds": [0], "baselines": ["adam"],
            "checkpoint": f"ckpt-{step:09d}", **more}


def test_the_best_evaluation_has_the_most_wins_then_the_lowest_ratio_then_the_later_step():
    assert best_evaluation([]) is None
    most_wins = [_record(10, 1, 0.5), _record(20, 2, 0.9), _record(30, 0, 0.1)]
    assert best_evaluation(most_wins)["outer_step"] == 20
    tied_wins = [_record(10, 2, 0.9), _record(20, 2, 0.7), _record(30, 2, 0.8)]
    assert best_evaluation(tied_wins)["outer_step"] == 20
    diverged = [_record(10, 1, None), _record(20, 1, 5.0)]  # null: every run diverged, the worst
    assert best_evaluation(diverged)["outer_step"] == 20
    assert best_evaluation([_record(10, 1, 0.5), _record(20, 1, 0.5)])["outer_step"] == 20


def _evaluator(tmp_path, records, publish, kept=()):
    """An evaluator over records a run left in tmp_path (its process is never started)."""
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir(parents=True)
    for record in records:
        report = eval_dir / f"step-{record['outer_step']:09d}.json"
        report.write_text(json.dumps({"suite": "tiny", "aggregate": {"wins": record["wins"]}, "tasks": []}))
        record["report"] = str(report)
    (eval_dir / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in kept:
        safetensors.numpy.save_file({"theta": np.full(4, step, np.float32)}, str(theta_file(eval_dir, step)))
    settings = EvalSpec(suite=str(TINY_SUITE), publish=publish)
    return InRunEvaluator(settings, tmp_path, str(tmp_path / "checkpoints"), "j", LearnerMetrics("j"),
                          saved_step=lambda: None)


def test_publish_best_takes_the_best_kept_theta_past_step_0_and_says_why(tmp_path):
    records = [_record(0, 3, 0.1), _record(10, 1, 0.9), _record(20, 2, 0.8), _record(30, 2, 0.95)]
    choice = _evaluator(tmp_path, records, "best", kept=(0, 20)).publication(last_step=35)
    assert choice.step == 20 and choice.theta.tolist() == [20.0] * 4
    assert choice.report is None  # the suite that chose it does not report on it
    selection = choice.provenance["selection"]
    assert (selection["outer_step"], selection["suite"], selection["wins"], selection["evaluations"]) == (
        20, "tiny", 2, 4)
    assert "most wins" in selection["rule"] and selection["checkpoint"] == "ckpt-000000020"


def test_publish_best_without_any_evaluation_publishes_the_last_theta_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "metaopt.inrun_eval"):
        choice = _evaluator(tmp_path, [], "best").publication(last_step=35)
    assert (choice.step, choice.theta, choice.provenance) == (35, None, {})
    assert "no in-run evaluation finished" in caplog.text


def test_publish_last_carries_the_final_evaluation_as_its_report(tmp_path):
    records = [_record(10, 3, 0.5), _record(35, 1, 0.9)]
    choice = _evaluator(tmp_path, records, "last").publication(last_step=35)
    assert (choice.step, choice.theta, choice.provenance) == (35, None, {})
    assert choice.report["aggregate"] == {"wins": 1}


# --- the evaluation process ------------------------------------------------------------------------

def test_ticks_while_an_evaluation_runs_are_skipped_and_failures_are_logged_not_fatal(tmp_path, caplog):
    """A real spawned process, killed in the middle of an evaluation, then asked to evaluate a
    checkpoint that does not exist: the run logs each failure and the skipped ticks, starts a new
    process when its process died, and goes on; `close` ends the process."""
    settings = EvalSpec(suite=str(TINY_SUITE), every_minutes=1e-4)  # a tick every 6 ms
    newest = [7]  # the step of the newest checkpoint, as the checkpointer would say
    evaluator = InRunEvaluator(settings, tmp_path, str(tmp_path / "checkpoints"), "j", LearnerMetrics("j"),
                               saved_step=lambda: newest[0])

    def poll_until(phrase: str) -> list:
        records, deadline = [], time.monotonic() + 120
        while phrase not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            records += evaluator.poll()
            time.sleep(0.02)
        return records

    with caplog.at_level(logging.INFO, "metaopt.inrun_eval"):
        evaluator.start()
        first = evaluator._process
        time.sleep(0.02)
        assert evaluator.poll() == [] and evaluator._in_flight == 7  # asked while it still starts up
        first.kill()
        records = poll_until("its process ended (exit code -9) while evaluating step 7")
        newest[0] = 8
        records += poll_until("in-run evaluation of step 8 failed: NotACheckpointError")
        assert "tick skipped, the evaluation of step 8 is still running" in caplog.text
        assert evaluator._process is not first
        records += poll_until("tick skipped, no new checkpoint since step 8")
        assert evaluator.finish() == []  # step 8 was tried: nothing new to evaluate
        second = evaluator._process
        evaluator.close()
    assert records == [] and evaluator.records == []
    assert not second.is_alive() and second.exitcode == 0


# --- metrics.jsonl and the plot ----------------------------------------------------------------

def _step(step, **families):
    return OuterStep(step=step, meta_loss=float(np.mean(list(families.values()))), gradient_norm=1.0,
                     estimates=2, inner_steps=4, time=float(step), family_losses=families)


def test_read_metrics_keeps_one_kind_and_leaves_out_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "meta_loss": 1.0}\n'  # written before lines had a kind
                    '{"kind": "outer_step", "step": 2, "meta_loss": 0.5}\n'
                    '{"kind": "eval", "outer_step": 2, "wins": 1}\n'
                    '{"kind": "outer_step", "step": 3, "meta_lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert read_metrics(path, kind="eval") == [{"kind": "eval", "outer_step": 2, "wins": 1}]
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_running_mean_is_the_trailing_mean():
    values = np.random.default_rng(0).normal(size=23)
    expected = [values[max(0, i - 4):i + 1].mean() for i in range(values.size)]
    np.testing.assert_allclose(running_mean(values, 5), expected, rtol=1e-12)


def test_family_series_splits_meta_batches_by_family():
    history = [_step(1, quadratic=1.0, mlp=2.0), _step(2, mlp=1.5),
               {"step": 3, "meta_loss": 0.7}]  # recorded before per-family losses
    assert family_series(history) == {"quadratic": ([1], [1.0]), "mlp": ([1, 2], [2.0, 1.5]),
                                      "all families": ([3], [0.7])}


def test_the_plot_has_an_evaluation_panel_only_with_evaluations(tmp_path):
    rng = np.random.default_rng(0)
    history = [_step(s, quadratic=float(np.exp(-s / 10) + 0.01 * rng.random()), mlp=float(2 - s / 50))
               for s in range(1, 61)]
    evaluations = [_record(0, 0, 2.0), _record(30, 1, 1.1), _record(60, 3, 0.6), _record(45, 2, None)]
    plot_run(history, [], tmp_path / "plain.png", title="j")
    plot_run(history, evaluations, tmp_path / "with_eval.png", title="j")
    plain, with_eval = (matplotlib.image.imread(tmp_path / name) for name in ("plain.png", "with_eval.png"))
    assert plain.shape[1] == with_eval.shape[1] == 8 * 120
    assert (plain.shape[0], with_eval.shape[0]) == (4 * 120, math.ceil(7.5 * 120))
