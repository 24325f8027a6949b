"""benchmarks/design_screen.py: variants of a learned optimizer on a suite, untrained or at a
trained θ from a registry, one row each, and clear refusals of what it cannot screen."""

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


def test_each_variant_is_evaluated_untrained_and_reported(tmp_path, capsys, monkeypatch):
    """...and each variant's compiled programs are dropped after it (kept, a long screen runs out
    of memory maps)."""
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE)
    variants = ['{}', '{"rate_adaptation": 0.5}']
    cleared = []
    monkeypatch.setattr(design_screen.jax, "clear_caches", lambda: cleared.append(True))
    assert design_screen.main(["nominal_mlp", str(suite), *variants, "--json",
                               "--baseline-cache", str(tmp_path / "cache")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["suite"] == "tiny"
    assert [v["hparams"] for v in report["variants"]] == [{}, {"rate_adaptation": 0.5}]
    plain, adapted = (v["final_loss_ratio"]["quadratic_8"] for v in report["variants"])
    assert 0 < plain and 0 < adapted and plain != adapted  # the hyperparameter reached the optimizer
    assert all(v["num_tasks"] == 1 and v["wins"] in (0, 1) for v in report["variants"])
    assert len(cleared) == len(variants)


def test_variants_at_a_trained_theta_keep_its_hparams_and_take_the_variants(tmp_path, capsys):
    """--theta: the registry's θ and hyperparameters, the variant's on top; {} is the trained one as
    published, so it matches `metaopt eval` of the same ref."""
    import jax

    from metaopt import evaluation, optimizers, registry

    opt = optimizers.make("nominal_mlp", rate_adaptation=0.2)
    theta = opt.init(jax.random.key(0))
    theta["mlp"]["w1"] = 0.5 * jax.random.normal(jax.random.key(1), theta["mlp"]["w1"].shape)
    root = tmp_path / "registry"
    registry.publish(str(root), "screened", "nominal_mlp", opt.hparams, theta, {"source": "test"})
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE)
    cache = str(tmp_path / "cache")
    ablated = '{"zero": ["mlp/w1", "mlp/b1"], "rate_adaptation": 0.0}'
    assert design_screen.main(["nominal_mlp", str(suite), "{}", '{"elementwise_correction": true}', ablated,
                               "--json", "--theta", "screened:1", "--registry", str(root),
                               "--baseline-cache", cache]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["theta"] == "screened:1"
    published, variant, without = (v["final_loss_ratio"]["quadratic_8"] for v in report["variants"])
    # Without its correction and rate, the trained optimizer is its untrained anchor.
    anchor = evaluation.evaluate(design_screen.untrained("nominal_mlp", {}), evaluation.load_suite(suite),
                                 progress=False, baseline_cache=cache)
    assert without == pytest.approx(anchor["tasks"][0]["final_loss_ratio"], rel=1e-5)
    direct = evaluation.evaluate(evaluation.resolve_ref("screened:1", str(root)),
                                 evaluation.load_suite(suite), progress=False, baseline_cache=cache)
    assert published == pytest.approx(direct["tasks"][0]["final_loss_ratio"], rel=1e-6)
    assert variant != published  # the variant's hyperparameter reached the trained optimizer


def test_seeds_replaces_the_suites_own(tmp_path, capsys):
    """--seeds 2 screens on seeds 0 and 1 of a one-seed suite: the same ratio as evaluating a suite
    with those two seeds, not the one-seed ratio."""
    import dataclasses

    from metaopt import evaluation

    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE)
    cache = str(tmp_path / "cache")
    assert design_screen.main(["nominal_mlp", str(suite), "{}", "--seeds", "2", "--json",
                               "--baseline-cache", cache]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["seeds"] == [0, 1]
    one_seed = evaluation.load_suite(suite)
    ratio = {}
    for seeds in ((0,), (0, 1)):
        result = evaluation.evaluate(design_screen.untrained("nominal_mlp", {}),
                                     dataclasses.replace(one_seed, seeds=seeds), progress=False,
                                     baseline_cache=cache)
        ratio[seeds] = result["tasks"][0]["final_loss_ratio"]
    screened = report["variants"][0]["final_loss_ratio"]["quadratic_8"]
    assert screened == pytest.approx(ratio[(0, 1)], rel=1e-6) and screened != ratio[(0,)]


REF4 = ["--theta", "reference:4", "--registry", "examples/registry"]


@pytest.mark.parametrize(("args", "message"), [
    (["nominal_mlp", "smoke", "{rate"], "not JSON"),
    (["nominal_mlp", "smoke", "[1]"], "JSON object"),
    (["adam", "smoke", "{}"], "hand-designed"),
    (["nominal_mlp", "smoke", "{}", "--theta", "reference:4"], "needs --registry"),
    (["small_fc", "smoke", "{}", *REF4], "is a 'nominal_mlp'"),
    (["nominal_mlp", "smoke", '{"zero": ["mlp/w9"]}', *REF4], "no θ leaves"),
    (["nominal_mlp", "smoke", '{"zero": ["mlp/w1"]}'], "ablates a trained"),
    (["nominal_mlp", "smoke", "{}", "--seeds", "0"], "at least 1"),
])
def test_what_it_cannot_screen_is_refused_clearly(args, message):
    with pytest.raises(SystemExit, match=message):
        design_screen.main(args)
