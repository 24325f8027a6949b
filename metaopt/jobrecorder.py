"""The learner's side of the job store: `JobRecorder` holds a running job's lease and keeps
its record current (see `metaopt.jobstore` for the record, the lease and outages)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from metaopt.jobstore import RUNNING, STOPPED, JobStore, JobStoreError, Lease, LeaseHeldError

log = logging.getLogger(__name__)


class LeaseLostError(JobStoreError):
    """Another learner took over the job while this one ran; this one must not write on."""



def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRecorder:
    """Holds a running job's lease and keeps its record current, from a daemon thread.

    `start()` takes the lease (raising `LeaseHeldError` at once if another learner runs the job)
    and writes the first record. Then every `interval_s` the thread renews the lease and writes
    the full record: what the store held at start, overlaid with `state`/`learner`/`started_at`,
    overlaid with `snapshot()` (called from the thread: it must be safe to call concurrently with
    the learner). While the store is unreachable the run goes on: one warning, retries with
    backoff capped at 5 intervals, and on return the record is rewritten and the lease taken
    again. If another owner holds the lease by then, `lost_lease` becomes True, `on_lease_lost`
    is called (from the thread) and the recorder writes nothing more: the learner should stop.
    """

    def __init__(self, store: JobStore, job_id: str, snapshot: Callable[[], Mapping[str, Any]], *,
                 interval_s: float = 2.0, lease_ttl_s: float = 15.0, owner: str | None = None,
                 on_lease_lost: Callable[[LeaseHeldError], None] | None = None):
        if interval_s <= 0 or lease_ttl_s < 2 * interval_s:
            raise ValueError(f"need interval_s > 0 and lease_ttl_s >= 2 * interval_s, got "
                             f"interval_s={interval_s}, lease_ttl_s={lease_ttl_s}: the lease is renewed "
                             "once per interval, and one late renewal must not let it lapse")
        self.store, self.job_id, self.owner = store, job_id, owner or default_owner()
        self.interval_s, self.lease_ttl_s = interval_s, lease_ttl_s
        self._snapshot, self._on_lease_lost = snapshot, on_lease_lost
        self._lease: Lease | None = None
        self._base: dict[str, Any] = {}
        self._last_snapshot: dict[str, Any] = {}
        self._snapshot_failing = False
        self._lock = threading.Lock()  # one writer at a time: the thread's tick, or stop()'s final write
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._confirmed_at = -float("inf")  # monotonic time the store last confirmed our lease
        self.lost_lease = False

    def holds_lease(self) -> bool:
        """Whether the lease is surely still ours: the store confirmed it less than half a TTL
        ago. Writes that only the job's one learner may make (checkpoints) ask first: while the
        store is unreachable the run goes on, but after half a TTL another learner could hold
        the lease, so such writes wait until the store confirms it again."""
        return not self.lost_lease and time.monotonic() - self._confirmed_at < self.lease_ttl_s / 2

    def start(self) -> JobRecorder:
        if self._thread is not None:
            raise RuntimeError(f"the recorder of job {self.job_id!r} is already started")
        self._lease = self.store.acquire_lease(self.job_id, self.owner, self.lease_ttl_s)
        self._confirmed_at = time.monotonic()
        try:
            existing = self.store.get(self.job_id) or {}
            now = time.time()
            # Carrying the stored fields (say, a spec written at submission) into every full write
            # is what lets them survive Redis losing its data.
            self._base = {**existing, "created_at": existing.get("created_at", now), "started_at": now,
                          "state": RUNNING, "learner": self.owner, "error": None}
            self.store.put(self.job_id, **self._full_record(strict=True))
        except BaseException:
            self._release_quietly()
            raise
        self._thread = threading.Thread(target=self._run, name=f"job-recorder-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, final: Mapping[str, Any] | None = None, timeout_s: float = 5.0) -> bool:
        """Write the final record (`final` overlaid on the last one; state STOPPED unless `final`
        says otherwise) and release the lease. Gives up after about `timeout_s` + 2 s if the store
        is unreachable (the lease then lapses by its TTL). Returns whether the record was written."""
        if self._thread is None:
            raise RuntimeError(f"the recorder of job {self.job_id!r} was never started")
        if self._stopped:
            return False
        self._stopped = True
        deadline = time.monotonic() + timeout_s
        self._stopping.set()
        self._thread.join(timeout_s)
        with self._lock:
            record = {**self._full_record(strict=False), "state": STOPPED, **(final or {})}
            while True:
                try:
                    if self._keep_lease():
                        assert self._lease is not None
                        self.store.put(self.job_id, **record)
                        self._lease.release()
                        return True
                    log.warning("job %s: another learner holds the lease; its final record is not written",
                                self.job_id)
                    return False
                except JobStoreError as e:
                    if time.monotonic() + 0.2 >= deadline:
                        log.warning("job %s: could not write the final record (state %s): %s",
                                    self.job_id, record["state"], e)
                        return False
                    time.sleep(0.2)

    def _full_record(self, *, strict: bool) -> dict[str, Any]:
        try:
            self._last_snapshot = dict(self._snapshot())
            self._snapshot_failing = False
        except Exception:
            if strict:
                raise
            if not self._snapshot_failing:  # once per streak of failures, not once per interval
                log.exception("job %s: snapshot() failed; writing its last good values", self.job_id)
            self._snapshot_failing = True
        return {**self._base, **self._last_snapshot}

    def _keep_lease(self) -> bool:
        """Renew the lease, or take it again if it vanished (Redis restarted empty, or it lapsed
        during an outage). False, and the lost-lease path, if another owner has it."""
        assert self._lease is not None
        if self.lost_lease:
            return False
        asked = time.monotonic()  # the TTL runs from the request, not from its answer
        if self._lease.renew():
            self._confirmed_at = asked
            return True
        try:
            self._lease = self.store.acquire_lease(self.job_id, self.owner, self.lease_ttl_s)
            self._confirmed_at = asked
        except LeaseHeldError as e:
            self.lost_lease = True
            log.error("job %s: lost the lease: %s", self.job_id, e)
            if self._on_lease_lost is not None:
                try:
                    self._on_lease_lost(e)
                except Exception:  # the learner's bug must not read as a store outage
                    log.exception("job %s: on_lease_lost failed", self.job_id)
            return False
        log.warning("job %s: the lease had lapsed (store restarted or unreachable); took it again",
                    self.job_id)
        return True

    def _run(self) -> None:
        delay, failures, since = self.interval_s, 0, 0.0
        while not self._stopping.wait(delay):
            try:
                with self._lock:
                    if self._stopping.is_set():  # stop() owns the last write
                        return
                    if not self._keep_lease():
                        return
                    self.store.put(self.job_id, **self._full_record(strict=False))
            except Exception as e:  # the store is down, or a bad value: the run must go on regardless
                if failures == 0:
                    since = time.monotonic()
                    log.warning("job %s: cannot update the job record (%s); the run goes on and the record "
                                "catches up when the store is back", self.job_id, e)
                failures += 1
                delay = min(2 * delay, 5 * self.interval_s)
                continue
            if failures:
                log.info("job %s: job store back after %.1f s (%d failed attempts); record rewritten",
                         self.job_id, time.monotonic() - since, failures)
            delay, failures = self.interval_s, 0

    def _release_quietly(self) -> None:
        try:
            if self._lease is not None:
                self._lease.release()
        except JobStoreError:
            pass  # it lapses by its TTL
