"""`metaopt submit | status | logs | cancel | list-jobs` against a real Ray cluster: `ray start
--head` on loopback (with token authentication, Ray's default), driven through the CLI as a
user drives it. The job record comes from a real redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from metaopt import registry, storage
from tests.jsonout import last_json
from tests.ports import free_port
from tests.redis_fixture import RedisServer

DATA = Path(__file__).parent / "data"
PLUGINS = Path(__file__).resolve().parent.parent / "examples" / "plugins"


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(redis: RedisServer):
    """A one-node Ray cluster with 2 CPUs; yields the environment a CLI user of it has."""
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it
    dashboard = f"http://127.0.0.1:{free_port()}"
    # The job store's password reaches the learner as it would on Kubernetes: in the head
    # node's environment (from a Secret), never in the job spec.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_ADDRESS": dashboard, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "METAOPT_REDIS_PASSWORD": redis.password, "METAOPT_JOB_STORE": redis.url_for(redis.user),
           "METAOPT_TEST_RAY_TEMP_DIR": temp_dir}
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed at teardown)
    # Every port Ray would otherwise take at a fixed default: another Ray on this machine (a
    # developer's, a test's) must not make this one's agents fail to start.
    ports = [f"--{name}={free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", *ports,
         "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard.rsplit(":", 1)[1], "--num-cpus", "2",
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        # Ready when its node is alive (the dashboard answers before the raylet registers).
        ready = f"from metaopt.submit import cluster_nodes; assert cluster_nodes({dashboard!r})"
        while subprocess.run([sys.executable, "-c", ready], env=env, capture_output=True).returncode:
            assert head.poll() is None and time.monotonic() < deadline, log_text(temp_dir)
            time.sleep(1)
        yield env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the cluster's processes
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def log_text(temp_dir: str) -> str:
    return (Path(temp_dir) / "ray-start.log").read_text()[-3000:]


def ray_logs(env: dict, chars: int = 1500) -> str:
    """The tails of the cluster's worker and raylet logs: what a failed wait needs to be understood."""
    logs = sorted(Path(env["METAOPT_TEST_RAY_TEMP_DIR"]).glob("session_latest/logs/*"))
    wanted = [p for p in logs if p.name.startswith(("worker-", "raylet.", "job-driver-"))
              and p.stat().st_size]
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in wanted)


def metaopt(env: dict, *args: str, timeout: float = 120, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "metaopt.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def write_spec(path: Path, **changes) -> Path:
    spec = yaml.safe_load((DATA / "e2e.yaml").read_text())
    spec.update({"workers": {"count": 1}, **changes})
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for(env: dict, job_id: str, states: set[str], timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        done = metaopt(env, "status", job_id, "--json")
        assert done.returncode == 0, done.stderr
        row = json.loads(done.stdout)
        if row["status"] in states:
            return row
        if time.monotonic() > deadline:
            learner = (row.get("record") or {}).get("learner") or ":"
            with contextlib.suppress(ValueError, OSError):  # where its threads wait, into its log
                os.kill(int(learner.rsplit(":", 1)[1]), signal.SIGUSR1)
                time.sleep(2)
            raise AssertionError(f"{job_id}: {row}: {metaopt(env, 'logs', job_id).stdout[-6000:]}\n"
                                 f"{ray_logs(env)}")
        time.sleep(2)


def test_a_submitted_job_completes_and_a_cancelled_one_stops_with_a_checkpoint(cluster, tmp_path):
    """The job that completes is a user's with plugins: its modules are only in the user's
    folder, so the job's driver and its worker actor import the copies `submit` uploaded in the
    job's working directory, and the artifact records the plugin optimizer."""
    env = cluster
    store = {"root": str(tmp_path / "store"), "job_store": env["METAOPT_JOB_STORE"]}
    project = plugin_project(tmp_path, storage=store)  # 3 outer steps
    long = write_spec(tmp_path / "long.yaml", stop={"max_outer_steps": 100000}, storage=store,
                      checkpoint_interval_s=1)
    # Both at once: the cluster holds two 1-CPU workers, and the test waits for both together.
    for spec, job_id, cwd in (("job.yaml", "short-1", project), (str(long), "long-1", None)):
        done = metaopt(env, "submit", spec, "--job-id", job_id, cwd=cwd)
        assert done.returncode == 0 and done.stdout.strip() == job_id, done.stderr

    row = wait_for(env, "short-1", {"SUCCEEDED", "FAILED", "STOPPED"})
    logs = metaopt(env, "logs", "short-1").stdout
    assert row["status"] == "SUCCEEDED", logs[-3000:]
    summary = last_json(logs)  # `metaopt train --json`'s last line
    assert summary["outer_steps"] == 3 and summary["artifact"] == "plugin-demo:1"
    manifest = registry.read_manifest(summary["registry"], "plugin-demo", 1)
    assert manifest["optimizer"]["plugin"]["import_path"] == "my_opts:LearnedMomentum"
    record = row["record"]  # what the learner kept in Redis, as `metaopt status` shows it
    assert record["state"] == "SUCCEEDED" and record["theta_version"] == 3, record
    assert record["artifact"] == "plugin-demo:1" and record["spec"]["stop"]["max_outer_steps"] == 3
    assert record["artifact_digest"] == summary["artifact_digest"]
    assert record["artifact_digest"] == registry.digest(summary["registry"], "plugin-demo", 1)
    assert record["last_checkpoint"].endswith("ckpt-000000003")
    text = metaopt(env, "status", "short-1").stdout
    assert "SUCCEEDED" in text and "theta_version: 3" in text

    listed = json.loads(metaopt(env, "list-jobs", "--json").stdout)
    assert {"short-1", "long-1"} <= {r["job_id"] for r in listed}

    cancel_after_a_checkpoint(env, "long-1", tmp_path / "store")


def cancel_after_a_checkpoint(env: dict, job_id: str, store: Path) -> int:
    """Cancel the running job once it has a checkpoint, following its logs meanwhile: it stops
    STOPPED, with a final checkpoint that its record names. Returns the checkpoint's step."""
    checkpoints = str(store / "runs" / job_id / "checkpoints")
    deadline = time.monotonic() + 240
    while storage.latest_checkpoint(checkpoints) is None:
        assert time.monotonic() < deadline, metaopt(env, "logs", job_id).stdout[-3000:]
        time.sleep(1)
    follow = subprocess.Popen([sys.executable, "-m", "metaopt.cli", "logs", job_id, "--follow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = metaopt(env, "cancel", job_id)
    assert done.returncode == 0 and "stopping" in done.stdout, done.stderr
    row = wait_for(env, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, 120)
    assert row["status"] == "STOPPED"
    step, _, meta = storage.latest_checkpoint(checkpoints)
    assert step >= 1 and meta["job_id"] == job_id
    assert row["record"]["state"] == "STOPPED" and row["record"]["theta_version"] == step, row
    followed, _ = follow.communicate(timeout=60)  # --follow ends with the job
    assert follow.returncode == 0 and f"Running entrypoint for job {job_id}" in followed
    return step


# Slow: the default run cancels a job and finds its checkpoint (above); resuming the newest
# checkpoint under the same job id is test_chaos_learner's, fast.
@pytest.mark.slow
def test_a_cancelled_job_submitted_again_resumes_as_a_new_attempt(cluster, tmp_path):
    env = cluster
    store = {"root": str(tmp_path / "store"), "job_store": env["METAOPT_JOB_STORE"]}
    long = write_spec(tmp_path / "long.yaml", stop={"max_outer_steps": 100000}, storage=store,
                      checkpoint_interval_s=1)
    done = metaopt(env, "submit", str(long), "--job-id", "long-2")
    assert done.returncode == 0, done.stderr
    step = cancel_after_a_checkpoint(env, "long-2", tmp_path / "store")

    # The same job id again: a new attempt, which resumes from the last checkpoint.
    done = metaopt(env, "submit", str(long), "--job-id", "long-2", "--max-outer-steps", str(step + 2))
    assert done.returncode == 0 and "long-2-attempt-2" in done.stderr, done.stderr
    row = wait_for(env, "long-2", {"SUCCEEDED", "FAILED", "STOPPED"})
    assert row["submission_id"] == "long-2-attempt-2" and row["status"] == "SUCCEEDED", row
    assert row["record"]["theta_version"] == step + 2 and row["record"]["state"] == "SUCCEEDED"
    summary = last_json(metaopt(env, "logs", "long-2").stdout)
    assert summary["outer_steps"] == step + 2


def test_submit_refuses_a_job_the_cluster_cannot_run_and_starts_nothing(cluster, tmp_path):
    jobs_before = len(json.loads(metaopt(cluster, "list-jobs", "--json").stdout))

    unknown = write_spec(tmp_path / "unknown.yaml", tasks=[{"family": "no_such_family"}])
    done = metaopt(cluster, "submit", str(unknown))
    assert done.returncode == 2 and "no_such_family" in done.stderr

    done = metaopt(cluster, "submit", str(write_spec(tmp_path / "ok.yaml")), "--job-id", "Not Valid")
    assert done.returncode == 2 and "job id 'Not Valid' is invalid" in done.stderr

    nowhere = write_spec(tmp_path / "nowhere.yaml", storage={})
    done = metaopt(cluster, "submit", str(nowhere))
    assert done.returncode == 1 and "storage.root is not set" in done.stderr, done.stderr

    gpus = write_spec(tmp_path / "gpus.yaml", workers={"count": 1, "gpus": 1})
    done = metaopt(cluster, "submit", str(gpus))
    assert done.returncode == 1 and "no node of the cluster has that much" in done.stderr, done.stderr
    assert "0 GPUs" in done.stderr

    unreachable = write_spec(tmp_path / "s3.yaml", storage={"root": "s3://metaopt-missing/runs"})
    env = {**cluster, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1"}
    done = metaopt(env, "submit", str(unreachable))
    assert done.returncode == 1 and "storage.root s3://metaopt-missing/runs is unreachable" in done.stderr

    project = plugin_project(tmp_path)
    (project / "my_opts.py").write_text("LearnedMomentum = 3\n")
    done = metaopt(cluster, "submit", "job.yaml", cwd=project)
    assert done.returncode == 2 and "'my_opts:LearnedMomentum' is a int, not a factory" in done.stderr

    assert len(json.loads(metaopt(cluster, "list-jobs", "--json").stdout)) == jobs_before


def test_cluster_errors_say_what_to_do(cluster, tmp_path):
    no_token = {k: v for k, v in cluster.items() if k != "RAY_AUTH_TOKEN"}
    done = metaopt(no_token, "list-jobs")
    assert done.returncode == 1 and "RAY_AUTH_TOKEN" in done.stderr

    done = metaopt(cluster, "status", "no-such-job")
    assert done.returncode == 1 and "no job no-such-job" in done.stderr and "list-jobs" in done.stderr

    done = metaopt(cluster, "cancel", "no-such-job")
    assert done.returncode == 1 and "no job no-such-job" in done.stderr

    done = metaopt(cluster, "list-jobs", "--address", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "cannot reach the Ray dashboard" in done.stderr

    done = metaopt(cluster, "list-jobs", "--address", "127.0.0.1:8265")
    assert done.returncode == 2 and "http://" in done.stderr


def plugin_project(tmp_path: Path, **changes) -> Path:
    """A user's folder: examples/plugins' two modules and a short job naming them."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("my_tasks.py", "my_opts.py"):
        shutil.copy(PLUGINS / name, project / name)
    spec = yaml.safe_load((PLUGINS / "plugin.yaml").read_text())
    spec.update({"workers": {"count": 1}, "stop": {"max_outer_steps": 3},
                 "storage": {"root": str(tmp_path / "store")}, **changes})
    (project / "job.yaml").write_text(yaml.safe_dump(spec))
    return project


# Slow: test_k8s_submit checks the entrypoint has no shell syntax KubeRay's submitter would take,
# and test_plugins that the bundle a dry run names is the one upload-plugins writes and fetches.
@pytest.mark.slow
def test_a_rayjob_with_plugins_runs_as_kuberay_submits_it(cluster, tmp_path):
    """KubeRay runs a RayJob by a shell command `... ray job submit --runtime-env-json RUNTIME_ENV
    -- ENTRYPOINT ; fi`: the same here, with what `submit --k8s` puts in the RayJob. Its plugins
    are only in the bundle `upload-plugins` wrote to the job's storage, the job's remote
    working_dir (file:// here; Ray fetches s3:// and gs:// the same way), and the bundle the dry
    run names is that one."""
    project = plugin_project(tmp_path)
    done = metaopt(cluster, "upload-plugins", "job.yaml", cwd=project)
    assert done.returncode == 0, done.stderr
    bundle = done.stdout.strip()
    done = metaopt(cluster, "submit", "job.yaml", "--k8s", "--image", "img", "--dry-run", "--job-id",
                   "rayjob-1", cwd=project)
    rayjob = yaml.safe_load(done.stdout)["spec"]
    runtime_env = yaml.safe_load(rayjob["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == bundle
    for module in ("my_tasks.py", "my_opts.py"):
        (project / module).unlink()  # the cluster cannot take them from here
    # KubeRay's submitter command (ray-operator/controllers/ray/common/job.go, GetK8sJobCommand):
    # one shell line, the runtime env Go-quoted, the entrypoint pasted in unquoted.
    ray, address = Path(sys.executable).parent / "ray", cluster["RAY_ADDRESS"]
    command = (f"if {ray} job status --address {address} rayjob-1 >/dev/null 2>&1 ; then {ray} job logs "
               f"--address {address} --follow rayjob-1 ; else {ray} job submit --address {address} "
               f"--runtime-env-json {json.dumps(json.dumps(runtime_env))} --submission-id rayjob-1 -- "
               f"{rayjob['entrypoint']} ; fi")
    submitted = subprocess.run(["bash", "-c", command], env=cluster, capture_output=True, text=True,
                               timeout=300, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    row = wait_for(cluster, "rayjob-1", {"SUCCEEDED", "FAILED", "STOPPED"})
    logs = metaopt(cluster, "logs", "rayjob-1").stdout
    assert row["status"] == "SUCCEEDED", logs[-3000:]
    assert last_json(logs)["outer_steps"] == 3
