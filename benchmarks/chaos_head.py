"""Head lost: the Ray head of a multi-node cluster killed mid-run, as the chart deploys a job.

The setup is the chart's on one machine. The learner runs outside Ray (`metaopt serve-learner`,
its own pod in the chart), with the job's record in a real Redis. The Ray cluster is a head with
no CPUs and `--nodes` worker nodes, each a `ray start --block` process group on loopback. The
job's driver (`metaopt workers`, the RayJob's entrypoint, which runs on the head) starts
`--workers` workers on the worker nodes. With GCS fault tolerance (the default; KubeRay's
`gcsFaultToleranceOptions`, the chart's `rayCluster.gcsFaultTolerance`) the head's GCS keeps the
cluster's state in that Redis, and the worker nodes wait up to 600 s for it to come back (what
KubeRay sets on worker pods then: RAY_gcs_rpc_server_reconnect_timeout_s).

Once every worker has delivered, the head is lost: SIGKILL to all of it (GCS, raylet, dashboard)
and to the driver on it. For `--outage-s` there is no head. Then a head starts again on the same
address and Redis, as KubeRay restarts the head pod, and the driver is run again, as the RayJob
would be. The run stops on the learner's time budget (`--minutes`).

With fault tolerance the workers are detached actors (`workers.actor.start_workers`): they do not
die with the driver, they deliver through the outage, and the second driver attaches to them
instead of starting more. Without it (`--no-gcs-ft`), the worker nodes' raylets give up once the
old head is gone, taking the workers with them; the second driver starts them all anew, and the
learner, which kept θ, goes on.

Figures: `gcs_fault_tolerance`, `workers_before` (incarnations when the head was killed),
`workers_restarted` (incarnations at the end beyond those: 0 with fault tolerance),
`accepted_during_outage` (estimates the learner accepted while there was no head),
`incarnations_after_outage` (at the second driver's start), `second_driver_attached` (workers
it found running, from its log), `incarnations_at_end`, `head_restart_s` (from the second
head's start until its `ray start` reported it started), `start_attempts` (per node start, in
order: how many tries it took), `restart_to_estimate_s` (without fault tolerance: from the
second driver's start to the learner's first estimate of a new incarnation),
`workers_alive_min_during_outage` and `workers_alive_timeline` (the job record's, as `metaopt
status` shows it), `driver_exit` (the second driver's exit status), `workers_returned` (stats it
printed), `workers_left` (PESWorker processes still running 15 s after the end: none, as the
workers remove themselves), `learner_exit`, `run_finished` (learner and second driver exited
0), `record_state`, `accepted`, `applied`, `accepted_equals_applied`, `outer_steps`,
`phases_done`.

    python benchmarks/chaos_head.py [--quick] [--no-gcs-ft] [--nodes 2] [--cpus-per-node 2] \
        [--workers 3] [--outage-s 20] [--minutes M] [--json] [--out DIR] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests` is not installed: the fixtures below come from the checkout

from benchmarks.chaos_nodes import PHASE_TIMEOUT_S, ray_start, segments  # noqa: E402
from benchmarks.chaos_workers import learner_counts  # noqa: E402
from metaopt.jobstore import PASSWORD_ENV, open_job_store  # noqa: E402
from metaopt.run_report import read_metrics  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.redis_fixture import RedisServer  # noqa: E402

SPEC = ROOT / "tests" / "data" / "e2e.yaml"
JOB = "chaos-head"
KUBERAY_WORKER_RECONNECT_S = "600"  # RAY_gcs_rpc_server_reconnect_timeout_s on KubeRay's worker pods with FT
# Ray's token authentication is off in these clusters: `ray start --head` turns it on when
# ~/.ray/auth_token exists (a local `ray.init()` writes one), and a driver that joins by address
# does not, so the outcome would depend on what ran on the machine before.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
START_ATTEMPTS = 3
ATTACHED = re.compile(r"(\d+) of its workers are still running")
LEAVE_WAIT_S = 15.0  # after the end: detached workers remove themselves 3 s after returning


class RayNode:
    """A Ray node: `ray start … --block` in a process group of its own, so that `kill()` takes
    the whole node down at once, as a lost pod. Every port is a free one, so that nodes on one
    machine do not collide. Returns once the node has started. A start that fails is tried
    again, as KubeRay restarts a pod, up to START_ATTEMPTS times (`attempts` says how many it
    took): with workers busy on both cores, a raylet may give up on its own dashboard agent
    (`chaos_nodes.JoiningNode` says more)."""

    def __init__(self, args: list[str], env: dict, log: pathlib.Path):
        self.args, self.env, self.log, self.attempts = args, env, log, 0
        while True:
            self.attempts += 1
            offset = log.stat().st_size if log.exists() else 0
            self.process = self._start()
            if self._started(offset):
                return
            self.kill()
            if self.attempts == START_ATTEMPTS:
                raise RuntimeError(f"`ray start {' '.join(args[:2])}` failed {self.attempts} times; its log "
                                   f"ends:\n{log.read_text(errors='replace')[-1500:]}")

    def _start(self) -> subprocess.Popen:
        with self.log.open("ab") as sink:  # the child keeps its own descriptor
            return ray_start([*self.args, "--node-ip-address=127.0.0.1"], sink, {**RAY_ENV, **self.env})

    def _started(self, offset: int) -> bool:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.log.open("rb") as log:
                log.seek(offset)
                if b"Ray runtime started" in log.read():
                    return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.3)
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM


def _cli(*args: str, log: pathlib.Path, env: dict) -> subprocess.Popen:
    with log.open("ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "metaopt.cli", *args], stdout=sink,
                                stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env},
                                start_new_session=True)


def worker_processes() -> list[int]:
    """The pids of the PESWorker actors' processes on this machine (Ray titles them by class)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any("PESWorker" in part for part in process.info["cmdline"] or []):
                found.append(process.pid)
    return found


def _attached(driver_log: str) -> int:
    """How many running workers a driver attached to, from its warning (0 without one)."""
    found = ATTACHED.search(driver_log)
    return int(found.group(1)) if found else 0


class HeadChaos:
    """The cluster, the learner, the drivers and the phases; `seen` holds the figures."""

    def __init__(self, workdir: pathlib.Path, nodes: int, cpus_per_node: int, workers: int,
                 gcs_ft: bool, outage_s: float, minutes: float):
        self.workdir, self.nodes, self.cpus, self.workers = workdir, nodes, cpus_per_node, workers
        self.gcs_ft, self.outage_s = gcs_ft, outage_s
        self.redis = RedisServer(workdir / "redis")
        (workdir / "redis").mkdir(parents=True)
        self.gcs_port, self.port, self.metrics_port = free_port(), free_port(), free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        spec = yaml.safe_load(SPEC.read_text())
        spec.update(workers={"count": workers, "pin_cores": False,  # the nodes share the machine's cores
                             "compile_cache_dir": str(workdir / "jax-cache")},
                    stop={"max_outer_steps": 10**9, "max_minutes": minutes},
                    storage={"job_store": self.redis.url_for(self.redis.user)})
        self.spec_path = workdir / "job.yaml"
        self.spec_path.write_text(yaml.safe_dump(spec))
        self.head = self.learner = self.driver = None
        self.drivers = self.heads = 0
        self.worker_nodes: list[RayNode] = []
        self.alive: list[tuple[float, int]] = []  # (time, the record's workers_alive)
        self.latest: dict[str, float] = {}  # the learner's counters, as last read
        self.stopped = threading.Event()
        self.seen: dict = {"gcs_fault_tolerance": gcs_ft, "nodes": nodes, "cpus_per_node": cpus_per_node,
                           "workers": workers, "outage_s": outage_s, "minutes": minutes, "phases_done": False,
                           "start_attempts": []}

    # --- parts ---------------------------------------------------------------------------------
    def start_head(self) -> float:
        """Start the head on the job's GCS port; seconds until it has started."""
        # A temp dir of its own, as a new head pod has its own /tmp: else `ray start --head` finds
        # the old head's address there and, named by the worker nodes' raylets on this machine,
        # takes it for a head still running.
        self.heads += 1
        args = ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=false",
                f"--temp-dir={self.workdir / f'ray-head-{self.heads}'}"]
        env = {}
        if self.gcs_ft:  # as its admin: the GCS keeps its tables under keys of its own
            env["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{self.redis.port}"
            args += ["--redis-username=admin", f"--redis-password={self.redis.admin_password}"]
        started = time.monotonic()
        self.head = RayNode(args, env, self.workdir / "head.log")
        self.seen["start_attempts"].append(self.head.attempts)
        return time.monotonic() - started

    def start_worker_nodes(self) -> None:
        env = {"RAY_gcs_rpc_server_reconnect_timeout_s": KUBERAY_WORKER_RECONNECT_S} if self.gcs_ft else {}
        args = ["--address", f"127.0.0.1:{self.gcs_port}", f"--num-cpus={self.cpus}"]
        for _ in range(self.nodes):
            node = RayNode(args, env, self.workdir / f"node-{len(self.worker_nodes)}.log")
            self.worker_nodes.append(node)
            self.seen["start_attempts"].append(node.attempts)

    def start_driver(self) -> None:
        """`metaopt workers`, as the RayJob runs it on the head."""
        self.drivers += 1
        self.driver = _cli("workers", str(self.spec_path), "--learner", f"127.0.0.1:{self.port}",
                           "--job-id", JOB, "--json", log=self.workdir / f"driver-{self.drivers}.log",
                           env={"RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}", **RAY_ENV})

    def incarnations(self) -> int:
        return int(self.latest.get("metaopt_worker_incarnations_total", 0))

    def accepted(self) -> int:
        return int(self.latest.get("metaopt_gradient_estimates_accepted_total", 0))

    def _until(self, condition, what: str) -> float:
        started = time.monotonic()
        while not condition():
            if self.stopped.wait(0.2) or time.monotonic() - started > PHASE_TIMEOUT_S:
                raise TimeoutError(f"waited {PHASE_TIMEOUT_S:.0f}s for {what}")
        return time.monotonic() - started

    def sample(self, store) -> None:
        """The job record's workers_alive and the learner's counters, twice a second."""
        while not self.stopped.wait(0.5):
            self.latest = learner_counts(self.metrics_url) or self.latest
            with contextlib.suppress(Exception):  # the record is not there yet
                alive = (store.get(JOB) or {}).get("workers_alive")
                if alive is not None:
                    self.alive.append((time.monotonic(), int(alive)))

    # --- the scenario --------------------------------------------------------------------------
    def run(self) -> dict:
        self.redis.start()
        store = open_job_store(self.redis.url)
        try:
            self.learner = _cli("serve-learner", str(self.spec_path), "--host", "127.0.0.1",
                                "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                                "--out", str(self.workdir / "out"), "--job-id", JOB, "--json",
                                log=self.workdir / "learner.log", env={PASSWORD_ENV: self.redis.password})
            self.start_head()
            self.start_worker_nodes()
            threading.Thread(target=self.sample, args=(store,), daemon=True, name="sampler").start()
            try:
                self.phases()
                self.seen["phases_done"] = True
            except Exception as err:  # a figure, not a crash: the run goes on to its end either way
                self.seen["error"] = f"{type(err).__name__}: {err}"
            self.finish(store)
        finally:
            self.stopped.set()
            for process in (self.driver, self.learner):
                if process is not None and process.poll() is None:
                    process.kill()
            for node in [*self.worker_nodes, self.head]:
                if node is not None:
                    node.stop()
            self.redis.stop()
        self.seen["workers_alive_timeline"] = segments(self.alive)
        return self.seen

    def phases(self) -> None:
        seen = self.seen
        self.start_driver()
        self._until(lambda: self.incarnations() >= self.workers, "every worker to deliver")
        seen["workers_before"], accepted_before = self.incarnations(), self.accepted()
        killed_at = time.monotonic()
        self.head.kill()
        self.driver.kill()  # the driver runs on the head
        self.driver.wait()
        self.stopped.wait(self.outage_s)
        seen["accepted_during_outage"] = self.accepted() - accepted_before
        seen["workers_alive_min_during_outage"] = min((a for t, a in self.alive if t > killed_at),
                                                      default=None)
        if not self.gcs_ft:  # a new cluster: its worker pods start again too
            for node in self.worker_nodes:
                node.stop()
            self.worker_nodes = []
        seen["head_restart_s"] = round(self.start_head(), 1)
        if not self.gcs_ft:
            self.start_worker_nodes()
        seen["incarnations_after_outage"] = self.incarnations()
        self.start_driver()
        if not self.gcs_ft:
            seen["restart_to_estimate_s"] = round(self._until(
                lambda: self.incarnations() > seen["incarnations_after_outage"], "a new incarnation"), 1)

    def finish(self, store) -> None:
        """Wait for the learner's budget to end the run, then read the figures."""
        seen = self.seen
        seen["learner_exit"] = self.learner.wait()
        seen["incarnations_at_end"] = self.incarnations()
        try:
            seen["driver_exit"] = self.driver.wait(timeout=PHASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            seen["driver_exit"] = None
        text = (self.workdir / f"driver-{self.drivers}.log").read_text(errors="replace")
        seen["second_driver_attached"] = _attached(text)
        with contextlib.suppress(ValueError, KeyError, IndexError):
            seen["workers_returned"] = len(json.loads(text.strip().splitlines()[-1])["workers"])
        summary = json.loads((self.workdir / "learner.log").read_text().strip().splitlines()[-1])
        accepted = sum(summary["accepted_by_worker"].values())
        metrics = pathlib.Path(summary["run_dir"]) / "metrics.jsonl"
        applied = sum(row["estimates"] for row in read_metrics(metrics))
        seen.update(outer_steps=summary["outer_steps"], accepted=accepted, applied=applied,
                    accepted_equals_applied=accepted == applied,
                    record_state=(store.get(JOB) or {}).get("state"),
                    run_finished=seen["learner_exit"] == 0 and seen["driver_exit"] == 0,
                    workers_restarted=seen["incarnations_at_end"] - seen.get("workers_before", 0))
        self.stopped.wait(LEAVE_WAIT_S)
        seen["workers_left"] = len(worker_processes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3, help="the job's workers.count")
    parser.add_argument("--outage-s", type=float, default=20.0, help="how long the cluster has no head")
    parser.add_argument("--no-gcs-ft", dest="gcs_ft", action="store_false",
                        help="no Redis behind the GCS: the head's restart is a new cluster")
    parser.add_argument("--minutes", type=float, help="the run's time budget (default 5, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the shorter budget")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_head[_no_ft].json here")
    parser.add_argument("--workdir", type=pathlib.Path,
                        help="keep the logs of nodes, drivers and learner here (default: a temporary dir)")
    args = parser.parse_args()
    minutes = args.minutes or (3.0 if args.quick else 5.0)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hd-")))
        result = HeadChaos(workdir, args.nodes, args.cpus_per_node, args.workers, args.gcs_ft,
                           args.outage_s, minutes).run()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "chaos_head.json" if args.gcs_ft else "chaos_head_no_ft.json"
        (args.out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
