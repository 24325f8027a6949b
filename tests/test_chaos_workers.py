"""Worker processes SIGKILLed during a real local run (`benchmarks/chaos_workers.py`): Ray
restarts each as a new incarnation with a new run id, the learner takes the new ones'
estimates, loses or double-counts none, and the run reaches its stopping rule.

The default test chooses its kill moments from the learner's own record (each kill after every
incarnation so far has an accepted estimate) and stops on outer steps, so a slow machine makes
it slower, never red. The clock-driven version (kills every few seconds in a 45-second budget)
is in the slow suite: how many restarts deliver in a budget depends on the machine."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.jsonout import last_json

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "chaos_workers.py"


def run_benchmark(*args: str, timeout_s: float, env: dict | None = None) -> dict:
    # Its own process: Ray forks, which a test process already running JAX threads must not.
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", *args], capture_output=True,
                          text=True, timeout=timeout_s, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return last_json(done.stdout)


# Slow (30 s): the default run's test_serve_learner SIGKILLs a worker, and its next incarnation
# delivers to the learner with no driver to call it.
@pytest.mark.slow
def test_a_worker_killed_after_each_delivery_comes_back_as_a_new_incarnation_that_delivers(tmp_path):
    """One worker, SIGKILLed twice, each time once the learner has accepted an estimate from its
    current incarnation: 3 incarnations (3 run ids) delivered, every accepted estimate applied
    once, and all 300 outer steps taken. Waits are on the learner's record, bounded only by the
    timeout.

    A restart costs a process start and a JAX compile, and the compile is most of it (tens of
    seconds on 2 busy cores), but not what this test is about: JAX's persistent compilation
    cache, which the Ray workers inherit through the environment, lets each restart load the
    programs its first incarnation compiled. The benchmark, which measures restarts, runs without."""
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),  # every program, however small
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    report = run_benchmark("--kills-after-delivery", "2", "--workers", "1", "--steps", "300", timeout_s=540,
                           env=cache)
    assert report["worker_kills"] == 2, report
    assert report["worker_incarnations"] == 3, report  # the first, and each restart, delivered
    assert report["accepted"] == report["applied"] > 0, report
    assert report["outer_steps"] == 300 and report["run_finished"], report


@pytest.mark.slow  # timing-dependent: how many restarts deliver in 45 s depends on the machine
def test_killed_workers_come_back_as_new_incarnations_and_the_run_finishes():
    report = run_benchmark("--minutes", "0.75", "--kill-every", "4", "--min-age", "10", "--no-baseline",
                           timeout_s=300)
    assert report["worker_kills"] >= 2, report
    assert report["worker_incarnations"] > 2, report  # restarts delivered estimates
    assert report["run_finished"] and report["accepted_equals_applied"], report
