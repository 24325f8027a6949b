"""The learner's state machine: θ, the outer optimizer, and meta-batch aggregation.

Transport-free: the gRPC service (`learner.server`) hands it messages. Every accepted
estimate is added into a preallocated float32 accumulator; when `meta_batch_size` of them
are in, the full accumulator goes to the updater thread and the next free one takes its
place, so the outer update (clip, optax Adam, serialising θ once for all readers) stays off
the receive path. There are `max_pending_batches + 1` accumulators: when all are full or in
use, `submit` blocks, which withholds the stream's ack and so the worker's credit (back
pressure through credit, never an unbounded buffer). θ's version is the number of outer
steps; listeners (the open worker streams) hear of each one.

Memory stays bounded over a run of days: the history keeps the last `HISTORY_WINDOW` outer
steps (metrics.jsonl, written as the run goes, keeps them all), job-wide counts are `totals`,
and replay records are kept only while they can matter (`learner.bookkeeping`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt.jobspec import OuterSpec
from metaopt.learner.bookkeeping import Incarnations, Totals
from metaopt.learner.metrics import LearnerMetrics

Reason = pb.RejectReason
# Outer steps kept in memory and in each checkpoint. Readers of the live history poll it far
# more often than this many steps pass (metrics.jsonl every 0.5 s, the job record its last 20);
# at ~300 bytes a step it is ~0.3 MB. The whole run is in metrics.jsonl, and counts in `totals`.
HISTORY_WINDOW = 1024


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """The learner's settings: the job spec's `outer` section (its defaults and checks) and what
    the job adds to it."""

    job_id: str
    max_outer_steps: int
    outer: OuterSpec = OuterSpec()  # the outer optimizer and what estimates it accepts
    max_pending_batches: int = 1  # full meta-batches waiting for or in the outer update
    seed: int = 0
    task_families: tuple[str, ...] = ()  # accepted task families (metric labels); () = any

    def __post_init__(self):
        for name in ("max_outer_steps", "max_pending_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class OuterStep:
    """What one outer step did, for progress bars, metrics.jsonl and plots."""

    step: int
    meta_loss: float  # mean of the meta-batch's estimates' meta-losses (normalised inner losses)
    gradient_norm: float  # before clipping
    estimates: int
    inner_steps: int  # inner steps behind the meta-batch, both antithetic halves counted
    time: float  # unix seconds
    workers: int = 0  # distinct workers whose estimates are in the meta-batch
    # mean meta-loss of the meta-batch's estimates of each task family: families differ in how
    # hard they are, so only per family does a curve show whether the optimizer improves
    family_losses: dict[str, float] = dataclasses.field(default_factory=dict)


def make_outer_optimizer(config: LearnerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.outer.clip_norm), optax.adam(config.outer.learning_rate)
    )


class _Batch:
    """A meta-batch being filled: a preallocated sum of estimates and its bookkeeping."""

    def __init__(self, size: int):
        self.sum = np.zeros(size, np.float32)
        self.clear()

    def clear(self) -> _Batch:
        self.sum.fill(0.0)
        self.count, self.loss_sum, self.inner_steps, self.workers = 0, 0.0, 0, set()
        self.family_loss_sums: Counter[str] = Counter()
        self.family_counts: Counter[str] = Counter()
        return self

    def family_losses(self) -> dict[str, float]:
        return {name: self.family_loss_sums[name] / n for name, n in sorted(self.family_counts.items())}


class Learner:
    """Holds θ (flat float32) and aggregates gradient estimates into outer steps. Thread-safe."""

    def __init__(self, config: LearnerConfig, theta_template, metrics: LearnerMetrics | None = None):
        self.config = config
        self.metrics = metrics or LearnerMetrics(config.job_id)
        self.template = jax.tree.map(np.asarray, theta_template)
        self.structure = wire.theta_structure(theta_template)
        self.digest = wire.structure_digest(self.structure)
        self.size = wire.structure_size(self.structure)
        self._outer = make_outer_optimizer(config)
        self._apply = jax.jit(self._apply_update)

        # One lock for θ, its version, history and the batches; `_batch_free` wakes submitters
        # waiting for an accumulator.
        self._lock = threading.Lock()
        self._batch_free = threading.Condition(self._lock)
        self._busy_lock = threading.Lock()
        self.busy_s = 0.0  # time spent validating, accumulating and updating: the learner's load
        self.theta = jnp.asarray(wire.flatten(theta_template))
        self.outer_state = self._outer.init(self.theta)
        self.version = 0
        self.rng = np.asarray(jax.random.key_data(jax.random.key(config.seed)))
        # The last HISTORY_WINDOW outer steps; read it through `recent_steps`/`steps_after`
        # while the learner runs (a deque may not be iterated while the updater appends).
        self.history: deque[OuterStep] = deque(maxlen=HISTORY_WINDOW)
        self.totals = Totals()
        self._totals_lock = threading.Lock()  # for `totals.rejected`: `reject` may hold `_lock`
        self._incarnations = Incarnations(config.outer.max_staleness)
        self.done = threading.Event()
        self._closing = False  # `stop` has begun: accept nothing more
        self._theta_message = wire.theta_message(np.asarray(self.theta), 0, self.structure)
        self._listeners: list[Callable[[int], None]] = []
        self._filling: _Batch | None = _Batch(self.size)
        self._free = [_Batch(self.size) for _ in range(config.max_pending_batches)]
        self._pending = 0  # full batches queued for or in the updater
        self._committed = 0  # of those, the one whose step is already in `version` (0 or 1)
        self._updates: queue.Queue = queue.Queue()
        self.accepted_by_worker: Counter[str] = Counter()
        self._updater = threading.Thread(target=self._update_loop, daemon=True, name="learner-updater")
        self._updater.start()

    # -- the hot path -------------------------------------------------------------------

    def submit(self, est: pb.GradientEstimate, values: list | None = None) -> pb.Ack:
        """Validate, then accumulate one estimate; returns the ack to send back. `values`, if
        given, replaces `est.values`: a chunked estimate's values, as buffers that each hold
        whole values, in order. Blocks while every accumulator is full."""
        if values is None and est.chunks and est.values:
            # Inline or chunked, never both: chunks that never came cannot vouch for these values.
            return self.reject(est, Reason.REJECT_REASON_BAD_CHUNK,
                               "values inline and chunks announced: send one or the other")
        started = time.perf_counter()
        try:
            return self._submit(est, [est.values] if values is None else values)
        finally:
            self._add_busy(time.perf_counter() - started)

    def reject(self, est: pb.GradientEstimate, reason: int, detail: str) -> pb.Ack:
        """Count a refusal of `est` and return its ack (also for the server's own refusals)."""
        name = Reason.Name(reason)
        with self._totals_lock:
            self.totals.rejected[name] = self.totals.rejected.get(name, 0) + 1
        self.metrics.rejected(name)
        return pb.Ack(sequence=est.sequence, accepted=False, reason=reason, detail=detail,
                      theta_version=self.version)

    def _submit(self, est: pb.GradientEstimate, values) -> pb.Ack:
        reason, detail, parts = self._validate(est, values)
        if reason:
            return self.reject(est, reason, detail)
        with self._lock:
            if self._filling is None and self._wants_estimates():
                wait_started = time.perf_counter()
                while self._filling is None and self._wants_estimates():
                    self._batch_free.wait()
                self._add_busy(wait_started - time.perf_counter())  # waiting is not load
            if not self._wants_estimates():
                detail = ("the job is finished" if self.done.is_set() or self._closing
                          else "the last outer step is full")
                return self.reject(est, Reason.REJECT_REASON_JOB_FINISHED, detail)
            stream = (est.worker_id, est.run_id)
            replay = self._incarnations.refusal(stream, est.sequence, est.theta_version)
            if replay is not None:
                return self.reject(est, Reason.REJECT_REASON_REPLAYED, replay)
            staleness = self.version - est.theta_version
            if staleness > self.config.outer.max_staleness:  # θ may have moved since _validate
                return self.reject(est, Reason.REJECT_REASON_STALE, "θ moved on")
            first_of_incarnation = self._incarnations.accepted(stream, est.sequence, est.theta_version)
            self.totals.estimates_accepted += 1
            self.totals.worker_incarnations += first_of_incarnation
            self.accepted_by_worker[est.worker_id] += 1
            batch = self._filling
            at = 0
            for part in parts:
                np.add(batch.sum[at:at + part.size], part, out=batch.sum[at:at + part.size])
                at += part.size
            batch.count += 1
            batch.loss_sum += est.mean_loss
            batch.inner_steps += est.inner_steps
            batch.workers.add(est.worker_id)
            batch.family_loss_sums[est.task.name] += est.mean_loss
            batch.family_counts[est.task.name] += 1
            if batch.count >= self.config.outer.meta_batch_size:
                self._pending += 1
                self._updates.put(batch)
                self._filling = self._free.pop() if self._free else None
            buffered = self._buffered()
        self.metrics.accepted(est.task.name, est.inner_steps, staleness)
        if first_of_incarnation:
            self.metrics.incarnation_delivered()
        self.metrics.buffered(buffered)
        return pb.Ack(sequence=est.sequence, accepted=True, theta_version=self.version)

    def _wants_estimates(self) -> bool:
        """Whether another estimate can still count in an outer step: once the full batches
        reach `max_outer_steps`, more would be acknowledged and then never applied. Caller
        holds the lock."""
        return (not self._closing and not self.done.is_set()
                and self.version + self._pending - self._committed < self.config.max_outer_steps)

    def _buffered(self) -> int:
        """Accepted estimates not yet applied. Caller holds the lock."""
        filling = self._filling.count if self._filling is not None else 0
        return filling + self._pending * self.config.outer.meta_batch_size

    def _validate(self, est: pb.GradientEstimate, values: list):
        """(reason, detail, the values as float32 arrays, one per buffer of `values`); reason 0
        means valid."""
        if est.job_id != self.config.job_id:
            return Reason.REJECT_REASON_WRONG_JOB, f"this learner serves {self.config.job_id!r}", None
        families = self.config.task_families
        if families and est.task.name not in families:
            detail = f"task family {est.task.name!r} is not in {families}"
            return Reason.REJECT_REASON_INVALID_FIELD, detail, None
        if est.num_particles < 1 or est.inner_steps < 1 or est.sequence < 1:
            detail = (f"num_particles {est.num_particles}, inner_steps {est.inner_steps} and "
                      f"sequence {est.sequence} must be >= 1")
            return Reason.REJECT_REASON_INVALID_FIELD, detail, None
        if est.encoding not in wire.DECODERS:
            return Reason.REJECT_REASON_UNKNOWN_ENCODING, f"encoding {est.encoding}", None
        if est.length != self.size:
            return Reason.REJECT_REASON_WRONG_SHAPE, f"length {est.length}, θ has {self.size}", None
        try:
            parts = wire.decode_parts(values, est.length, est.crc32, est.encoding)
        except ValueError as err:
            bad_checksum = "checksum" in str(err)
            reason = Reason.REJECT_REASON_BAD_CHECKSUM if bad_checksum else Reason.REJECT_REASON_WRONG_SHAPE
            return reason, str(err), None
        # One pass: the squared norm is NaN or Inf iff a value is (or the norm overflows).
        with np.errstate(over="ignore"):  # an overflow is an answer here (norm too large), not a fault
            norm = float(np.sqrt(sum(np.dot(part, part) for part in parts)))
        if not (np.isfinite(norm) and np.isfinite(est.mean_loss)):
            if all(np.isfinite(part).all() for part in parts) and np.isfinite(est.mean_loss):
                detail = f"norm overflows float32 (> {self.config.outer.max_estimate_norm:.3g})"
                return Reason.REJECT_REASON_NORM_TOO_LARGE, detail, None
            return Reason.REJECT_REASON_NON_FINITE, "NaN or Inf in the estimate or its loss", None
        if norm > self.config.outer.max_estimate_norm:
            detail = f"norm {norm:.3g} > {self.config.outer.max_estimate_norm:.3g}"
            return Reason.REJECT_REASON_NORM_TOO_LARGE, detail, None
        version = self.version
        if est.theta_version > version:
            return Reason.REJECT_REASON_FUTURE_VERSION, f"θ version {est.theta_version} > {version}", None
        if version - est.theta_version > self.config.outer.max_staleness:
            return Reason.REJECT_REASON_STALE, f"θ version {est.theta_version}, current {version}", None
        return 0, "", parts

    def _add_busy(self, seconds: float) -> None:
        with self._busy_lock:
            self.busy_s += seconds

    # -- the updater thread -------------------------------------------------------------

    def _update_loop(self) -> None:
        while (batch := self._updates.get()) is not None:
            self._outer_step(batch)

    def _outer_step(self, batch: _Batch) -> OuterStep | None:
        """Apply the mean of a full meta-batch, then give its accumulator back. θ, the outer
        state and the version change only here (and in `restore`), so they are read without
        the lock and committed under it."""
        started = time.perf_counter()
        committed = False
        try:
            if self.done.is_set():
                return None  # the job ended while this batch waited
            theta, outer_state, grad_norm = self._apply(self.theta, self.outer_state, batch.sum,
                                                        np.float32(batch.count))
            version = self.version + 1
            message = wire.theta_message(np.asarray(theta), version, self.structure)
            record = OuterStep(
                step=version, meta_loss=batch.loss_sum / batch.count,
                gradient_norm=float(grad_norm), estimates=batch.count,
                inner_steps=batch.inner_steps, time=time.time(), workers=len(batch.workers),
                family_losses=batch.family_losses(),
            )
            with self._lock:
                if self.done.is_set():
                    return None  # `stop` gave up waiting for this update: history is final
                self.theta, self.outer_state, self.version = theta, outer_state, version
                self._theta_message = message
                self.history.append(record)
                self.totals.estimates_applied += record.estimates
                self.totals.inner_steps_applied += record.inner_steps
                if self.totals.meta_loss_first is None:
                    self.totals.meta_loss_first = record.meta_loss
                self._incarnations.forget(version)
                # Until `finally` gives the batch back, it is both in `version` and in `_pending`:
                # counted twice, the last step would look full and its estimates be refused (a
                # job then stopped one step short, its worker told JOB_FINISHED).
                self._committed, committed = 1, True
                if self.version >= self.config.max_outer_steps:
                    self.done.set()
                    self._batch_free.notify_all()
            self.metrics.outer_update_seconds.observe(time.perf_counter() - started)
            self.metrics.outer_step(record)
            self._notify(record.step)
            return record
        finally:
            with self._lock:
                self._pending -= 1
                self._committed -= committed
                batch.clear()
                if self._filling is None:
                    self._filling = batch
                else:
                    self._free.append(batch)
                self._batch_free.notify_all()
            self._add_busy(time.perf_counter() - started)

    def _apply_update(self, theta, outer_state, grad_sum, count):
        """One dispatch for the whole step (each separate jax call costs tens of µs)."""
        grad = grad_sum / count
        updates, outer_state = self._outer.update(grad, outer_state, theta)
        return optax.apply_updates(theta, updates), outer_state, jnp.linalg.norm(grad)

    # -- readers ------------------------------------------------------------------------

    def theta_message(self) -> pb.Theta:
        """The current θ, serialised once per version."""
        return self._theta_message

    def theta_tree(self):
        with self._lock:
            return wire.unflatten(np.asarray(self.theta), self.template)

    def recent_steps(self, count: int) -> list[OuterStep]:
        """The last `count` outer steps (at most HISTORY_WINDOW), oldest first."""
        with self._lock:
            return list(self.history)[-count:] if count > 0 else []

    def steps_after(self, step: int) -> list[OuterStep]:
        """The outer steps after `step` still in the history window, oldest first."""
        with self._lock:
            newer = []
            for record in reversed(self.history):
                if record.step <= step:
                    break
                newer.append(record)
            return newer[::-1]

    def stream_opened(self, worker_id: str, run_id: str) -> None:
        """A stream of this incarnation opened: its replay record is kept while it is open."""
        with self._lock:
            self._incarnations.opened((worker_id, run_id))

    def stream_closed(self, worker_id: str, run_id: str) -> None:
        """A stream of this incarnation closed: once none is open and its estimates are stale,
        its replay record is dropped (and a replay of them refused all the same)."""
        with self._lock:
            self._incarnations.closed((worker_id, run_id), self.version)

    def connected_workers(self) -> set[str]:
        """Worker ids with a stream open now."""
        with self._lock:
            return {worker for (worker, _), record in self._incarnations.records.items() if record.streams}

    @property
    def replay_records(self) -> int:
        """Worker incarnations whose replay record is held now."""
        with self._lock:
            return len(self._incarnations.records)

    @property
    def accumulators_full(self) -> bool:
        """Whether the next estimate would wait in `submit` for an accumulator."""
        return self._filling is None

    @property
    def pending_batches(self) -> int:
        """Full meta-batches queued for or in the outer update."""
        return self._pending

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until every full meta-batch has been applied (or dropped, if the job ended);
        False on timeout."""
        with self._batch_free:
            return self._batch_free.wait_for(lambda: self._pending == 0, timeout_s)

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """`listener(version)` is called after every outer step (and on stop, with -1)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int], None]) -> None:
        with self._lock:
            self._listeners.remove(listener)

    def _notify(self, version: int) -> None:
        for listener in list(self._listeners):
            listener(version)

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the job. From here on no estimate is accepted, and every accepted one is applied:
        the full meta-batches waiting, then the one being filled, as a smaller last step. Then
        workers are told to stop. Once it returns, θ and history are final. `timeout_s` bounds
        the wait for the outer updates; batches not applied by then are dropped."""
        with self._lock:
            self._closing = True
            last = self._filling
            if last is not None and last.count and not self.done.is_set():
                self._pending += 1
                self._updates.put(last)
                self._filling = None
            self._batch_free.notify_all()  # a submitter waiting for an accumulator is refused now
        self._updates.put(None)  # behind the batches: the updater applies them, then ends
        if threading.current_thread() is not self._updater:
            self._updater.join(timeout_s)
        with self._lock:
            self.done.set()
            self._batch_free.notify_all()
        self._notify(-1)

    def next_worker_seed(self) -> int:
        """A fresh seed for a worker incarnation, drawn from the learner's (checkpointed) RNG."""
        with self._lock:
            key, sub = jax.random.split(jax.random.wrap_key_data(jnp.asarray(self.rng)))
            self.rng = np.asarray(jax.random.key_data(key))
            return int(jax.random.randint(sub, (), 0, 2**31 - 1))

    # -- checkpoints --------------------------------------------------------------------

    def snapshot(self) -> tuple[int, dict[str, np.ndarray], dict]:
        """(step, arrays, meta) of everything needed to resume exactly; copies, so the caller
        may write them without holding the learner."""
        with self._lock:
            leaves = jax.tree.leaves(self.outer_state)
            arrays = {"theta": np.array(self.theta), "rng": np.array(self.rng)}
            arrays |= {f"outer_state/{i}": np.array(x) for i, x in enumerate(leaves)}
            with self._totals_lock:
                totals = self.totals.to_meta()
            meta = {
                "job_id": self.config.job_id, "version": self.version, "structure_digest": self.digest,
                "history": [dataclasses.asdict(h) for h in self.history],  # the window only
                "totals": totals, **self._incarnations.to_meta(),
            }
            return self.version, arrays, meta

    @property
    def worker_incarnations(self) -> int:
        """Distinct (worker, run id) pairs with an accepted estimate over the job: a restarted
        worker is a new incarnation with a new run id. (One whose record was dropped while it was
        away longer than `max_staleness` outer steps counts again when it delivers again.)"""
        with self._lock:
            return self.totals.worker_incarnations

    @staticmethod
    def state_digest(arrays: dict[str, np.ndarray]) -> str:
        """sha256 of a `snapshot()`'s arrays (names, dtypes, shapes and bytes): equal digests mean
        bit-identical state. A checkpoint records it, and a resume checks it."""
        digest = hashlib.sha256()
        for name in sorted(arrays):
            array = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Load a `snapshot()`; a checkpoint of another optimizer or a damaged one is refused."""
        if meta.get("structure_digest") != self.digest:
            raise ValueError(
                "checkpoint θ structure differs from this job's learned optimizer; "
                "resume with the same optimizer settings, or start a new job id"
            )
        leaves, treedef = jax.tree.flatten(self.outer_state)
        expected = {"theta", "rng"} | {f"outer_state/{i}" for i in range(len(leaves))}
        if set(arrays) != expected or "version" not in meta or "history" not in meta:
            raise ValueError("checkpoint does not hold this learner's state (θ, rng, outer state, "
                             "version, history); it was written by another program or version")
        saved = [arrays[f"outer_state/{i}"] for i in range(len(leaves))]
        for new, old in zip([arrays["theta"], *saved], [self.theta, *leaves], strict=True):
            if new.shape != np.shape(old) or new.dtype != np.asarray(old).dtype:
                raise ValueError("checkpoint arrays do not match this learner's θ or outer optimizer")
        with self._lock:
            self.theta = jnp.asarray(arrays["theta"])
            self.outer_state = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in saved])
            self.rng = np.array(arrays["rng"])
            self.version = int(meta["version"])
            history = meta["history"][-HISTORY_WINDOW:]  # an older checkpoint holds every step
            self.history = deque((OuterStep(**h) for h in history), maxlen=HISTORY_WINDOW)
            with self._totals_lock:
                self.totals = Totals.from_meta(meta)
            self._incarnations.restore(meta, self.version)
            if self._filling is not None:
                self._filling.clear()
            self._theta_message = wire.theta_message(np.asarray(self.theta), self.version, self.structure)
            if self.version >= self.config.max_outer_steps:
                self.done.set()
