"""`metaopt train`: a real meta-training run on one machine.

The same parts as on a cluster: the learner's gRPC server (in this process, on 127.0.0.1 and
a free port), N `PESWorker` Ray actors on local Ray, checkpoints under the run directory,
Prometheus metrics on a free port, and the trained optimizer published to the registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import faulthandler
import json
import logging
import os
import pathlib
import secrets
import signal
import threading
import time

from metaopt import datasets, plugins
from metaopt.jobspec import JobSpec, check_runnable

log = logging.getLogger(__name__)
STALL_S = 60.0  # a full meta-batch waiting this long for its outer update is a fault
FINAL_RECORD_TIMEOUT_S = 30.0  # the job store may be away as a run ends: longer than its lease TTL


@dataclasses.dataclass(frozen=True)
class RunResult:
    job_id: str
    outer_steps: int
    meta_loss_first: float
    meta_loss_last: float
    artifact: str  # NAME:VERSION
    registry: str
    artifact_digest: str  # sha256:HEX, its content digest: NAME@sha256:HEX pins exactly this
    run_dir: str
    metrics_url: str
    wall_s: float  # from the learner's start to the workers' stop
    learner_busy_s: float  # time the learner spent validating and applying estimates
    estimates_accepted: int = 0  # every one of them is in exactly one outer step
    worker_incarnations: int = 0  # workers that delivered, a restarted one counted anew

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def new_job_id(spec: JobSpec) -> str:
    return f"{spec.name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"


def train(spec: JobSpec, out: str = "runs", job_id: str | None = None,
          progress: bool = True, metrics_port: int = 0) -> RunResult:
    """Run the job to its stopping rule; resumes if the job has a checkpoint. Prometheus
    metrics are served on `metrics_port` (0: any free port; the URL is logged)."""
    host = _start_ray(spec)  # first: Ray forks its processes, which is unsafe once threads run
    if threading.current_thread() is threading.main_thread():
        # After Ray, which installs its own: SIGTERM (a scheduler's stop, a preemption) ends
        # the run as Ctrl-C does, through the cleanup below that writes the final checkpoint.
        signal.signal(signal.SIGTERM, _interrupt)
        dump_stacks_on_sigusr1()
    check_runnable(spec)  # after Ray (it runs JAX), before anything of the job
    job_id = job_id or new_job_id(spec)
    run = _LearnerRun(spec, out, job_id)
    with run.recorded():
        return _train(run, host, progress, metrics_port)


def _train(run: _LearnerRun, host: str, progress: bool, metrics_port: int) -> RunResult:
    import ray

    from metaopt.learner.server import make_server
    from metaopt.workers.actor import start_workers

    job_id, learner = run.job_id, run.learner
    # A fresh token per run: only this run's workers can submit to its learner.
    token = secrets.token_urlsafe(32)
    listen = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"  # on a cluster, workers are elsewhere
    server, port = make_server(learner, listen, 0, token=token)
    metrics_server, metrics_port = learner.metrics.serve(listen, metrics_port)
    metrics_url = f"http://{host}:{metrics_port}/metrics"
    log.info("job %s: learner on %s:%d, metrics at %s", job_id, host, port, metrics_url)

    run.checkpointer.start()
    started = time.perf_counter()
    actors, runs = start_workers(run.worker_spec, f"{host}:{port}", job_id, token=token)
    try:
        try:
            run.follow(runs, progress)
        finally:
            connected = learner.connected_workers()  # those told to stop, who will return
            learner.stop()  # θ is final from here on
            wall_s = time.perf_counter() - started
            try:
                run.checkpointer.stop()  # the final checkpoint first, before anything that may be slow
            finally:
                worker_stats = _collect(runs, waiting_for=connected)
                for actor in actors.values():
                    ray.kill(actor)
                server.stop(grace=2).wait()
        run.evaluate_final()  # with the workers gone, and /metrics still serving its gauges
    finally:
        run.close_evaluator()
        metrics_server.shutdown()
    (run.run_dir / "workers.json").write_text(json.dumps(worker_stats, indent=2))
    run.check_lease()
    artifact, registry_uri = run.publish()
    return RunResult(
        job_id=job_id, outer_steps=learner.version, meta_loss_first=learner.totals.meta_loss_first,
        meta_loss_last=learner.recent_steps(1)[0].meta_loss, artifact=artifact, registry=registry_uri,
        artifact_digest=run.artifact_digest,
        run_dir=str(run.run_dir), metrics_url=metrics_url, wall_s=wall_s, learner_busy_s=learner.busy_s,
        estimates_accepted=sum(learner.accepted_by_worker.values()),
        worker_incarnations=learner.worker_incarnations,
    )


class _LearnerRun:
    """What `train` and `serve_learner` share: the run directory, the learner (resumed from
    the job's last checkpoint if there is one), its checkpointer, its record in the job store,
    following the run, and publishing the trained optimizer to the registry.

    Local files (metrics.jsonl, plots) go to OUT/runs/JOB_ID; checkpoints and the registry to
    the spec's storage root (default OUT): ROOT/runs/JOB_ID/checkpoints and ROOT/registry."""

    def __init__(self, spec: JobSpec, out: str, job_id: str):
        import jax

        from metaopt.inrun_eval import InRunEvaluator
        from metaopt.jobrecorder import JobRecorder
        from metaopt.jobstore import open_job_store
        from metaopt.learner.checkpointing import Checkpointer
        from metaopt.learner.core import Learner, LearnerConfig
        from metaopt.publishing import installed_code_version
        from metaopt.workers.objective import learnable

        # The outer step waits for its result at once, so asynchronous CPU dispatch gains the
        # learner nothing; and jax on CPU has been seen to hang with it and several threads
        # (jax-ml/jax#25861). The learner's threads (updater, checkpointer, server) all use jax.
        # Read when jax starts its CPU backend: in `train` and `serve-learner`, right below.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        self.spec, self.job_id, self.artifact, self.artifact_digest = spec, job_id, None, None
        self.out_dir = pathlib.Path(out).resolve()
        self.run_dir = self.out_dir / "runs" / job_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.spec_json = spec.model_dump(mode="json")  # for job.json, checkpoints and the job record
        (self.run_dir / "job.json").write_text(json.dumps(self.spec_json, indent=2))
        root = (spec.storage.root or str(self.out_dir)).rstrip("/")
        self.checkpoint_uri, self.registry_uri = f"{root}/runs/{job_id}/checkpoints", f"{root}/registry"
        # Workers that record write their shards under the same root (ROOT/runs/JOB_ID/dataset).
        self.worker_spec = spec.with_overrides(**{"storage.root": root}) if spec.record else spec
        self.learnable = learnable(self.spec_json)  # the optimizer, or the spec's meta_objective
        theta0 = self.learnable.init_theta(jax.random.key(spec.seed))
        self.learner = Learner(LearnerConfig(
            job_id=job_id, max_outer_steps=spec.stop.max_outer_steps, outer=spec.outer, seed=spec.seed,
            task_families=tuple(t.family for t in spec.tasks),
        ), theta0)
        self.lease_lost = None  # the LeaseHeldError, once another learner has taken the job
        # The evaluations' runs go to the workers' recording too.
        record = spec.record and (datasets.recording_uri(root, job_id), spec.record.per_shard)
        self.evaluator = None if spec.eval is None else InRunEvaluator(
            spec.eval, self.run_dir, self.checkpoint_uri, job_id, self.learner.metrics,
            saved_step=lambda: self.checkpointer.last_saved_step, record=record)
        self.checkpointer = Checkpointer(
            self.learner, self.checkpoint_uri, spec.checkpoint_interval_s, keep=spec.checkpoints_kept,
            meta={"spec": self.spec_json, "code_version": installed_code_version()},
            may_write=lambda: self.recorder.holds_lease())
        # The lease before any checkpoint is read: a second learner of the job stops here.
        store = open_job_store(spec.storage.job_store, spec.storage.job_store_prefix)
        self.recorder = JobRecorder(store, job_id, self._progress, on_lease_lost=self._lease_lost).start()
        try:
            self.resumed_at = self.checkpointer.restore_latest() or 0
        except BaseException as err:
            self.recorder.stop(_outcome(err))
            raise

    def _progress(self) -> dict:
        """The job record's progress fields (called from the recorder's thread)."""
        from metaopt import storage

        learner, history = self.learner, self.learner.recent_steps(20)
        span = history[-1].time - history[0].time if len(history) > 1 else 0.0
        saved = self.checkpointer.last_saved_step
        return {
            "spec": self.spec_json, "theta_version": learner.version,
            "max_outer_steps": self.spec.stop.max_outer_steps,
            "meta_loss": history[-1].meta_loss if history else None,
            "estimates_per_second": sum(h.estimates for h in history[1:]) / span if span > 0 else None,
            "workers_alive": learner.metrics.workers_connected,
            "last_checkpoint": None if saved is None else storage.checkpoint_uri(self.checkpoint_uri, saved),
            "registry": self.registry_uri,
        }

    def _lease_lost(self, err) -> None:
        log.error("job %s: %s; this learner stops", self.job_id, err)
        self.lease_lost = err
        self.learner.stop()

    def check_lease(self) -> None:
        """Raise before publishing if another learner took the job: its θ is the job's now."""
        from metaopt.jobrecorder import LeaseLostError

        if self.lease_lost is not None:
            raise LeaseLostError(f"job {self.job_id}: another learner took the job over while this one ran "
                                 f"({self.lease_lost}); this one stopped without a final checkpoint and "
                                 "published nothing")

    @contextlib.contextmanager
    def recorded(self):
        """Closes the job record with the run's outcome: SUCCEEDED with the artifact, STOPPED
        after an interrupt, FAILED with the error."""
        try:
            yield
        except BaseException as err:
            self.recorder.stop(_outcome(err), timeout_s=FINAL_RECORD_TIMEOUT_S)
            raise
        self.recorder.stop({**self._progress(), "state": "SUCCEEDED", "artifact": self.artifact,
                            "artifact_digest": self.artifact_digest}, timeout_s=FINAL_RECORD_TIMEOUT_S)

    def follow(self, runs, progress: bool) -> None:
        budget_s = self.spec.stop.max_minutes * 60 if self.spec.stop.max_minutes else None
        _follow(self.learner, runs, self.metrics_path, progress, start=self.resumed_at,
                budget_s=budget_s, evaluator=self.evaluator)

    def evaluate_final(self) -> None:
        """With in-run evaluation: evaluate the final checkpoint (after the one in flight)."""
        if self.evaluator is not None:
            with self.metrics_path.open("a") as sink:
                sink.writelines(json.dumps(r) + "\n" for r in self.evaluator.finish())

    def close_evaluator(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()

    def publish(self) -> tuple[str, str]:
        """Plot the run from its metrics.jsonl and publish θ: the last, or with `eval.publish:
        best` the best evaluated one; (artifact NAME:VERSION, registry URI)."""
        from metaopt import registry, storage, wire
        from metaopt.publishing import provenance
        from metaopt.run_report import iter_metrics, plot_metrics

        spec, learner, evaluator = self.spec, self.learner, self.evaluator
        plot_metrics(self.metrics_path, self.run_dir / "meta_loss.png", title=self.job_id,
                     normalization=spec.estimator.loss_normalization)
        theta, step, report, extra = learner.theta_tree(), learner.version, None, {}
        if evaluator is not None:
            choice = evaluator.publication(learner.version)
            step, report, extra = choice.step, choice.report, choice.provenance
            if choice.theta is not None:
                theta = wire.unflatten(choice.theta, learner.template)
        # The published step's record, for its meta-loss: `publish: best` may choose one older
        # than the learner's history window, so from metrics.jsonl.
        published = [row for row in iter_metrics(self.metrics_path) if row["step"] == step][-1:]
        artifact = storage.retrying(lambda: registry.publish(
            self.registry_uri, spec.artifact_name or spec.name, self.learnable.name,
            dict(self.learnable.hparams), theta, provenance=provenance(
                spec, self.job_id, published, step, report, meta_loss_first=learner.totals.meta_loss_first,
                **extra), kind=self.learnable.kind,
        ), f"publishing to {self.registry_uri}")
        self.artifact = artifact
        self.artifact_digest = storage.retrying(lambda: registry.digest(
            self.registry_uri, *registry.parse_ref(artifact)), f"reading {artifact}'s digest")
        return artifact, self.registry_uri


def serve_learner(spec: JobSpec, out: str, job_id: str, host: str, port: int,
                  token: str | None = None, tls=None, metrics_port: int = 0,
                  on_listening=None, progress: bool = True, health_port: int | None = None) -> dict:
    """Run the job's learner alone (as in its own pod): workers elsewhere join it by address
    (`metaopt worker`). Serves until the stopping rule (or SIGTERM), then checkpoints and
    publishes like `train`. `on_listening(address, metrics_url)` is called once it serves.
    `health_port`: also serve the health service alone, in plaintext, there."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
        dump_stacks_on_sigusr1()
    check_runnable(spec)
    run = _LearnerRun(spec, out, job_id)
    with run.recorded():
        return _serve(run, host, port, token, tls, metrics_port, on_listening, progress, health_port)


def _serve(run: _LearnerRun, host, port, token, tls, metrics_port, on_listening, progress,
           health_port) -> dict:
    from metaopt.learner.server import make_server, serve_health

    learner, job_id = run.learner, run.job_id
    server, bound = make_server(learner, host, port, token=token, tls=tls)
    health_server = serve_health(host, health_port)[0] if health_port is not None else None
    metrics_server, metrics_bound = learner.metrics.serve(host, metrics_port)
    run.checkpointer.start()
    finished_at = None  # when the job reached its stopping rule, if it did
    try:
        try:
            if on_listening is not None:
                on_listening(f"{host}:{bound}", f"http://{host}:{metrics_bound}/metrics")
            run.follow({}, progress)
            finished_at = time.monotonic()
        finally:
            if finished_at is None:
                # Interrupted (SIGTERM: a pod's restart, a node drain), not finished: the streams
                # are cut before the learner stops, so that its workers hear no Stop and wait for
                # the next learner of the job, which resumes the final checkpoint.
                server.stop(grace=0).wait()
            learner.stop()
            try:
                run.checkpointer.stop()
                if finished_at is not None and learner.version >= learner.config.max_outer_steps:
                    _linger(finished_at)
            finally:
                server.stop(grace=2).wait()
                if health_server is not None:
                    health_server.stop(grace=0).wait()
        run.evaluate_final()
    finally:
        run.close_evaluator()
        metrics_server.shutdown()
    run.check_lease()
    if learner.version == 0:
        raise RuntimeError(f"job {job_id}: stopped before any outer step; nothing to publish")
    artifact, registry_uri = run.publish()
    return {"job_id": job_id, "outer_steps": learner.version, "artifact": artifact,
            "artifact_digest": run.artifact_digest, "registry": registry_uri, "run_dir": str(run.run_dir),
            "accepted_by_worker": dict(learner.accepted_by_worker)}


def run_workers(spec: JobSpec, learner_address: str, job_id: str, token: str | None = None, tls=None,
                count: int | None = None) -> list[dict]:
    """Start the job's workers as Ray actors on the Ray cluster this process is a job of (a
    KubeRay RayJob's entrypoint; else a local Ray) against a learner served elsewhere, and
    wait until the learner stops them. Returns each worker's stats.

    The workers are detached (`start_workers`): this driver runs on the Ray head, and with GCS
    fault tolerance the head can restart while its worker nodes and their actors carry on; the
    learner, elsewhere, keeps θ. Actors this driver owned would die with it even then, and the
    job would lose every worker's inner training to a head restart. Run again, this attaches
    to the workers still alive and starts only the missing ones."""
    import ray

    from metaopt.workers.actor import start_workers

    _start_ray(spec)
    actors, runs = start_workers(spec, learner_address, job_id, count=count, token=token, tls=tls,
                                 detached=True)
    try:
        # Until the first worker returns: the learner told it the job is over. The others
        # then return within a connection, except any Ray never placed (no node had room):
        # those are not waited for beyond `_collect`'s timeout.
        while not ray.wait(list(runs.values()), num_returns=1, timeout=2.0)[0]:
            _raise_if_a_worker_failed(runs, job_id)
        _raise_if_a_worker_failed(runs, job_id)
        return _collect(runs)
    finally:
        for actor in actors.values():
            ray.kill(actor)


def _linger(finished_at: float) -> None:
    """Serve a little after the job finished: a worker that was between connections then (its
    stream cut by a restart of this learner, say) comes back within its backoff and is told to
    stop, instead of retrying forever against a learner that is gone."""
    from metaopt.workers.actor import MAX_BACKOFF_S

    time.sleep(max(0.0, MAX_BACKOFF_S + 1.0 - (time.monotonic() - finished_at)))


def _outcome(err: BaseException) -> dict:
    if isinstance(err, KeyboardInterrupt):
        return {"state": "STOPPED", "error": None}
    return {"state": "FAILED", "error": f"{type(err).__name__}: {err}"}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start_ray(spec: JobSpec) -> str:
    """Join the Ray cluster this process is a job of (`metaopt submit`), or start a local one.
    Returns the host at which the workers will reach the learner."""
    import ray

    # Ray sets RAY_ADDRESS to the cluster's GCS (HOST:PORT) for a job's driver; a user's shell
    # may hold the dashboard's http:// address for `metaopt submit`, which is not a cluster to join.
    cluster = os.environ.get("RAY_ADDRESS", "")
    joining = bool(cluster) and not cluster.startswith(("http://", "https://"))
    if not ray.is_initialized():
        # Ray's own start-up notices would only clutter the progress bar; errors still show.
        if joining:
            ray.init(address=cluster, log_to_driver=False, logging_level=logging.ERROR)
        else:
            # The job's plugins go to every worker as Ray py_modules: workers start elsewhere
            # than this process's directory. (A submitted job's come with its runtime env.)
            runtime_env = {"py_modules": plugins.ray_modules(spec.plugins)} if spec.plugins else None
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, runtime_env=runtime_env,
                     num_cpus=max(os.cpu_count() or 1, int(spec.workers.count * spec.workers.cpus)))
    return ray.util.get_node_ip_address() if joining else "127.0.0.1"


class WorkerFailed(RuntimeError):
    """A worker's loop ended with an error before the job was done."""


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to stderr: where a learner or a worker waits."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _raise_if_a_worker_failed(runs: dict, job_id: str) -> None:
    if not runs:  # a learner of its own: its workers are not ours to watch
        return
    import ray

    finished, _ = ray.wait(list(runs.values()), num_returns=len(runs), timeout=0)
    for ref in finished:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            raise WorkerFailed(
                f"job {job_id}: a worker failed, so the run stops: {err}\n"
                f"The last checkpoint is kept; fix the cause and rerun with --job-id {job_id} to resume."
            ) from None


def _follow(learner, runs, metrics_path: pathlib.Path, progress: bool, start: int,
            budget_s: float | None = None, evaluator=None) -> None:
    """Show a progress bar and write one metrics.jsonl line per outer step until done, or
    until `budget_s` seconds have passed; with an InRunEvaluator, tick it and write its
    evaluations' lines too (metaopt.run_report reads them)."""
    from tqdm import tqdm

    from metaopt.run_report import keep_outer_steps, outer_step_line

    total = learner.config.max_outer_steps
    bar = tqdm(total=total, initial=start, desc="outer steps", unit="step", disable=not progress)
    started = time.time()
    # A resume keeps the file's steps up to its checkpoint (steps done after the last checkpoint
    # of a crashed run are redone, and must not appear twice), then writes the checkpoint's
    # history window from there: a learner resumed without the old run directory has only that.
    written = keep_outer_steps(metrics_path, start)
    with metrics_path.open("a") as sink:

        def write(records) -> None:
            nonlocal written
            if records[0].step > written + 1:
                log.warning("job %s: metrics.jsonl lacks outer steps %d to %d: they are older than the "
                            "learner's history window (a resume without the run's earlier metrics.jsonl)",
                            learner.config.job_id, written + 1, records[0].step - 1)
            sink.writelines(outer_step_line(r) for r in records)
            sink.flush()
            written = records[-1].step

        def write_evaluations(records) -> None:
            sink.writelines(json.dumps(r) + "\n" for r in records)
            sink.flush()

        if restored := [r for r in learner.steps_after(written) if r.step <= start]:
            write(restored)
        if evaluator is not None:
            write_evaluations(evaluator.records)  # a resumed run's earlier evaluations
            evaluator.start()
        estimates, progressed, stall_reported = 0, time.monotonic(), False
        while True:
            finished = learner.done.wait(0.5)
            new = learner.steps_after(written)
            if not new and learner.pending_batches and not stall_reported and \
                    time.monotonic() - progressed > STALL_S:
                log.error("job %s: a full meta-batch has waited %.0f s for its outer update; the "
                          "learner's threads are:", learner.config.job_id, STALL_S)
                faulthandler.dump_traceback(all_threads=True)
                stall_reported = True
            if new:
                progressed = time.monotonic()
                write(new)
                estimates += sum(r.estimates for r in new if r.step > start)
                bar.update(sum(r.step > start for r in new))
                bar.set_postfix(meta_loss=f"{new[-1].meta_loss:.4g}",
                                est_per_s=f"{estimates / max(time.time() - started, 1e-9):.1f}")
            if finished and written >= learner.version:
                break
            if budget_s is not None and written > start and time.time() - started >= budget_s:
                # At least one outer step (the first may wait for compilation). Stop the learner
                # here, then loop once more so that every step it took reaches metrics.jsonl.
                log.info("stopping: the run's budget of %.1f minutes is spent", budget_s / 60)
                learner.stop()
            _raise_if_a_worker_failed(runs, learner.config.job_id)
            if evaluator is not None:
                write_evaluations(evaluator.poll())
    bar.close()


def _collect(runs: dict, waiting_for: set[str] | None = None, timeout_s: float = 60.0) -> list:
    """Each worker's stats once it has returned after the learner's Stop; a stuck one is
    reported. With `waiting_for` (the workers connected at the Stop), the others are not waited
    for: Ray may never place them (no node has room), and one that is starting has nothing to lose."""
    import ray

    waited = {ref: worker_id for worker_id, ref in runs.items()
              if waiting_for is None or worker_id in waiting_for}
    ready, pending = ray.wait(list(waited), num_returns=len(waited), timeout=timeout_s)
    stats = []
    for ref in ready:
        try:
            stats.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            stats.append({"worker_id": waited[ref], "error": str(err).splitlines()[0]})
    stats += [{"worker_id": waited[ref], "error": f"did not return within {timeout_s:.0f}s of the job's end "
               "(stuck, or never placed: no node had room for it)"} for ref in pending]
    return stats + [{"worker_id": worker_id, "not_connected_at_the_end": True}
                    for worker_id in runs if worker_id not in waited.values()]
