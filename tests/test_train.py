"""`metaopt train` under trouble: a failing worker, an interrupted run (real Ray, real CLI)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from metaopt import storage
from metaopt.run_report import read_metrics
from tests.jsonout import last_json

DATA = pathlib.Path(__file__).parent / "data"


# `metaopt train` as the CLI runs it, with the real learner and real PESWorker actors; the one
# change is the class start_workers makes its actors from, so that worker-1 fails in its loop.
TRAIN_WITH_A_FAILING_WORKER = """
import sys

from metaopt.cli import app
from metaopt.workers import actor
from tests.failing_worker import WorkerThatFails

actor.PESWorker = WorkerThatFails
app(sys.argv[1:], prog_name="metaopt")
"""


def test_a_failed_worker_stops_the_run_with_a_clear_error(tmp_path):
    """worker-1 raises in its loop while worker-0 works on: the run must stop at once with
    exit status 1 and an error naming the job, the worker's error and how to resume. If a failed
    worker no longer stopped it, worker-0 would carry the run to its time budget and exit 0."""
    root = pathlib.Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", TRAIN_WITH_A_FAILING_WORKER, "train", str(DATA / "e2e.yaml"),
               "--out", str(tmp_path), "--job-id", "broken", "--max-outer-steps", "1000000",
               "--max-minutes", "3", "--json"]
    # Its own process: Ray forks, which a test process already running JAX threads must not. The
    # repository root on PYTHONPATH: Ray's worker processes import tests.failing_worker.
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.search(r"(?s)error: job broken: a worker failed, so the run stops: .*"
                     r"planted fault: worker-1 cannot sample a task.*--job-id broken", done.stderr), (
        done.stderr[-3000:]
    )
    assert (tmp_path / "runs" / "broken" / "metrics.jsonl").exists()  # it was a real run


@pytest.mark.slow  # default run: test_submit cancels a job (SIGTERM) and finds its checkpoint
def test_interrupted_run_keeps_a_checkpoint_of_every_finished_step(tmp_path):
    """SIGTERM (as a scheduler sends) stops the run cleanly, as Ctrl-C does."""
    command = [sys.executable, "-m", "metaopt.cli", "train", str(DATA / "e2e.yaml"), "--out", str(tmp_path),
               "--job-id", "cut", "--max-outer-steps", "100000", "--json"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr_file:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr_file)
        try:
            metrics = tmp_path / "runs" / "cut" / "metrics.jsonl"
            deadline = time.monotonic() + 120
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            process.kill()
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-2000:]
    assert "resume with --job-id cut" in stderr
    step, _, meta = storage.latest_checkpoint(str(tmp_path / "runs" / "cut" / "checkpoints"))
    steps = [row["step"] for row in read_metrics(metrics)]
    assert step >= 5 and step == len(meta["history"])
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] <= step


@pytest.mark.slow  # default run: test_chaos_learner
def test_a_killed_run_resumes_from_its_last_checkpoint_without_duplicate_steps(tmp_path):
    """SIGKILL to the whole run (learner and Ray workers), then `--job-id` resumes it."""
    checkpoints = tmp_path / "runs" / "crash" / "checkpoints"
    command = [sys.executable, "-m", "metaopt.cli", "train", str(DATA / "e2e.yaml"), "--out", str(tmp_path),
               "--job-id", "crash", "--json"]
    process = subprocess.Popen([*command, "--max-outer-steps", "100000"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while storage.latest_checkpoint(str(checkpoints)) is None:  # e2e.yaml: every 5 s
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    saved_step, _, _ = storage.latest_checkpoint(str(checkpoints))
    metrics = tmp_path / "runs" / "crash" / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) >= saved_step  # steps after the checkpoint are lost

    target = saved_step + 10
    done = subprocess.run([*command, "--max-outer-steps", str(target)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert last_json(done.stdout)["outer_steps"] == target
    steps = [row["step"] for row in read_metrics(metrics)]
    assert steps == list(range(1, target + 1))


@pytest.mark.slow  # default run: test_chaos_services ends on a time budget
def test_a_time_budget_ends_the_run_cleanly_and_publishes_the_optimizer(tmp_path):
    """stop.max_minutes (here `--max-minutes`) stops a run that has outer steps left, as its
    step limit would: exit 0, a final checkpoint, the optimizer in the registry."""
    command = [sys.executable, "-m", "metaopt.cli", "train", str(DATA / "e2e.yaml"), "--out", str(tmp_path),
               "--job-id", "budget", "--max-outer-steps", "1000000", "--max-minutes", "0.25", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json(done.stdout)
    assert 0 < result["outer_steps"] < 1_000_000 and result["artifact"] == "e2e:1"
    assert 15 <= result["wall_s"] < 120
    step, _, _ = storage.latest_checkpoint(str(tmp_path / "runs" / "budget" / "checkpoints"))
    assert step == result["outer_steps"]


@pytest.mark.slow  # default run: test_estimators splits halves across devices
def test_a_worker_with_two_cpus_splits_its_particles_across_two_devices(tmp_path):
    """`workers.cpus: 2` gives the Ray worker process two jax CPU devices (one per core), and
    its estimator runs half of the particle halves on each."""
    spec = (DATA / "e2e.yaml").read_text().replace("workers: {count: 2}", "workers: {count: 1, cpus: 2}")
    assert "cpus: 2" in spec
    (tmp_path / "job.yaml").write_text(spec)
    done = subprocess.run([sys.executable, "-m", "metaopt.cli", "train", str(tmp_path / "job.yaml"),
                           "--out", str(tmp_path), "--job-id", "two-cpus", "--max-outer-steps", "3",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    workers = json.loads((tmp_path / "runs" / "two-cpus" / "workers.json").read_text())
    assert [w["devices"] for w in workers] == [2], workers


# The end of a run on a cluster with less room than workers.count asked for: Ray keeps the
# workers that did not fit pending, and `_collect` must not wait for them.
COLLECT_WITH_AN_UNPLACED_WORKER = """
import json, time
import ray
from metaopt.train import _collect

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=1)
class Worker:
    def run(self):
        return {"worker_id": "worker-0", "accepted": 3}

placed, unplaced = Worker.remote(), Worker.options(resources={"a node that never joins": 1}).remote()
runs = {"worker-0": placed.run.remote(), "worker-1": unplaced.run.remote()}
started = time.monotonic()
heard = _collect(runs, waiting_for={"worker-0"}, timeout_s=120)
heard_s = time.monotonic() - started
print(json.dumps({"heard": heard, "heard_s": heard_s, "all": _collect(runs, timeout_s=1)}))
"""


def test_the_end_of_a_run_waits_only_for_the_workers_connected_at_its_stop():
    """A worker Ray never placed (no node had room) is reported, not waited for: the run ends at
    once, where waiting for every worker would take `_collect`'s whole timeout."""
    done = subprocess.run([sys.executable, "-c", COLLECT_WITH_AN_UNPLACED_WORKER], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json(done.stdout)
    assert report["heard"] == [{"worker_id": "worker-0", "accepted": 3},
                               {"worker_id": "worker-1", "not_connected_at_the_end": True}]
    assert report["heard_s"] < 30  # not the 120 s timeout
    waited_for_all = report["all"]
    assert waited_for_all[0] == {"worker_id": "worker-0", "accepted": 3}
    assert waited_for_all[1]["worker_id"] == "worker-1" and "never placed" in waited_for_all[1]["error"]
