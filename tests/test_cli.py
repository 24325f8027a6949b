"""The command line's listing verbs, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from metaopt import learnables, optimizers, task_zoo


def metaopt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metaopt.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_list_tasks_names_every_family_with_a_description():
    done = metaopt("list", "tasks", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == task_zoo.families()
    assert all(r["description"] for r in rows)
    text = metaopt("list", "tasks").stdout
    assert all(name in text for name in task_zoo.families())


def test_list_optimizers_says_which_are_learned_and_how_big():
    done = metaopt("list", "optimizers", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert sorted(rows) == optimizers.names()
    assert rows["adam"]["kind"] == "hand-designed" and rows["adam"]["meta_parameters"] == 0
    assert rows["small_fc"]["kind"] == "learned" and rows["small_fc"]["meta_parameters"] == 1922
    assert "small_fc" in metaopt("list", "optimizers").stdout


def test_list_objectives_names_what_a_job_can_meta_learn_besides_an_optimizer():
    done = metaopt("list", "objectives", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert sorted(rows) == learnables.names()
    assert rows["adam_schedule"]["kind"] == "schedule" and rows["adam_schedule"]["meta_parameters"] == 8
    assert "adam_schedule" in metaopt("list", "objectives").stdout


def test_an_unknown_listing_is_a_usage_error():
    done = metaopt("list", "everything")
    assert done.returncode == 2 and "everything" in done.stderr
