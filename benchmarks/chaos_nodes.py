"""Nodes lost: a real multi-node Ray cluster on this machine, and a whole worker node killed mid-run.

The cluster is one head and `--nodes` worker nodes (`ray.cluster_utils.Cluster`: each node its
own raylet, object store and worker processes, all on loopback). The head has no CPUs, as a
KubeRay head is usually given, so workers run only on worker nodes. A `metaopt train` joins the
cluster as a submitted job's driver does (RAY_ADDRESS) and starts `--workers` workers, which
its actor options spread across the nodes (Ray would otherwise pack them). The job's record is
in a real Redis, where `metaopt status` reads it.

Once every worker has delivered an estimate, the node with the most workers is killed as a lost
spot instance would be: SIGKILL to its raylet and to every process it started. Ray restarts the
lost workers as new incarnations where there is room; the rest wait, pending. Once those that
fit have delivered, a new node joins, and the waiting workers are placed on it. Every step
waits on the learner's own record (`metaopt_worker_incarnations_total` on its `/metrics`), not
on the clock; the run itself stops on its time budget (`--minutes`), which the scenario must fit
in: on 2 cores that is the timing-sensitive part, and why its test is in the slow suite.

Figures: `node_kills`, `workers_lost` (on the killed node), `restarted_on_survivors`,
`placed_on_new_node`, `join_attempts` (starts of the joining node until it registered) and
`join_registered_s` (from the first start), the job
record's `workers_alive` as sampled (`workers_alive_before_kill`, `_min_after_kill`,
`_after_kill_settled`, `_after_join`, and `workers_alive_timeline` as [value, seconds] segments),
`placements` (each worker's node and state, by snapshot), `run_finished`, `record_state`,
`accepted`, `applied`, `accepted_equals_applied`, `worker_incarnations`, `phases_done` (every
phase finished within the run's budget), `kill_to_first_restart_s` and `join_to_its_worker_s`
(from the kill, and from the join, to the learner's first estimate of the worker placed there).

    python benchmarks/chaos_nodes.py [--quick] [--nodes 3] [--cpus-per-node 2] [--workers 5] \
        [--minutes M] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
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

from benchmarks.chaos_workers import learner_counts  # noqa: E402
from metaopt.jobspec import parse_job_spec  # noqa: E402
from metaopt.jobstore import PASSWORD_ENV, open_job_store  # noqa: E402
from metaopt.run_report import read_metrics  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.redis_fixture import RedisServer  # noqa: E402

SPEC = ROOT / "tests" / "data" / "e2e.yaml"
# The GCS declares a node dead after `health_check_failure_threshold` missed checks
# `health_check_period_ms` apart: by default 5 x 3 s. Shorter here, so that the scenario fits a
# short run on 2 cores; what happens after is the same.
HEAD_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
               "health_check_initial_delay_ms": 0}
PHASE_TIMEOUT_S = 180.0  # a phase that takes longer than this has failed
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # what ray.cluster_utils gives each of its nodes
JOIN_ATTEMPTS = 3


def start_cluster(nodes: int, cpus_per_node: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
        "_system_config": HEAD_CONFIG})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node)
    return cluster


def kill_node(cluster, node) -> int:
    """SIGKILL a node's raylet and every process under it (its workers, their helpers), at once,
    as a node that loses power; then drop it from the cluster's bookkeeping. Returns how many
    processes were killed."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    victims = [raylet, *raylet.children(recursive=True)]
    for process in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    with contextlib.suppress(Exception):  # its processes are gone already; this only forgets them
        cluster.remove_node(node, allow_graceful=False)
    return len(victims)


def ray_start(args: list[str], log, env: dict | None = None) -> subprocess.Popen:
    """`ray start ARGS --block` in a process group of its own (`os.killpg` takes the whole node
    down), output to the open file `log`. Every port is a free one, so that nodes on one
    machine do not collide."""
    ports = [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        *(["ray-client-server-port"] if "--head" in args else []))]
    return subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "ray"), "start", *args, "--block", *ports,
         # The other nodes' object store size (cluster_utils'), not 30% of the machine's memory.
         f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # How long `ray start` waits for its raylet to register before it gives up.
        env={**os.environ, "RAY_raylet_start_wait_time_s": "60", **(env or {})})


class JoiningNode:
    """A worker node started later by `ray start --address … --block`, as a new machine (or a
    KubeRay worker pod) joins; its own process group, so that `stop()` takes all of it down.
    (Not `Cluster.add_node`, which must run in the main thread, where `train` runs here.)

    With the run's workers busy on both cores, the new raylet often gives up on its own dashboard
    agent, which then needs about 18 s to start, and exits: Ray's raylet waits 15 s for the
    agent's ports (`WaitForDashboardAgentPorts`; `agent_register_timeout_ms` does not lengthen it
    in this Ray), and 5 of the first 8 joins here crashed so. KubeRay would restart such a pod;
    so does this, up to `JOIN_ATTEMPTS` times. `attempts` says how many it took, `seconds` how
    long until the node registered."""

    def __init__(self, address: str, cpus: int, log: pathlib.Path):
        import ray

        known = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        self.log, self.attempts = log.open("w"), 0
        started = time.monotonic()
        deadline = started + PHASE_TIMEOUT_S
        while True:
            self.attempts += 1
            self.process, raylet_seen = self._start(address, cpus), False
            while not (new := {n["NodeID"] for n in ray.nodes() if n["Alive"]} - known):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    break
                raylet_up = self._raylet_running()
                if raylet_seen and not raylet_up:
                    break  # it crashed: `ray start` would notice only after its own wait
                raylet_seen |= raylet_up
                time.sleep(0.5)
            if new:
                self.node_id, self.seconds = new.pop(), time.monotonic() - started
                return
            if self.attempts == JOIN_ATTEMPTS or time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the joining node did not register in {self.attempts} attempts (exit "
                                   f"status {self.process.poll()}); its log:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")
            self.stop(close=False)

    def _raylet_running(self) -> bool:
        try:
            processes = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:  # `ray start` itself has ended
            return False
        for process in processes:
            with contextlib.suppress(psutil.Error):  # a helper that ended meanwhile
                if process.name() == "raylet":
                    return True
        return False

    def _start(self, address: str, cpus: int) -> subprocess.Popen:
        return ray_start(["--address", address, "--num-cpus", str(cpus)], self.log)

    def stop(self, close: bool = True) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # `ray start --block` stops its processes
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if close:
            self.log.close()


def placements() -> dict[str, dict]:
    """Each PES worker actor's node and state, by worker id (Ray's state API; the actors name
    themselves in their repr)."""
    from ray.util.state import list_actors

    found = {}
    for actor in list_actors(filters=[("class_name", "=", "PESWorker")], detail=True, limit=1000):
        worker = (actor.repr_name or "").removeprefix("PESWorker(").removesuffix(")") or actor.actor_id
        found[worker] = {"node": actor.node_id, "state": actor.state}
    return found


class NodeChaos(threading.Thread):
    """The scenario's phases, each waiting on the learner's record; `seen` holds the figures."""

    def __init__(self, cluster, workers: int, cpus_per_node: int, metrics_url: str, store, job_id: str,
                 workdir: pathlib.Path):
        super().__init__(daemon=True, name="node-chaos")
        self.cluster, self.workers, self.cpus_per_node = cluster, workers, cpus_per_node
        self.workdir, self.joined = workdir, None
        self.metrics_url, self.store, self.job_id = metrics_url, store, job_id
        self.stopped = threading.Event()
        self.alive: list[tuple[float, int]] = []  # (time, the record's workers_alive)
        self.seen: dict = {"phases_done": False, "placements": {}}

    def incarnations(self) -> int:
        return int(learner_counts(self.metrics_url).get("metaopt_worker_incarnations_total", 0))

    def wait_for(self, incarnations: int) -> float:
        """Seconds until the learner has accepted estimates from `incarnations` incarnations."""
        started = time.monotonic()
        while self.incarnations() < incarnations:
            if self.stopped.wait(0.2) or time.monotonic() - started > PHASE_TIMEOUT_S:
                raise TimeoutError(f"{incarnations} incarnations never delivered")
        return time.monotonic() - started

    def sample_alive(self) -> None:
        while not self.stopped.wait(0.5):
            with contextlib.suppress(Exception):  # the record is not there yet
                alive = (self.store.get(self.job_id) or {}).get("workers_alive")
                if alive is not None:
                    self.alive.append((time.monotonic(), int(alive)))

    def run(self) -> None:
        threading.Thread(target=self.sample_alive, daemon=True, name="record-sampler").start()
        try:
            self.phases()
            self.seen["phases_done"] = True
        except Exception as err:  # a figure, not a crash: the run goes on to its end either way
            self.seen["error"] = f"{type(err).__name__}: {err}"

    def phases(self) -> None:
        seen = self.seen
        self.wait_for(self.workers)
        before = placements()
        seen["placements"]["before_kill"] = before
        by_node = collections.Counter(p["node"] for p in before.values() if p["state"] == "ALIVE")
        victim_id, lost = by_node.most_common(1)[0]
        victim = next(n for n in self.cluster.worker_nodes if n.node_id == victim_id)
        # Room left on the surviving nodes, every worker being alive before the kill.
        free = (len(self.cluster.worker_nodes) - 1) * self.cpus_per_node - (self.workers - lost)
        fits = min(lost, free)
        seen["workers_alive_before_kill"] = self.alive[-1][1] if self.alive else None
        killed_at = time.monotonic()
        seen.update(node_kills=1, workers_lost=lost, processes_killed=kill_node(self.cluster, victim),
                    killed_node=victim_id)

        seen["kill_to_first_restart_s"] = round(self.wait_for(self.workers + 1), 1) if fits else None
        self.wait_for(self.workers + fits)
        after = placements()
        seen["placements"]["after_kill"] = after
        seen["restarted_on_survivors"] = sum(
            1 for w, p in after.items() if before[w]["node"] == victim_id and p["state"] == "ALIVE")
        seen["alive_on_killed_node"] = sum(p["node"] == victim_id and p["state"] == "ALIVE"
                                           for p in after.values())
        self.stopped.wait(3.0)  # two of the record's 2 s writes: workers_alive has settled
        seen["workers_alive_min_after_kill"] = min((a for t, a in self.alive if t > killed_at), default=None)
        seen["workers_alive_after_kill_settled"] = self.alive[-1][1] if self.alive else None

        self.joined = JoiningNode(self.cluster.address, self.cpus_per_node, self.workdir / "joining-node.log")
        seen.update(new_node=self.joined.node_id, join_attempts=self.joined.attempts,
                    join_registered_s=round(self.joined.seconds, 1))
        seen["join_to_its_worker_s"] = round(self.wait_for(self.workers + lost), 1)
        end = placements()
        seen["placements"]["after_join"] = end
        seen["placed_on_new_node"] = sum(p["node"] == self.joined.node_id and p["state"] == "ALIVE"
                                         for p in end.values())
        self.stopped.wait(3.0)
        seen["workers_alive_after_join"] = self.alive[-1][1] if self.alive else None


def run(workdir: pathlib.Path, nodes: int, cpus_per_node: int, workers: int, minutes: float) -> dict:
    import ray

    from metaopt.train import train

    redis = RedisServer(workdir / "redis")
    (workdir / "redis").mkdir(parents=True)
    redis.start()
    cluster = start_cluster(nodes, cpus_per_node)
    job_id, metrics_port = "chaos-nodes", free_port()
    spec = yaml.safe_load(SPEC.read_text())
    spec.update(workers={"count": workers, "pin_cores": False,  # nodes here share the machine's cores
                         "compile_cache_dir": str(workdir / "jax-cache")},
                stop={"max_outer_steps": 10**9, "max_minutes": minutes},
                storage={"job_store": redis.url_for(redis.user)})
    store = open_job_store(redis.url)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    chaos = NodeChaos(cluster, workers, cpus_per_node, metrics_url, store, job_id, workdir)
    figures: dict = {"nodes": nodes, "cpus_per_node": cpus_per_node, "workers": workers, "minutes": minutes,
                     "run_finished": False}
    os.environ.update(RAY_ADDRESS=cluster.address, **{PASSWORD_ENV: redis.password})
    try:
        chaos.start()
        result = train(parse_job_spec(spec), out=str(workdir / "out"), job_id=job_id, progress=False,
                       metrics_port=metrics_port)
        run_dir = pathlib.Path(result.run_dir)
        applied = sum(row["estimates"] for row in read_metrics(run_dir / "metrics.jsonl"))
        record = store.get(job_id) or {}
        final = json.loads((run_dir / "workers.json").read_text())
        figures.update(run_finished=result.outer_steps > 0, outer_steps=result.outer_steps,
                       accepted=result.estimates_accepted, applied=applied,
                       accepted_equals_applied=result.estimates_accepted == applied,
                       worker_incarnations=result.worker_incarnations, record_state=record.get("state"),
                       workers_reported=len(final))
    finally:
        chaos.stopped.set()
        chaos.join(timeout=10)
        if chaos.joined is not None:
            chaos.joined.stop()
        ray.shutdown()
        cluster.shutdown()
        redis.stop()
    figures.update(chaos.seen)
    figures["workers_alive_timeline"] = segments(chaos.alive)
    return figures


def segments(samples: list[tuple[float, int]]) -> list[list]:
    """[[value, seconds it held], ...] of (time, value) samples: the record's workers_alive as
    it changed."""
    runs: list[list] = []
    for (t, value), (t_next, _) in zip(samples, [*samples[1:], samples[-1]], strict=True):
        if runs and runs[-1][0] == value:
            runs[-1][1] += t_next - t
        else:
            runs.append([value, t_next - t])
    return [[value, round(seconds, 1)] for value, seconds in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="worker nodes at the start")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--workers", type=int, default=5, help="the job's workers.count")
    parser.add_argument("--minutes", type=float, help="the run's time budget (default 8, 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the shorter budget")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_nodes.json here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-nodes-") as workdir:
        minutes = args.minutes or (5.0 if args.quick else 8.0)
        result = run(pathlib.Path(workdir), args.nodes, args.cpus_per_node, args.workers, minutes)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_nodes.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
