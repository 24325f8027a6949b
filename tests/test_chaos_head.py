"""The Ray head lost mid-run, as the chart deploys a job (`benchmarks/chaos_head.py`): with GCS
fault tolerance backed by Redis, the job's detached workers deliver to the learner (outside Ray)
through the head's outage, none of them restarts, the driver run again attaches to them, the run
finishes with every accepted estimate applied, and the workers then remove themselves.

Slow: a head, two worker nodes, three workers, a learner and two drivers on 2 cores, and a run
whose time budget must hold every phase. The fast test that restates it on one Ray that stays
up: tests/test_serve_learner.py (a killed driver's workers deliver on, one Ray restarts works on
without a driver, a second driver attaches, the workers leave; a SIGTERMed learner is not the
job's end)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.jsonout import last_json

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "chaos_head.py"


@pytest.mark.slow
def test_the_workers_ride_through_the_loss_of_the_ray_head_and_the_next_driver_attaches():
    # Its own process: Ray forks, which a test process already running JAX threads must not.
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json(done.stdout)
    assert report["phases_done"] is True, json.dumps(report, indent=1) + done.stderr[-3000:]
    assert report["accepted_during_outage"] > 0, report  # no head, and the workers deliver
    assert report["workers_restarted"] == 0, report  # none died with the head or its driver
    assert report["second_driver_attached"] == report["workers"] == report["workers_returned"], report
    assert report["run_finished"] and report["record_state"] == "SUCCEEDED", report
    assert report["accepted"] == report["applied"] > 0, report
    assert report["workers_left"] == 0, report  # they removed themselves
