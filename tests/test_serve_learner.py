"""`metaopt serve-learner` runs a job's learner alone; `metaopt worker` processes started
separately join it by address with the job's token (real processes, real gRPC)."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from benchmarks.chaos_head import RAY_ENV, RayNode, worker_processes
from benchmarks.chaos_workers import learner_counts
from metaopt import storage
from tests.jsonout import last_json
from tests.ports import free_port

DATA = pathlib.Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "metaopt.cli"]
LISTENING = re.compile(r"listening on (\S+), metrics at (\S+)")


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f}s for {what}"
        time.sleep(0.2)


def serve(tmp_path, token, job_id: str, steps: int = 3, port: int = 0) -> tuple[subprocess.Popen, str]:
    """A `metaopt serve-learner` process for `steps` outer steps, and the address it listens on
    (its metrics URL is `learner.metrics_url`)."""
    learner = subprocess.Popen(
        [*CLI, "serve-learner", str(DATA / "e2e.yaml"), "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--token-file", str(token), "--out", str(tmp_path), "--job-id", job_id,
         "--max-outer-steps", str(steps), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []  # a resumed job's learner says where it resumed first
    while (line := learner.stderr.readline()) and not (found := LISTENING.search(line)):
        lines.append(line)
    if not line:
        learner.kill()
        raise AssertionError("".join(lines)[-2000:])
    learner.metrics_url = found.group(2)
    return learner, found.group(1)


@pytest.mark.slow  # default run: test_chaos_learner's workers join serve-learner
def test_workers_started_elsewhere_join_a_learner_of_its_own(tmp_path):
    token = tmp_path / "token"
    token.write_text("the-job-token\n")
    (tmp_path / "wrong").write_text("not-the-token")
    learner, address = serve(tmp_path, token, "solo")
    try:
        worker = [*CLI, "worker", str(DATA / "e2e.yaml"), "--learner", address, "--job-id", "solo"]
        refused = subprocess.run([*worker, "--token-file", str(tmp_path / "wrong")], capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 1 and "wrong bearer token" in refused.stderr, refused.stderr[-2000:]
        joined = subprocess.run([*worker, "--token-file", str(token), "--worker-id", "w-1", "--json"],
                                capture_output=True, text=True, timeout=300)
        assert joined.returncode == 0, joined.stderr[-2000:]
        out, err = learner.communicate(timeout=60)
    finally:
        learner.kill()
    assert learner.returncode == 0, err[-2000:]
    summary = last_json(out)
    assert summary["outer_steps"] == 3 and summary["artifact"].startswith("e2e:")
    # 3 outer steps of 2 estimates, and perhaps one more in the batch the job's end dropped.
    assert list(summary["accepted_by_worker"]) == ["w-1"] and summary["accepted_by_worker"]["w-1"] >= 6
    assert last_json(joined.stdout)["accepted"] >= 6
    assert (tmp_path / "runs" / "solo" / "checkpoints").is_dir()


@pytest.mark.slow  # 28 s; default run: test_submit's jobs run Ray worker actors against their learner
def test_ray_workers_join_a_learner_of_its_own(tmp_path):
    """`metaopt workers` (a KubeRay RayJob's entrypoint) starts the job's workers as Ray actors
    (here on a local Ray) that stream to a learner served elsewhere, until it stops them."""
    token = tmp_path / "token"
    token.write_text("the-job-token\n")
    learner, address = serve(tmp_path, token, "fleet")
    try:
        fleet = subprocess.run([*CLI, "workers", str(DATA / "e2e.yaml"), "--learner", address,
                                "--job-id", "fleet", "--token-file", str(token), "--count", "2", "--json"],
                               capture_output=True, text=True, timeout=300)
        assert fleet.returncode == 0, fleet.stderr[-2000:]
        out, err = learner.communicate(timeout=60)
    finally:
        learner.kill()
    assert learner.returncode == 0, err[-2000:]
    report = last_json(fleet.stdout)  # one object, as every --json report: the total and each worker's
    assert len(report["workers"]) == 2 and report["accepted"] == sum(s["accepted"] for s in report["workers"])
    assert report["accepted"] >= 6
    assert last_json(out)["outer_steps"] == 3


def test_workers_outlive_a_killed_driver_and_a_driver_run_again_attaches_to_them(tmp_path):
    """`metaopt workers` (the chart's RayJob driver) runs on the Ray head and dies with it; its
    workers are detached, so that with GCS fault tolerance they outlive a head restart
    (benchmarks/chaos_head.py, slow). Restated on one Ray that stays up: a driver killed with
    SIGKILL leaves its worker delivering, and a worker killed then comes back and delivers with
    no driver to call it; run again, the driver attaches to that worker instead of starting
    another and returns its stats when the learner stops it; the worker then removes itself.
    The learner is restarted with a near stopping rule once the second driver has attached, so
    that the job cannot end before it (a learner restart is what workers ride through anyway)."""
    token = tmp_path / "token"
    token.write_text("the-job-token\n")
    gcs, port = free_port(), free_port()
    head = RayNode(["--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false"], {},
                   tmp_path / "ray-head.log")
    learner, address = serve(tmp_path, token, "orphans", steps=10**6, port=port)
    spec = yaml.safe_load((DATA / "e2e.yaml").read_text())  # a restarted worker compiles from the cache
    spec["workers"]["compile_cache_dir"] = str(tmp_path / "jax-cache")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    driver = [*CLI, "workers", str(tmp_path / "job.yaml"), "--learner", address, "--job-id", "orphans",
              "--token-file", str(token), "--count", "1", "--json"]
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    def accepted() -> float:
        return learner_counts(learner.metrics_url).get("metaopt_gradient_estimates_accepted_total", 0)

    def incarnations() -> float:
        return learner_counts(learner.metrics_url).get("metaopt_worker_incarnations_total", 0)

    try:
        first = subprocess.Popen(driver, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: accepted() >= 2, "the first driver's worker to deliver")
        first.kill()
        first.wait()
        at_kill = accepted()
        wait_for(lambda: accepted() >= at_kill + 4, "the worker to deliver without a driver")
        for pid in worker_processes():  # Ray restarts it, and it works on with no driver to call it
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: incarnations() == 2, "the restarted worker to deliver")
        at_restart = accepted()
        second_log = tmp_path / "second-driver.log"
        with second_log.open("w") as sink:
            second = subprocess.Popen(driver, env=env, stdout=subprocess.PIPE, stderr=sink, text=True)
        wait_for(lambda: "1 of its workers are still running" in second_log.read_text(), "the attach")
        before_second = accepted()
        learner.terminate()  # a checkpoint, then out; the next one resumes it and stops soon after
        err = learner.communicate(timeout=60)[1]
        assert learner.returncode == 130, err[-2000:]
        saved, _, _ = storage.latest_checkpoint(str(tmp_path / "runs" / "orphans" / "checkpoints"))
        learner, _ = serve(tmp_path, token, "orphans", steps=saved + 20, port=port)
        report = last_json(second.communicate(timeout=300)[0])
        assert second.returncode == 0, second_log.read_text()[-2000:]
        err = learner.communicate(timeout=60)[1]
        assert learner.returncode == 0, err[-2000:]
        wait_for(lambda: not worker_processes(), "the worker to remove itself")
    finally:
        learner.kill()
        head.kill()  # not `ray stop`'s graceful drain, which waits up to 30 s
    (stats,) = report["workers"]
    assert stats["accepted"] >= before_second - at_restart  # the restarted incarnation, to the end
    assert stats["reconnects"] >= 1  # the first learner's SIGTERM was not the job's end: no Stop


def test_workers_refuse_half_a_tls_setting(tmp_path):
    base = [*CLI, "workers", str(DATA / "e2e.yaml"), "--learner", "127.0.0.1:1", "--job-id", "x"]
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    for args, message in ((["--tls-cert", cert], "--tls-cert and --tls-key go together"),
                          (["--tls-cert", cert, "--tls-key", key], "--tls-cert needs --tls-ca")):
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
