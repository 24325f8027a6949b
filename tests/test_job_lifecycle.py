"""A job's life outside one process: its lease and record in a real redis-server, and its
checkpoints in a real S3-compatible store (moto's server), through the real CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metaopt import registry
from metaopt.jobstore import open_job_store
from metaopt.run_report import read_metrics
from tests.jsonout import last_json
from tests.redis_fixture import RedisServer

pytest_plugins = ["tests.s3_fixture"]

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "metaopt.cli"]


def write_spec(path: Path, **changes) -> Path:
    spec = yaml.safe_load((DATA / "e2e.yaml").read_text())
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))
    return path


def start_learner(spec: Path, out: Path, env: dict) -> tuple[subprocess.Popen, str]:
    learner = subprocess.Popen(
        [*CLI, "serve-learner", str(spec), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--out", str(out), "--job-id", "held", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = learner.stderr.readline()
    assert "listening on" in line, line + learner.stderr.read()[-2000:]
    return learner, line


def serve_again(spec: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    command = [*CLI, "serve-learner", str(spec), "--port", "0", "--metrics-port", "0", "--out", str(out),
               "--job-id", "held"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def wait_for(predicate, timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_the_lease_refuses_a_second_learner_and_the_record_survives_a_redis_restart(tmp_path):
    redis = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    env = {**os.environ, "METAOPT_REDIS_PASSWORD": redis.password}
    # No timed checkpoint: the only one would be the final one, which a fenced learner must skip.
    spec = write_spec(tmp_path / "job.yaml", stop={"max_outer_steps": 1000}, checkpoint_interval_s=3600,
                      storage={"job_store": redis.url_for(redis.user)})
    store = open_job_store(redis.url)
    first, _ = start_learner(spec, tmp_path / "a", env)
    try:
        record = store.get("held")
        assert record["state"] == "RUNNING" and record["spec"]["name"] == "e2e", record
        # Not a Ray job (a learner of its own, as the Helm chart runs it): `status` shows the record.
        status = [*CLI, "status", "held", "--address", "http://127.0.0.1:9",
                  "--job-store", redis.url_for(redis.user)]
        shown = subprocess.run(status, capture_output=True, text=True, timeout=120, env=env)
        assert shown.returncode == 0 and "state: RUNNING" in shown.stdout, shown.stderr
        second = serve_again(spec, tmp_path / "b", env)
        assert second.returncode == 1, second.stderr[-2000:]
        holder = rf"job 'held' is already run by learner '.+:{first.pid}'"
        assert re.search(holder, second.stderr), second.stderr
        assert not (tmp_path / "b" / "runs" / "held" / "checkpoints").exists()  # it touched nothing

        redis.stop()  # all data lost, as an unpersisted Redis loses it
        time.sleep(1.0)
        redis.start()
        wait_for(lambda: (store.get("held") or {}).get("state") == "RUNNING", what="the record to come back")
        assert store.get("held")["spec"]["name"] == "e2e"
        again = serve_again(spec, tmp_path / "b", env)
        assert again.returncode == 1 and "already run by" in again.stderr, again.stderr[-2000:]

        # A takeover behind its back (as after a network partition longer than the lease): the
        # first learner finds out at its next renewal and stops without writing anything more.
        redis.admin().set("metaopt:lease:held", "intruder#1", px=60_000)
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 1 and "another learner took the job over" in stderr, stderr[-2000:]
        assert not list((tmp_path / "a" / "runs" / "held" / "checkpoints").glob("ckpt-*"))
    finally:
        first.terminate()
        first.wait(timeout=60)
        redis.stop()


@pytest.mark.slow  # default run: test_chaos_services (a run over S3) and test_s3_storage
def test_a_job_resumes_from_object_storage_wherever_it_starts(s3_bucket, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", storage={"root": f"{s3_bucket}/metaopt"})
    runs = []
    for out, steps in ((tmp_path / "machine-a", 3), (tmp_path / "machine-b", 6)):
        done = subprocess.run([*CLI, "train", str(spec), "--out", str(out), "--job-id", "moving",
                               "--max-outer-steps", str(steps), "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(last_json(done.stdout))
    assert [r["outer_steps"] for r in runs] == [3, 6]
    # Machine b started with an empty --out: steps 1-3 came from the checkpoint in the bucket.
    metrics = tmp_path / "machine-b" / "runs" / "moving" / "metrics.jsonl"
    steps = [row["step"] for row in read_metrics(metrics)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["artifact"] for r in runs] == ["e2e:1", "e2e:2"]
    reg = f"{s3_bucket}/metaopt/registry"
    assert runs[1]["registry"] == reg and registry.list_versions(reg, "e2e") == [1, 2]
    assert registry.load("e2e:2", reg).manifest["provenance"]["outer_steps"] == 6
