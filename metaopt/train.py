"""`metaopt train`: a real meta-training run on one machine.

The same parts as on a cluster: the learner's gRPC server (in this process, on 127.0.0.1 and
a free port), N `PESWorker` Ray actors on local Ray, checkpoints under the run directory,
Prometheus metrics on a free port, and the trained optimizer published to the registry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import pathlib
import secrets
import signal
import threading
import time
from importlib import metadata

from metaopt.jobspec import JobSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunResult:
    job_id: str
    outer_steps: int
    meta_loss_first: float
    meta_loss_last: float
    artifact: str  # NAME:VERSION
    registry: str
    run_dir: str
    metrics_url: str
    wall_s: float  # from the learner's start to the workers' stop
    learner_busy_s: float  # time the learner spent validating and applying estimates

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def new_job_id(spec: JobSpec) -> str:
    return f"{spec.name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"


def _code_version() -> str:
    try:
        return metadata.version("metaopt")
    except metadata.PackageNotFoundError:
        return "unknown"


def train(spec: JobSpec, out: str = "runs", job_id: str | None = None,
          progress: bool = True) -> RunResult:
    """Run the job to its stopping rule; resumes if `job_id`'s run directory has a checkpoint."""
    import ray

    from learner.server import make_server
    from workers.actor import start_workers

    _start_ray(spec)  # first: Ray forks its processes, which is unsafe once threads run
    if threading.current_thread() is threading.main_thread():
        # After Ray, which installs its own: SIGTERM (a scheduler's stop, a preemption) ends
        # the run as Ctrl-C does, through the cleanup below that writes the final checkpoint.
        signal.signal(signal.SIGTERM, _interrupt)
    job_id = job_id or new_job_id(spec)
    run = _LearnerRun(spec, out, job_id)
    learner = run.learner
    # A fresh token per run: only this run's workers can submit to its learner.
    token = secrets.token_urlsafe(32)
    # One pool thread per worker stream, plus room for GetTheta calls and reconnects.
    server, port = make_server(learner, "127.0.0.1", 0, token=token)
    metrics_server, metrics_port = learner.metrics.serve("127.0.0.1", 0)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    log.info("job %s: learner on 127.0.0.1:%d, metrics at %s", job_id, port, metrics_url)

    run.checkpointer.start()
    started = time.perf_counter()
    actors, runs = start_workers(spec, f"127.0.0.1:{port}", job_id, token=token)
    try:
        run.follow(runs, progress)
    finally:
        learner.stop()  # θ is final from here on
        wall_s = time.perf_counter() - started
        try:
            run.checkpointer.stop()  # the final checkpoint first, before anything that may be slow
        finally:
            worker_stats = _collect(runs)
            for actor in actors:
                ray.kill(actor)
            server.stop(grace=2).wait()
            metrics_server.shutdown()
    (run.run_dir / "workers.json").write_text(json.dumps(worker_stats, indent=2))
    artifact, registry_uri = run.publish()
    history = learner.history
    return RunResult(
        job_id=job_id, outer_steps=learner.version, meta_loss_first=history[0].meta_loss,
        meta_loss_last=history[-1].meta_loss, artifact=artifact, registry=registry_uri,
        run_dir=str(run.run_dir), metrics_url=metrics_url, wall_s=wall_s, learner_busy_s=learner.busy_s,
    )


class _LearnerRun:
    """What `train` and `serve_learner` share: the run directory, the learner (resumed from
    the run's last checkpoint if there is one), its checkpointer, following the run, and
    publishing the trained optimizer to the registry beside the runs."""

    def __init__(self, spec: JobSpec, out: str, job_id: str):
        import jax

        from learner.checkpointing import Checkpointer
        from learner.core import Learner, LearnerConfig
        from metaopt import optimizers

        self.spec, self.job_id = spec, job_id
        self.out_dir = pathlib.Path(out).resolve()
        self.run_dir = self.out_dir / "runs" / job_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "job.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
        self.optimizer = optimizers.make(spec.optimizer.name, **spec.optimizer.hparams)
        theta0 = self.optimizer.init(jax.random.key(spec.seed))
        self.learner = Learner(LearnerConfig(
            job_id=job_id, max_outer_steps=spec.stop.max_outer_steps, seed=spec.seed,
            outer_learning_rate=spec.outer.learning_rate, clip_norm=spec.outer.clip_norm,
            meta_batch_size=spec.outer.meta_batch_size, max_staleness=spec.outer.max_staleness,
            max_estimate_norm=spec.outer.max_estimate_norm, max_in_flight=spec.outer.max_in_flight,
            task_families=tuple(t.family for t in spec.tasks),
        ), theta0)
        self.checkpointer = Checkpointer(self.learner, str(self.run_dir / "checkpoints"),
                                         spec.checkpoint_interval_s)
        self.resumed_at = self.checkpointer.restore_latest() or 0

    def follow(self, runs, progress: bool) -> None:
        budget_s = self.spec.stop.max_minutes * 60 if self.spec.stop.max_minutes else None
        _follow(self.learner, runs, self.run_dir / "metrics.jsonl", progress, start=self.resumed_at,
                budget_s=budget_s)

    def publish(self) -> tuple[str, str]:
        """Plot the meta-loss and publish θ; (artifact NAME:VERSION, registry URI)."""
        from metaopt import registry

        spec, learner, history = self.spec, self.learner, self.learner.history
        plot_meta_loss(history, self.run_dir / "meta_loss.png", title=self.job_id,
                       normalization=spec.estimator.loss_normalization)
        registry_uri = str(self.out_dir / "registry")
        artifact = registry.publish(
            registry_uri, spec.artifact_name or spec.name, self.optimizer.name,
            dict(self.optimizer.hparams), learner.theta_tree(),
            provenance={
                "job_id": self.job_id, "code_version": _code_version(),
                "task_families": [t.family for t in spec.tasks], "outer_steps": learner.version,
                "meta_loss_first": history[0].meta_loss, "meta_loss_last": history[-1].meta_loss,
                "estimator": spec.estimator.model_dump(), "spec": spec.model_dump(mode="json"),
            },
        )
        return artifact, registry_uri


def serve_learner(spec: JobSpec, out: str, job_id: str, host: str, port: int,
                  token: str | None = None, tls=None, metrics_port: int = 0,
                  on_listening=None, progress: bool = True) -> dict:
    """Run the job's learner alone (as in its own pod): workers elsewhere join it by address
    (`metaopt worker`). Serves until the stopping rule (or SIGTERM), then checkpoints and
    publishes like `train`. `on_listening(address, metrics_url)` is called once it serves."""
    from learner.server import make_server

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    run = _LearnerRun(spec, out, job_id)
    learner = run.learner
    server, bound = make_server(learner, host, port, token=token, tls=tls)
    metrics_server, metrics_bound = learner.metrics.serve(host, metrics_port)
    run.checkpointer.start()
    try:
        if on_listening is not None:
            on_listening(f"{host}:{bound}", f"http://{host}:{metrics_bound}/metrics")
        run.follow([], progress)
    finally:
        learner.stop()
        try:
            run.checkpointer.stop()
        finally:
            server.stop(grace=2).wait()
            metrics_server.shutdown()
    if not learner.history:
        raise RuntimeError(f"job {job_id}: stopped before any outer step; nothing to publish")
    artifact, registry_uri = run.publish()
    return {"job_id": job_id, "outer_steps": learner.version, "artifact": artifact,
            "registry": registry_uri, "run_dir": str(run.run_dir),
            "accepted_by_worker": dict(learner.accepted_by_worker)}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start_ray(spec: JobSpec) -> None:
    import ray

    if not ray.is_initialized():
        # Ray's own start-up notices would only clutter the progress bar; errors still show.
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR,
                 num_cpus=max(os.cpu_count() or 1, int(spec.workers.count * spec.workers.cpus)))


class WorkerFailed(RuntimeError):
    """A worker's loop ended with an error before the job was done."""


def _raise_if_a_worker_failed(runs, job_id: str) -> None:
    if not runs:  # a learner of its own: its workers are not ours to watch
        return
    import ray

    finished, _ = ray.wait(runs, num_returns=len(runs), timeout=0)
    for ref in finished:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            raise WorkerFailed(
                f"job {job_id}: a worker failed, so the run stops: {err}\n"
                f"The last checkpoint is kept; fix the cause and rerun with --job-id {job_id} to resume."
            ) from None


def _follow(learner, runs, metrics_path: pathlib.Path, progress: bool, start: int,
            budget_s: float | None = None) -> None:
    """Show a progress bar and write one metrics.jsonl line per outer step until done, or
    until `budget_s` seconds have passed."""
    from tqdm import tqdm

    total = learner.config.max_outer_steps
    bar = tqdm(total=total, initial=start, desc="outer steps", unit="step", disable=not progress)
    started = time.time()
    # Written anew from the learner's history, which a resume restores: steps done after the
    # last checkpoint of a crashed run are redone, and must not appear twice.
    with metrics_path.open("w") as sink:

        def write(records) -> None:
            sink.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in records)
            sink.flush()

        write(learner.history[:start])
        written = start
        while True:
            finished = learner.done.wait(0.5)
            new = learner.history[written:]
            if new:
                write(new)
                written += len(new)
                estimates = sum(r.estimates for r in learner.history[start:])
                bar.update(len(new))
                bar.set_postfix(meta_loss=f"{new[-1].meta_loss:.4g}",
                                est_per_s=f"{estimates / max(time.time() - started, 1e-9):.1f}")
            if finished and written >= len(learner.history):
                break
            if budget_s is not None and written > start and time.time() - started >= budget_s:
                # At least one outer step (the first may wait for compilation). Stop the learner
                # here, then loop once more so that every step it took reaches metrics.jsonl.
                log.info("stopping: the run's budget of %.1f minutes is spent", budget_s / 60)
                learner.stop()
            _raise_if_a_worker_failed(runs, learner.config.job_id)
    bar.close()


def _collect(runs, timeout_s: float = 60.0) -> list:
    """Wait for the workers to return after the learner's Stop; a stuck one is reported."""
    import ray

    ready, pending = ray.wait(runs, num_returns=len(runs), timeout=timeout_s)
    stats = []
    for ref in ready:
        try:
            stats.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            stats.append({"error": str(err).splitlines()[0]})
    stats += [{"error": f"did not stop within {timeout_s}s"} for _ in pending]
    return stats


def plot_meta_loss(history, path: pathlib.Path, title: str, normalization: str = "initial") -> None:
    """Meta-loss per outer step with a running mean, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array([h.step for h in history])
    losses = np.array([h.meta_loss for h in history])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, ".", alpha=0.35, label="meta-batch")
    if len(losses) >= 5:
        window = max(5, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=2, label=f"running mean ({window})")
    ax.set(xlabel="outer step", ylabel=f"meta-loss ({normalization})", title=title)
    if np.all(losses > 0):  # "initial" and "none"; the "log" meta-loss is mostly negative
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
