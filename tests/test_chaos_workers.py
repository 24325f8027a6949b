"""Worker processes SIGKILLed during a real local run (`benchmarks/chaos_workers.py`, short
version): Ray restarts each as a new incarnation with a new run id, the learner takes the new
ones' estimates, loses or double-counts none, and the run reaches its stopping rule (here a
45-second budget)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "chaos_workers.py"


def test_killed_workers_come_back_as_new_incarnations_and_the_run_finishes():
    # Its own process: Ray forks, which a test process already running JAX threads must not.
    command = [sys.executable, str(SCRIPT), "--json", "--minutes", "0.75", "--kill-every", "4",
               "--min-age", "10", "--no-baseline"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["worker_kills"] >= 2, report
    assert report["worker_incarnations"] > 2, report  # restarts delivered estimates
    assert report["run_finished"] and report["accepted_equals_applied"], report
