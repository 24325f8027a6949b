"""A real multi-node Ray cluster on this machine loses a whole worker node mid-run
(`benchmarks/chaos_nodes.py`): the workers were spread over the nodes, the lost ones come back as
new incarnations on the survivors as far as there is room, the rest wait and are placed on a
node that joins later, the job record's workers_alive falls and recovers, and the run finishes
with every accepted estimate applied once.

Slow: a head, three worker nodes, five workers and a learner on 2 cores, with a run that must fit
every phase in its time budget. The fast tests restate what they can without a cluster:
tests/test_worker.py (the actor options that spread and restart workers),
tests/test_chaos_workers.py (a killed worker comes back as a new incarnation; accepted = applied),
tests/test_train.py (the end of a run does not wait for workers Ray never placed)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tests.jsonout import last_json

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "chaos_nodes.py"


@pytest.mark.slow
def test_a_lost_node_s_workers_come_back_elsewhere_and_a_joining_node_takes_the_rest():
    # Its own process: Ray forks, which a test process already running JAX threads must not.
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json(done.stdout)
    placements = report.pop("placements", None)
    assert report["phases_done"] is True, json.dumps(report, indent=1) + done.stderr[-3000:]
    report["placements"] = placements
    assert report["node_kills"] == 1 and report["workers_lost"] == 2, report
    assert report["restarted_on_survivors"] == 1 and report["alive_on_killed_node"] == 0, report
    assert report["placed_on_new_node"] == 1, report
    before = report["placements"]["before_kill"]
    assert len({p["node"] for p in before.values()}) == 3, before  # spread over the three nodes
    alive = report["workers_alive_before_kill"], report["workers_alive_min_after_kill"]
    assert alive[0] == 5 and alive[1] <= 4, report  # the record saw the loss ...
    assert report["workers_alive_after_join"] == 5, report  # ... and the recovery
    assert report["worker_incarnations"] == 7, report  # 5, and the 2 lost ones again
    assert report["run_finished"] and report["record_state"] == "SUCCEEDED", report
    assert report["accepted"] == report["applied"] > 0, report
