"""`metaopt serve-learner` runs a job's learner alone; `metaopt worker` processes started
separately join it by address with the job's token (real processes, real gRPC)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from tests.jsonout import last_json

DATA = pathlib.Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "metaopt.cli"]


def serve(tmp_path, token, job_id: str) -> tuple[subprocess.Popen, str]:
    """A `metaopt serve-learner` process for 3 outer steps, and the address it listens on."""
    learner = subprocess.Popen(
        [*CLI, "serve-learner", str(DATA / "e2e.yaml"), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--token-file", str(token), "--out", str(tmp_path), "--job-id", job_id,
         "--max-outer-steps", "3", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = learner.stderr.readline()
    address = re.search(r"listening on (\S+),", line)
    if address is None:
        learner.kill()
        raise AssertionError(line + learner.stderr.read()[-2000:])
    return learner, address.group(1)


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


def test_workers_refuse_half_a_tls_setting(tmp_path):
    base = [*CLI, "workers", str(DATA / "e2e.yaml"), "--learner", "127.0.0.1:1", "--job-id", "x"]
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    for args, message in ((["--tls-cert", cert], "--tls-cert and --tls-key go together"),
                          (["--tls-cert", cert, "--tls-key", key], "--tls-cert needs --tls-ca")):
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
