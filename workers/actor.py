"""The PES worker: a thin, restartable Ray actor around a pure estimator.

Loop: sample a task from the job's mix, unroll one truncation with the estimator, stream the
estimate to the learner, refresh θ when its version moves; after `task_lifetime`
truncations, sample another task. If the learner is unreachable the worker reconnects with
exponential backoff, keeping its run id (one per actor incarnation) and particle state; an
error that retrying cannot mend (a refused Hello, an internal error) ends the worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import grpc
import jax
import numpy as np

from metaopt import task_zoo, wire
from metaopt._proto import learner_pb2 as pb
from metaopt.jobspec import JobSpec, parse_job_spec
from metaopt.workers.client import ClientTLS, LearnerClient
from metaopt.workers.cores import claim_cores
from metaopt.workers.estimators import make_estimator
from metaopt.workers.objective import learnable
from metaopt.workers.recording import RunRecorder

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
MAX_BACKOFF_S = 5.0  # the longest a worker waits between attempts to reach the learner
LEAVE_AFTER_S = 3.0  # a detached worker removes itself this long after its loop ended


class PESWorker:
    """`token`: the job's bearer token, if the learner wants one; `tls`: how to reach a TLS
    learner; `encoding`: of the estimates on the wire (bfloat16 halves their size);
    `own_process`: this worker is its process's only work (a Ray actor, `metaopt worker`), so
    a CPU worker may pin the process to its cores (the spec's `workers.pin_cores`); `detached`:
    a Ray actor that needs no driver once made (`start_workers`), whose loop starts with it."""

    def __init__(self, spec: dict | JobSpec, learner_address: str, worker_id: str, job_id: str,
                 token: str | None = None, tls: ClientTLS | None = None,
                 encoding: int = pb.ENCODING_FLOAT32_LE, own_process: bool = False, detached: bool = False):
        self.spec = spec if isinstance(spec, JobSpec) else parse_job_spec(spec)
        # Before anything starts jax: its CPU thread pools are sized by the pinning.
        pin = own_process and self.spec.workers.pin_cores and self.spec.workers.gpus == 0
        self.cores = claim_cores(self.spec.workers.cpus) if pin else None
        self.address, self.worker_id, self.job_id = learner_address, worker_id, job_id
        self.token, self.tls, self.encoding = token, tls, encoding
        self.run_id = uuid.uuid4().hex  # new per incarnation: a restart is visible
        self.learnable = learnable(self.spec.model_dump(mode="json"))  # its optimizer, or a meta_objective
        self.template = self.learnable.init_theta(jax.random.key(0))
        self.estimator = make_estimator(**self.spec.estimator.model_dump())
        tasks = self.spec.tasks
        self.mixture = task_zoo.Mixture(
            [task_zoo.family(t.family, **t.kwargs) for t in tasks], [t.weight for t in tasks],
            balance=self.spec.task_balance,
            augmentations=[task_zoo.Augmentation(**t.augment.model_dump()) if t.augment else None
                           for t in tasks],
        )
        self.sequence = 0
        self.stats = {"estimates_sent": 0, "accepted": 0, "rejected": 0, "inner_steps": 0,
                      "reconnects": 0, "compute_s": 0.0, "devices": self.estimator.num_devices,
                      "cores": self.cores.cores if self.cores else None}
        # Particle state outlives connections: a reconnect does not restart inner training.
        self.key = self.task_spec = self.objective = self.particles = None
        self.truncations_left = 0
        self.outcome: dict | BaseException | None = None  # a detached worker's stats, or error
        self.recorder = RunRecorder(self.spec, job_id, worker_id, self.run_id) if self.spec.record else None
        self.loop = None
        if detached:
            self.loop = threading.Thread(target=self._run_then_leave, daemon=True, name="pes-loop")
            self.loop.start()

    def __repr__(self) -> str:
        # Ray shows an actor by its repr (the dashboard, `ray list actors`: `repr_name`).
        return f"PESWorker({self.worker_id})"

    def hello(self) -> pb.Hello:
        digest = wire.structure_digest(wire.theta_structure(self.template))
        return pb.Hello(job_id=self.job_id, worker_id=self.worker_id, run_id=self.run_id,
                        theta_structure_digest=digest)

    def run(self, max_backoff_s: float = MAX_BACKOFF_S, connect_timeout_s: float = 10.0) -> dict:
        """Work until the learner says the job is over; returns this incarnation's stats."""
        backoff = 0.1
        while True:
            try:
                client = LearnerClient(self.address, self.hello(), connect_timeout_s, self.token, self.tls)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise RuntimeError(f"worker {self.worker_id}: learner refused: {err.details()}") from None
                log.warning("learner at %s unavailable (%s); retrying in %.1fs",
                            self.address, err.details(), backoff)
                time.sleep(backoff)
                backoff = min(2 * backoff, max_backoff_s)
                self.stats["reconnects"] += 1
                continue
            backoff = 0.1
            ended = "the learner closed it"
            try:
                self._work(client)
                if client.error is not None:  # the stream itself ended with an error
                    raise client.error
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise RuntimeError(f"worker {self.worker_id}: learner stream failed: "
                                       f"{err.code().name}: {err.details()}") from None
                ended = f"{err.code().name}: {err.details()}"
            finally:
                client.close()
                self.stats["accepted"] += client.accepted
                self.stats["rejected"] += client.rejected
            if client.stopped.is_set():
                if self.recorder is not None:
                    self.recorder.close()
                return {**self.stats, "worker_id": self.worker_id, "run_id": self.run_id}
            log.warning("stream to the learner at %s ended (%s); reconnecting", self.address, ended)
            self.stats["reconnects"] += 1

    def _work(self, client: LearnerClient) -> None:
        if self.key is None:  # the first connection of this incarnation seeds it
            self.key = jax.random.key(client.seed)
        version, theta = client.fetch_theta(self.template)
        while client.alive:
            if client.latest_version > version:
                version, theta = client.fetch_theta(self.template)
            self.key, task_key, init_key, step_key = jax.random.split(self.key, 4)
            if self.truncations_left == 0:
                self.task_spec, self.objective = self._sample_task(task_key)
                self.particles = self.estimator.init(init_key, theta, self.objective)
                self.truncations_left = self.spec.estimator.task_lifetime
            started = time.perf_counter()
            self.particles, grad, metrics = self.estimator.estimate(
                step_key, theta, self.particles, self.objective)
            flat = np.asarray(grad)  # the only host sync: after the whole truncation
            self.stats["compute_s"] += time.perf_counter() - started
            self.truncations_left -= 1
            if self.recorder is not None:
                self.recorder.after_truncation(self.task_spec, self.objective, self.particles, theta, version)
            if not client.send(self._message(flat, version, self.task_spec, float(metrics["mean_loss"]))):
                return
            self.stats["estimates_sent"] += 1
            self.stats["inner_steps"] += self.estimator.inner_steps_per_estimate

    def _sample_task(self, key):
        """A task from the mix, and the objective the estimator differentiates on it (the job's
        optimizer training it, say) over runs of inner_horizon steps."""
        spec = self.mixture.sample(key)
        return spec, self.learnable.objective(task_zoo.task(spec), self.spec.estimator.inner_horizon)

    def wait(self) -> dict:
        """A detached worker's stats once its loop has ended (its error, if it failed). A driver
        that attached to a running worker waits on this; any number of calls may."""
        self.loop.join()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def _run_then_leave(self) -> None:
        """A detached worker's loop: it starts in the constructor, so that a worker Ray restarts
        (its node was lost) works on without a driver to call it. Once the loop has ended, the
        worker removes itself, LEAVE_AFTER_S later (time for the stats to reach a waiting
        driver), so that its CPUs or GPU are freed with or without one."""
        import ray

        try:
            self.outcome = self.run()
        except Exception as err:  # for `wait` to raise in the driver, if there is one
            self.outcome = err
        me = ray.get_runtime_context().current_actor
        threading.Timer(LEAVE_AFTER_S, ray.kill, args=(me,), kwargs={"no_restart": True}).start()

    def _message(self, flat, version, spec, mean_loss) -> pb.GradientEstimate:
        self.sequence += 1
        values, length, crc = wire.encode(flat, self.encoding)
        cfg = self.estimator.config
        return pb.GradientEstimate(
            job_id=self.job_id, worker_id=self.worker_id, run_id=self.run_id,
            sequence=self.sequence, theta_version=version,
            task=pb.TaskSpec(name=spec.name, kwargs_json=json.dumps(dict(spec.kwargs), sort_keys=True)),
            num_particles=cfg.num_particles, inner_steps=self.estimator.inner_steps_per_estimate,
            mean_loss=mean_loss, encoding=self.encoding,
            values=values, length=length, crc32=crc,
        )


def worker_env(spec: JobSpec) -> dict[str, str]:
    """Environment of a worker process. A CPU worker with n ≥ 2 whole CPUs sees them as n jax
    devices, so its estimator runs its particle halves side by side, one share per core:
    1.6x the inner steps/s of one device on 2 cores (XLA's own threads help these small ops
    little). One pinned 1-CPU worker per core does 1.2-1.6x better still (the halves of one
    estimate wait for each other); see benchmarks/worker_throughput.py. With
    `workers.compile_cache_dir`, JAX's persistent compilation cache is shared there."""
    cpus = int(spec.workers.cpus)
    env = {"JAX_NUM_CPU_DEVICES": str(cpus)} if spec.workers.gpus == 0 and cpus >= 2 else {}
    if spec.workers.compile_cache_dir:
        # Programs that took over a second to compile: the inner unrolls, not every small op.
        env.update(JAX_COMPILATION_CACHE_DIR=spec.workers.compile_cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    return env


def actor_options(spec: JobSpec) -> dict:
    """How Ray places and keeps the job's worker actors.

    SPREAD: Ray packs actors onto as few nodes as fit by default, so one lost node would take
    most of a job's workers with it; spread, a node's loss costs its share. `max_restarts=-1`
    and `max_task_retries=-1`: a worker that dies, alone or with its node, comes back as a new
    incarnation wherever there is room, and its loop starts again there. Where no node has
    room, Ray keeps the worker pending until one does (a node joins, or an autoscaler adds
    one): the job runs with the workers that fit, up to `workers.count`."""
    return dict(num_cpus=spec.workers.cpus, num_gpus=spec.workers.gpus, max_restarts=-1,
                max_task_retries=-1, scheduling_strategy="SPREAD",
                runtime_env={"env_vars": worker_env(spec)})


def start_workers(spec: JobSpec, learner_address: str, job_id: str, count: int | None = None,
                  token: str | None = None, tls: ClientTLS | None = None, detached: bool = False):
    """Create `count` PESWorker Ray actors (`actor_options`) and start their loops; returns
    (actors, run futures), each a dict by worker id. Ray must already be initialised.

    `detached`: the workers outlive this driver (Ray's detached actors, named by worker id in
    the namespace `metaopt-JOB`). A driver that dies with the Ray head (a KubeRay head pod
    restarted) does not take them down with it, and a driver started again attaches to the
    workers still alive rather than starting more. Their loops start with them, so that one Ray
    restarts works on without a driver, and they remove themselves once the job is over; a
    driver waits on `PESWorker.wait`. Otherwise they are this driver's, and end with it."""
    import ray

    namespace = f"metaopt-{job_id}"
    if detached:
        running = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]
        if running:
            log.warning("job %s: %d of its workers are still running, from a driver that ended "
                        "without them (the Ray head restarted?): attaching to them", job_id, len(running))

    remote, options = ray.remote(PESWorker), actor_options(spec)
    spec_data = spec.model_dump(mode="json")
    actors, runs = {}, {}
    for worker_id in (f"worker-{i}" for i in range(count or spec.workers.count)):
        if detached:
            options.update(name=worker_id, namespace=namespace, lifetime="detached", get_if_exists=True)
        actor = remote.options(**options).remote(
            spec_data, learner_address, worker_id, job_id, token, tls, own_process=True, detached=detached)
        actors[worker_id] = actor
        runs[worker_id] = (actor.wait if detached else actor.run).remote()
    return actors, runs
