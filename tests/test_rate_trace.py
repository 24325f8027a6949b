"""benchmarks/rate_trace.py: a short trace of the anchor's per-tensor rates, against its bounds."""

from __future__ import annotations

import json

import pytest

from benchmarks import rate_trace

SUITE = "examples/suites/design_validation.yaml"


def test_a_trace_reports_loss_points_and_every_tensors_rate_within_its_range(capsys):
    variants = {"anchor": {"rate_adaptation": 0.3, "rate_range": 0.5}, "adam": {"adam": 0.01}}
    assert rate_trace.main([SUITE, "least_squares_48", json.dumps(variants), "--steps", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["task"], report["steps"]) == ("least_squares_48", 40)
    assert set(report["variants"]) == set(variants)
    anchor, adam = report["variants"]["anchor"], report["variants"]["adam"]
    assert len(anchor["loss_points"]) == 11 and anchor["loss_points"][-1] < anchor["loss_points"][0]
    rates = [r for values in anchor["log_rates"].values() for r in values]
    assert rates and all(-0.5 <= r <= 0.5 for r in rates) and any(r != 0 for r in rates)
    assert all(r == 0 for values in adam["log_rates"].values() for r in values)  # Adam has no α_T
    assert anchor["estimate_points"] == adam["estimate_points"] == []


def test_with_rate_estimate_the_trace_shows_the_estimate_growing_from_its_start(capsys):
    variants = {"prodigy": {"learning_rate": 1.0, "rate_estimate": 0.5}}
    assert rate_trace.main([SUITE, "least_squares_48", json.dumps(variants), "--steps", "40", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variants"]["prodigy"]["estimate_points"]
    assert len(d) == 11 and d[0] == pytest.approx(1e-6, rel=1e-6) and d[-1] > 10 * d[0]
    assert all(b >= a for a, b in zip(d, d[1:], strict=False))  # it never falls


@pytest.mark.parametrize(("args", "message"), [
    (["no_such_task", "{}"], "no task 'no_such_task'"),
    (["least_squares_48", "{not json"], "not JSON"),
    (["least_squares_48", '{"a": 1}'], "named hyperparameter objects"),
])
def test_bad_input_is_refused_with_what_to_do(args, message):
    with pytest.raises(SystemExit, match=message):
        rate_trace.main([SUITE, *args])
