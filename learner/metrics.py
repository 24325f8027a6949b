"""The learner's Prometheus metrics, in a registry of its own (several learners may share a
process in tests). Names follow Prometheus conventions: prefix `metaopt_`, base units,
`_total` for counters; labels only from bounded sets (job id, task family, reject reason). The
job's label is `job_id`, not `job`: Prometheus gives every scraped series its own `job` label
(the scrape job), and a clash would rename ours to `exported_job`. The process collector adds
the learner's CPU and memory (`process_cpu_seconds_total`, `process_resident_memory_bytes`).
Per-worker counts stay in the learner (`Learner.accepted_by_worker`): with hundreds of
workers, and a new run id per restart, a worker label would grow without bound."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

if TYPE_CHECKING:
    from metaopt.learner.core import OuterStep


class LearnerMetrics:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.registry = CollectorRegistry()
        r, job = self.registry, ["job_id"]
        ProcessCollector(registry=r)
        self._accepted = Counter(
            "metaopt_gradient_estimates_accepted", "Gradient estimates accepted.",
            ["job_id", "task_family"], registry=r)
        self._rejected = Counter(
            "metaopt_gradient_estimates_rejected", "Gradient estimates rejected, by reason; also "
            "calls refused before an estimate is read (missing_token, wrong_token, undecodable).",
            ["job_id", "reason"], registry=r)
        self._inner_steps = Counter(
            "metaopt_inner_steps", "Inner training steps behind accepted estimates "
            "(both antithetic halves counted).", ["job_id", "task_family"], registry=r)
        self._staleness = Histogram(
            "metaopt_estimate_staleness_versions", "θ versions between an accepted estimate's "
            "θ and the current one.", job, buckets=(0, 1, 2, 4, 8, 16, 32), registry=r)
        self._outer_steps = Counter(
            "metaopt_outer_steps", "Outer (meta) steps applied.", job, registry=r)
        self._meta_loss = Gauge(
            "metaopt_meta_loss", "Mean (normalised) inner loss of the last meta-batch.", job, registry=r)
        self._theta_version = Gauge("metaopt_theta_version", "Current θ version.", job, registry=r)
        self.outer_update_seconds = Histogram(
            "metaopt_outer_update_duration_seconds", "Time to apply one outer update.", job,
            registry=r).labels(job_id)
        self.checkpoint_seconds = Histogram(
            "metaopt_checkpoint_write_duration_seconds", "Time to write one checkpoint.", job,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30), registry=r).labels(job_id)
        self._last_checkpoint = Gauge(
            "metaopt_last_checkpoint_timestamp_seconds", "Unix time of the last committed "
            "checkpoint.", job, registry=r)
        self._workers = Gauge("metaopt_workers_connected", "Open worker streams.", job, registry=r)
        # A worker's start and each restart by Ray is an incarnation with a run id of its own;
        # counted at its first accepted estimate, so restarts that delivered show as increases.
        self._incarnations = Counter(
            "metaopt_worker_incarnations", "Worker incarnations (distinct worker and run id) with "
            "an accepted estimate.", job, registry=r).labels(job_id)
        self._buffered = Gauge(
            "metaopt_buffered_estimates", "Accepted estimates not yet applied in an outer step.",
            job, registry=r)
        self._step_workers = Gauge(
            "metaopt_outer_step_workers", "Distinct workers whose estimates made the last outer "
            "step.", job, registry=r)
        # In-run evaluation (metaopt/inrun_eval.py), labelled by suite: one per job.
        self._eval_win_share = Gauge(
            "metaopt_eval_win_share", "Share of the in-run evaluation suite's tasks on which the last "
            "evaluated checkpoint's θ reached a lower final training loss than the best tuned baseline.",
            ["job_id", "suite"], registry=r)
        self._eval_loss_ratio = Gauge(
            "metaopt_eval_final_loss_ratio", "Geometric mean over the in-run evaluation suite's tasks of "
            "final training loss, last evaluated θ / best tuned baseline (below 1: better than the "
            "baselines; NaN: every run diverged).", ["job_id", "suite"], registry=r)

        # Labelled children of the per-estimate metrics, looked up once (labels() takes a lock
        # and builds a key on every call, which counts at thousands of estimates a second).
        self._per_family: dict[str, tuple] = {}
        self._staleness_child = self._staleness.labels(job_id)
        self._buffered_child = self._buffered.labels(job_id)
        self.workers_connected = 0

    def accepted(self, task_family: str, inner_steps: int, staleness: int) -> None:
        children = self._per_family.get(task_family)
        if children is None:
            children = self._per_family[task_family] = (
                self._accepted.labels(self.job_id, task_family),
                self._inner_steps.labels(self.job_id, task_family))
        children[0].inc()
        children[1].inc(inner_steps)
        self._staleness_child.observe(staleness)

    def incarnation_delivered(self) -> None:
        self._incarnations.inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.job_id, reason.removeprefix("REJECT_REASON_").lower()).inc()

    def buffered(self, estimates: int) -> None:
        self._buffered_child.set(estimates)

    def outer_step(self, step: OuterStep) -> None:
        self._step_workers.labels(self.job_id).set(step.workers)
        self._outer_steps.labels(self.job_id).inc()
        self._meta_loss.labels(self.job_id).set(step.meta_loss)
        self._theta_version.labels(self.job_id).set(step.step)

    def evaluated(self, suite: str, win_share: float, final_loss_ratio: float | None) -> None:
        self._eval_win_share.labels(self.job_id, suite).set(win_share)
        ratio = math.nan if final_loss_ratio is None else final_loss_ratio
        self._eval_loss_ratio.labels(self.job_id, suite).set(ratio)

    def checkpoint_written(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)
        self._last_checkpoint.labels(self.job_id).set(time.time())

    def worker_connected(self, delta: int) -> None:
        # For the job record (the gauge is Prometheus's); only the server's event loop calls this.
        self.workers_connected += delta
        self._workers.labels(self.job_id).inc(delta)

    def serve(self, host: str = "127.0.0.1", port: int = 0):
        """Serve /metrics over HTTP; returns (server, port). Call `server.shutdown()` to stop."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
