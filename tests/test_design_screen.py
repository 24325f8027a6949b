"""benchmarks/design_screen.py: untrained variants of a learned optimizer on a suite, one row
each, and clear refusals of what it cannot screen."""

from __future__ import annotations

import json

import pytest

from benchmarks import design_screen

SUITE = """name: tiny
description: one noisy quadratic, 40 steps
seeds: [0]
tuning_seed: 1000
baselines: [adam]
trials: 2
test_points: 2
tasks:
  - name: quadratic_8
    spec: {name: quadratic, kwargs: {dim: 8, log10_condition: 1.0, noise: 0.1, seed: 11}}
    steps: 40
"""


def test_each_variant_is_evaluated_untrained_and_reported(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE)
    variants = ['{}', '{"rate_adaptation": 0.5}']
    assert design_screen.main(["nominal_mlp", str(suite), *variants, "--json",
                               "--baseline-cache", str(tmp_path / "cache")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["suite"] == "tiny"
    assert [v["hparams"] for v in report["variants"]] == [{}, {"rate_adaptation": 0.5}]
    plain, adapted = (v["final_loss_ratio"]["quadratic_8"] for v in report["variants"])
    assert 0 < plain and 0 < adapted and plain != adapted  # the hyperparameter reached the optimizer
    assert all(v["num_tasks"] == 1 and v["wins"] in (0, 1) for v in report["variants"])


@pytest.mark.parametrize(("args", "message"), [
    (["nominal_mlp", "smoke", "{rate"], "not JSON"),
    (["nominal_mlp", "smoke", "[1]"], "JSON object"),
    (["adam", "smoke", "{}"], "hand-designed"),
])
def test_what_it_cannot_screen_is_refused_clearly(args, message):
    with pytest.raises(SystemExit, match=message):
        design_screen.main(args)
