"""`benchmarks/chaos.py`'s headline: every promise it reports can break, and a figure a scenario
did not report breaks it (a renamed figure must never read as 0 or True)."""

from __future__ import annotations

import copy

import pytest

from benchmarks.chaos import FIGURES, headline

# Every scenario's figures, each promise kept.
KEPT = {
    "workers": {"worker_kills": 3, "run_finished": True, "accepted_equals_applied": True},
    "learner": {"learner_kills": 6, "resumes": 6, "corrupt_checkpoints": 0, "within_one_interval": True,
                "run_finished": True},
    "services": {"run_finished": True, "corrupt_checkpoints": 0, "committed_lost": 0},
    "fuzz": {"fuzz_messages": 500, "fuzz_inputs": {"hypothesis": 100, "mutations": 400},
             "invalid_accepted": 0, "server_crashes": 0, "theta_unchanged_by_invalid": True},
    "inputs": {"spec_started": 0, "artifact_accepted": 0, "spec_unclear": 0, "secrets_echoed": 0,
               "cache_poisoned": 0, "artifact_unclear": 0, "intact_failed": 0},
    "load": {"accepted_lost": 0, "within_bound": True},
    "nodes": {"node_kills": 1, "run_finished": True, "accepted_equals_applied": True, "phases_done": True,
              "record_state": "SUCCEEDED"},
    "head": {"run_finished": True, "accepted_equals_applied": True, "phases_done": True,
             "record_state": "SUCCEEDED", "accepted_during_outage": 812, "workers_restarted": 0,
             "workers_left": 0},
}


def test_kept_promises_are_ok_and_the_table_covers_every_figure():
    assert {name: set(figures) for name, figures in KEPT.items()} == {
        name: set(figures) for name, figures in FIGURES.items()}
    report = headline(copy.deepcopy(KEPT))
    assert report["ok"] is True and report["missing_figures"] == []
    assert report["resumes"] == report["learner_kills"] == 6 and report["invalid_accepted"] == 0


def test_a_scenario_left_out_promises_nothing():
    assert headline({"fuzz": dict(KEPT["fuzz"])})["ok"] is True


@pytest.mark.parametrize("scenario, figure", [(n, f) for n, fs in FIGURES.items() for f in fs])
def test_a_missing_figure_breaks_the_promise_and_is_named(scenario, figure):
    scenarios = copy.deepcopy(KEPT)
    del scenarios[scenario][figure]
    report = headline(scenarios)
    assert report["ok"] is False
    assert report["missing_figures"] == [f"{scenario}.{figure}"]


@pytest.mark.parametrize("scenario, figure, broken", [
    ("workers", "run_finished", False), ("workers", "accepted_equals_applied", False),
    ("learner", "resumes", 5), ("learner", "corrupt_checkpoints", 1),
    ("learner", "within_one_interval", False),
    ("services", "committed_lost", 1), ("services", "corrupt_checkpoints", 2),
    ("fuzz", "invalid_accepted", 1), ("fuzz", "server_crashes", 1),
    ("fuzz", "theta_unchanged_by_invalid", False),
    ("inputs", "spec_started", 1), ("inputs", "secrets_echoed", 1), ("load", "accepted_lost", 1),
    ("load", "within_bound", False), ("nodes", "run_finished", False),
    ("nodes", "accepted_equals_applied", False), ("nodes", "phases_done", False),
    ("nodes", "record_state", "FAILED"), ("head", "run_finished", False),
    ("head", "accepted_equals_applied", False), ("head", "phases_done", False),
    ("head", "record_state", "FAILED"), ("head", "accepted_during_outage", 0),
    ("head", "workers_restarted", 3), ("head", "workers_left", 1),
])
def test_a_broken_figure_breaks_the_promise(scenario, figure, broken):
    scenarios = copy.deepcopy(KEPT)
    scenarios[scenario][figure] = broken
    assert headline(scenarios)["ok"] is False


def test_a_scenario_that_failed_to_report_breaks_the_promise():
    scenarios = copy.deepcopy(KEPT) | {"load": {"error": "exit status 1: ...", "seconds": 3.0}}
    report = headline(scenarios)
    assert report["ok"] is False and report["missing_figures"] == []
