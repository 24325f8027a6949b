"""The learner's state machine: θ, the outer optimizer, and meta-batch aggregation.

Transport-free: the gRPC service (`learner.server`) hands it decoded messages. Every accepted
estimate is added into one preallocated float32 accumulator; when `meta_batch_size` of them
are in, their mean is clipped and applied with optax Adam, θ's version moves by one, and
listeners (the open worker streams) hear of it. θ's version is the number of outer steps.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from learner.metrics import LearnerMetrics
from metaopt import wire
from metaopt._proto import learner_pb2 as pb

Reason = pb.RejectReason


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    job_id: str
    max_outer_steps: int
    outer_learning_rate: float = 1e-3
    clip_norm: float = 1.0  # global-norm clip of each averaged meta-gradient
    meta_batch_size: int = 4  # estimates averaged per outer step
    max_staleness: int = 2  # accept estimates computed at most this many versions ago
    max_estimate_norm: float = 1e6  # larger estimates are rejected as poisoned
    max_in_flight: int = 2  # unacknowledged estimates a worker may have
    seed: int = 0
    task_families: tuple[str, ...] = ()  # accepted task families (metric labels); () = any

    def __post_init__(self):
        for name in ("max_outer_steps", "meta_batch_size", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0 or not (self.clip_norm > 0 and self.max_estimate_norm > 0):
            raise ValueError(f"need max_staleness >= 0, clip_norm > 0, max_estimate_norm > 0: {self}")


@dataclasses.dataclass(frozen=True)
class OuterStep:
    """What one outer step did, for progress bars, metrics.jsonl and plots."""

    step: int
    meta_loss: float  # mean of the meta-batch's estimates' meta-losses (normalised inner losses)
    gradient_norm: float  # before clipping
    estimates: int
    inner_steps: int  # inner steps behind the meta-batch, both antithetic halves counted
    time: float  # unix seconds


def make_outer_optimizer(config: LearnerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm), optax.adam(config.outer_learning_rate)
    )


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

        self._lock = threading.Lock()
        self._busy_lock = threading.Lock()
        self.busy_s = 0.0  # time spent in submit(), all streams together: the learner's load
        self.theta = jnp.asarray(wire.flatten(theta_template))
        self.outer_state = self._outer.init(self.theta)
        self.version = 0
        self.rng = np.asarray(jax.random.key_data(jax.random.key(config.seed)))
        self.history: list[OuterStep] = []
        self.done = threading.Event()
        self._reset_batch()
        self._theta_message = wire.theta_message(np.asarray(self.theta), 0, self.structure)
        self._listeners: list[Callable[[int], None]] = []

    # -- the hot path -------------------------------------------------------------------

    def submit(self, est: pb.GradientEstimate) -> pb.Ack:
        """Validate, then accumulate one estimate. Returns the ack to send back."""
        started = time.perf_counter()
        try:
            return self._submit(est)
        finally:
            with self._busy_lock:
                self.busy_s += time.perf_counter() - started

    def _submit(self, est: pb.GradientEstimate) -> pb.Ack:
        reason, detail, flat = self._validate(est)
        if reason:
            self.metrics.rejected(Reason.Name(reason))
            return pb.Ack(sequence=est.sequence, accepted=False, reason=reason, detail=detail)
        finished = None
        with self._lock:
            if self.done.is_set():
                self.metrics.rejected(Reason.Name(Reason.REJECT_REASON_JOB_FINISHED))
                return pb.Ack(sequence=est.sequence, accepted=False,
                              reason=Reason.REJECT_REASON_JOB_FINISHED, detail="the job is finished")
            staleness = self.version - est.theta_version
            if staleness > self.config.max_staleness:  # θ may have moved since _validate
                self.metrics.rejected(Reason.Name(Reason.REJECT_REASON_STALE))
                return pb.Ack(sequence=est.sequence, accepted=False,
                              reason=Reason.REJECT_REASON_STALE, detail="θ moved on")
            np.add(self._sum, flat, out=self._sum)
            self._count += 1
            self._loss_sum += est.mean_loss
            self._inner_steps += est.inner_steps
            if self._count >= self.config.meta_batch_size:
                finished = self._outer_step()
        self.metrics.accepted(est.task.name, est.inner_steps, staleness)
        if finished is not None:
            self.metrics.outer_step(finished)
            self._notify(finished.step)
        return pb.Ack(sequence=est.sequence, accepted=True)

    def _validate(self, est: pb.GradientEstimate):
        """(reason, detail, flat values); reason 0 means valid."""
        if est.job_id != self.config.job_id:
            return Reason.REJECT_REASON_WRONG_JOB, f"this learner serves {self.config.job_id!r}", None
        families = self.config.task_families
        if families and est.task.name not in families:
            detail = f"task family {est.task.name!r} is not in {families}"
            return Reason.REJECT_REASON_INVALID_FIELD, detail, None
        if est.num_particles < 1 or est.inner_steps < 1:
            detail = f"num_particles {est.num_particles} and inner_steps {est.inner_steps} must be >= 1"
            return Reason.REJECT_REASON_INVALID_FIELD, detail, None
        if est.encoding != pb.ENCODING_FLOAT32_LE:
            return Reason.REJECT_REASON_UNKNOWN_ENCODING, f"encoding {est.encoding}", None
        if est.length != self.size:
            return Reason.REJECT_REASON_WRONG_SHAPE, f"length {est.length}, θ has {self.size}", None
        try:
            flat = wire.decode(est.values, est.length, est.crc32)
        except ValueError as err:
            bad_checksum = "checksum" in str(err)
            reason = Reason.REJECT_REASON_BAD_CHECKSUM if bad_checksum else Reason.REJECT_REASON_WRONG_SHAPE
            return reason, str(err), None
        if not (np.isfinite(flat).all() and np.isfinite(est.mean_loss)):
            return Reason.REJECT_REASON_NON_FINITE, "NaN or Inf in the estimate or its loss", None
        norm = float(np.linalg.norm(flat))
        if norm > self.config.max_estimate_norm:
            detail = f"norm {norm:.3g} > {self.config.max_estimate_norm:.3g}"
            return Reason.REJECT_REASON_NORM_TOO_LARGE, detail, None
        version = self.version
        if est.theta_version > version:
            return Reason.REJECT_REASON_FUTURE_VERSION, f"θ version {est.theta_version} > {version}", None
        if version - est.theta_version > self.config.max_staleness:
            return Reason.REJECT_REASON_STALE, f"θ version {est.theta_version}, current {version}", None
        return 0, "", flat

    def _outer_step(self) -> OuterStep:
        """Apply the mean of the meta-batch. Caller holds the lock."""
        started = time.perf_counter()
        grad = jnp.asarray(self._sum / self._count)
        self.theta, self.outer_state = self._apply(self.theta, self.outer_state, grad)
        self.version += 1
        self._theta_message = wire.theta_message(np.asarray(self.theta), self.version, self.structure)
        record = OuterStep(
            step=self.version, meta_loss=self._loss_sum / self._count,
            gradient_norm=float(jnp.linalg.norm(grad)), estimates=self._count,
            inner_steps=self._inner_steps, time=time.time(),
        )
        self.history.append(record)
        self._reset_batch()
        self.metrics.outer_update_seconds.observe(time.perf_counter() - started)
        if self.version >= self.config.max_outer_steps:
            self.done.set()
        return record

    def _apply_update(self, theta, outer_state, grad):
        updates, outer_state = self._outer.update(grad, outer_state, theta)
        return optax.apply_updates(theta, updates), outer_state

    def _reset_batch(self):
        self._sum = np.zeros(self.size, np.float32)
        self._count, self._loss_sum, self._inner_steps = 0, 0.0, 0

    # -- readers ------------------------------------------------------------------------

    def theta_message(self) -> pb.Theta:
        """The current θ, serialised once per version."""
        return self._theta_message

    def theta_tree(self):
        with self._lock:
            return wire.unflatten(np.asarray(self.theta), self.template)

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

    def stop(self) -> None:
        """End the job: workers are told to stop; further estimates are not needed. Under the
        lock, so an outer step in progress lands before, and none after (history is final)."""
        with self._lock:
            self.done.set()
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
            meta = {
                "job_id": self.config.job_id, "version": self.version, "structure_digest": self.digest,
                "history": [dataclasses.asdict(h) for h in self.history],
            }
            return self.version, arrays, meta

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
            self.history = [OuterStep(**h) for h in meta["history"]]
            self._reset_batch()
            self._theta_message = wire.theta_message(np.asarray(self.theta), self.version, self.structure)
            if self.version >= self.config.max_outer_steps:
                self.done.set()
