"""Random-search tuner: finds the known-good SGD learning rate on a quadratic, records every
trial (diverged ones too) and is deterministic for a key."""

from __future__ import annotations

import math

import jax
import pytest

from metaopt import task_zoo, tuning

# Noise-free quadratic 0.5·mean(c·(x − center)²) with c = logspace(0, 1, 8): the Hessian is
# diag(c)/8, so L = 10/8 and 1/L = 0.8; SGD diverges above 2/L = 1.6.
SPEC = task_zoo.TaskSpec("quadratic", {"dim": 8, "log10_condition": 1.0, "noise": 0.0, "seed": 0})
INV_L = 0.8
SPACE = {"learning_rate": ("log_uniform", 1e-3, 10.0)}


@pytest.fixture(scope="module")
def sgd_result():
    return tuning.random_search(jax.random.key(0), "sgd", SPEC, num_steps=50, trials=24, search_space=SPACE)


def test_finds_learning_rate_near_inverse_curvature(sgd_result):
    best = sgd_result.best_hparams["learning_rate"]
    assert INV_L / 3 < best < 3 * INV_L
    assert sgd_result.best_loss < 1e-3
    assert sgd_result.best_loss == min(t["final_loss"] for t in sgd_result.trials)


def test_records_every_trial_including_diverged(sgd_result):
    trials = sgd_result.trials
    assert len(trials) == 24
    for t in trials:
        assert set(t) == {"hparams", "final_loss", "diverged"}
        assert 1e-3 <= t["hparams"]["learning_rate"] <= 10.0
        assert t["diverged"] == (t["final_loss"] == math.inf)
    diverged = [t["hparams"]["learning_rate"] for t in trials if t["diverged"]]
    assert diverged and min(diverged) > 2 * INV_L  # only unstable step sizes diverge


def test_deterministic_for_a_key(sgd_result):
    again = tuning.random_search(jax.random.key(0), "sgd", SPEC, num_steps=50, trials=24, search_space=SPACE)
    assert again.trials == sgd_result.trials
    other = tuning.random_search(jax.random.key(1), "sgd", SPEC, num_steps=50, trials=3, search_space=SPACE)
    assert other.trials[0]["hparams"] != sgd_result.trials[0]["hparams"]


def test_all_diverged():
    result = tuning.random_search(
        jax.random.key(0), "sgd", SPEC, 30, trials=3, search_space={"learning_rate": ("uniform", 50.0, 100.0)}
    )
    assert result.best_hparams is None and result.best_loss == math.inf
    assert [t["diverged"] for t in result.trials] == [True, True, True]


def test_default_spaces_choices_and_test_split():
    assert set(tuning.search_space_for("adam")) == {"learning_rate"}
    assert "momentum" in tuning.search_space_for("momentum")
    space = {"learning_rate": ("log_uniform", 1e-3, 0.3), "nesterov": ("choice", [False, True])}
    result = tuning.random_search(
        jax.random.key(2), "momentum", SPEC, 20, trials=6, search_space=space, split=task_zoo.TEST
    )
    assert {t["hparams"]["nesterov"] for t in result.trials} == {False, True}
    assert all(t["hparams"]["momentum"] == 0.9 for t in result.trials)  # not searched: default
    assert math.isfinite(result.best_loss)


def test_bad_search_space():
    with pytest.raises(ValueError, match="unknown kind"):
        tuning.random_search(jax.random.key(0), "sgd", SPEC, 5, 1, search_space={"lr": ("normal", 0, 1)})
    with pytest.raises(ValueError, match="both fixed"):
        tuning.random_search(jax.random.key(0), "sgd", SPEC, 5, 1, SPACE, hparams={"learning_rate": 1.0})
