"""Checkpoints of the learner, written off the receive path on a timer and at the end.

A snapshot (θ, outer state, RNG, step, history) is copied under the learner's lock, then
written without it, so workers are never held up by storage. Writes are atomic
(`metaopt.storage.save_checkpoint`): an interrupted write never hides the last good checkpoint.
The root is a path or any fsspec URI (s3://, gs://, see `metaopt.storage` for S3 endpoints); on
a shared store, a learner resumes its job from the last good checkpoint wherever it starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from metaopt import storage
from metaopt.learner.core import Learner

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, learner: Learner, root_uri: str, interval_s: float = 30.0, keep: int = 3,
                 meta: dict | None = None, may_write: Callable[[], bool] = lambda: True):
        """`meta`: JSON fields every checkpoint carries besides the learner's own (the job spec,
        the code version), so that a checkpoint alone can be published or resumed anywhere.
        `may_write()` is asked before each write: False while this learner cannot be sure it
        still holds the job's lease, since another learner may then be writing the same job."""
        self.learner, self.root_uri, self.meta, self.may_write = learner, root_uri, meta or {}, may_write
        self.interval_s, self.keep = interval_s, keep
        self.last_saved_step: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="checkpointer")
        self._write_lock = threading.Lock()

    def restore_latest(self) -> int | None:
        """Load the newest good checkpoint into the learner; its step, or None if none exists."""
        found = storage.latest_checkpoint(self.root_uri)
        if found is None:
            return None
        step, arrays, meta = found
        self.learner.restore(arrays, meta)
        digest = self.learner.state_digest(self.learner.snapshot()[1])
        if meta.get("state_sha256", digest) != digest:  # older checkpoints carry none
            raise ValueError(f"checkpoint {storage.checkpoint_uri(self.root_uri, step)} restored a state "
                             "other than the one saved (state sha256 differs); do not resume from it")
        self.last_saved_step = step
        log.info("resumed job %s at outer step %d from %s (state sha256 %s)", meta["job_id"], step,
                 self.root_uri, digest)
        return step

    def save(self) -> str | None:
        """Write a checkpoint now unless the newest one already holds this step."""
        with self._write_lock:
            step, arrays, meta = self.learner.snapshot()
            if step == self.last_saved_step:
                return None
            if not self.may_write():
                log.warning("job %s: checkpoint of step %d not written: the job's lease is not "
                            "confirmed (job store unreachable, or another learner took it)",
                            meta["job_id"], step)
                return None
            started = time.perf_counter()
            meta = {**self.meta, **meta, "state_sha256": self.learner.state_digest(arrays)}
            uri = storage.save_checkpoint(self.root_uri, step, arrays, meta, keep=self.keep)
            self.learner.metrics.checkpoint_written(time.perf_counter() - started)
            self.last_saved_step = step
            return uri

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the timer and write a final checkpoint, retried for up to `timeout_s` if the
        store is away."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        storage.retrying(self.save, f"the final checkpoint write to {self.root_uri}", timeout_s)

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.save()
            except Exception:  # a failed write must not end the run; the next one retries
                log.exception("checkpoint write to %s failed; will retry", self.root_uri)
