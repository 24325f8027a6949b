"""The job store against a real redis-server (ACL user, no persistence) and the in-process store.

Behaviour shared by both stores runs once per store (the `store` fixture); Redis-only behaviour
(credentials, permissions, key prefix, restarts) runs against `redis_server` alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from metaopt.jobrecorder import JobRecorder
from metaopt.jobstore import (
    PASSWORD_ENV,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    JobStore,
    JobStoreError,
    JobStoreUnavailableError,
    LeaseHeldError,
    MemoryJobStore,
    RedisJobStore,
    open_job_store,
)
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401

PREFIX = "metaopt:test"
INTERVAL_S, TTL_S = 0.1, 0.5


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[JobStore]:
    if request.param == "memory":
        job_store = open_job_store(None)
    else:
        job_store = open_job_store(request.getfixturevalue("redis_server").url, prefix=PREFIX)
    yield job_store
    job_store.close()


def wait_for(condition: Callable[[], Any], timeout_s: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout_s} s")


class FakeLearner:
    """Stands in for the learner's progress: θ's version rises while it 'runs'."""

    def __init__(self) -> None:
        self.theta_version, self.lock = 0, threading.Lock()

    def step(self) -> None:
        with self.lock:
            self.theta_version += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"spec": {"name": "quickstart"}, "theta_version": self.theta_version,
                    "meta_loss": np.float32(1.0 / (1 + self.theta_version)), "workers_alive": 2}


# --- records ----------------------------------------------------------------------------------


def test_record_round_trip(store: JobStore) -> None:
    assert store.get("nope") is None
    store.put("job-a", spec={"lr": 1e-3, "families": ["mlp"]}, state=PENDING, meta_loss=np.float64(0.5))
    first = store.get("job-a")
    assert first is not None
    assert first["spec"] == {"lr": 1e-3, "families": ["mlp"]} and first["meta_loss"] == 0.5
    assert first["state"] == PENDING and first["job_id"] == "job-a"
    time.sleep(0.01)
    store.put("job-b", state=PENDING)
    store.put("job-a", state=RUNNING, theta_version=3, error=None)  # merges: spec stays
    second = store.get("job-a")
    assert second is not None
    assert second["spec"] == first["spec"] and second["state"] == RUNNING and second["theta_version"] == 3
    assert second["error"] is None
    assert second["created_at"] == first["created_at"] and second["updated_at"] > first["updated_at"]
    assert [job["job_id"] for job in store.list_jobs()] == ["job-b", "job-a"]  # newest first
    assert [job["job_id"] for job in store.list_jobs(limit=1)] == ["job-b"]
    assert store.list_jobs(limit=0) == []


def test_values_that_cannot_be_stored_are_named(store: JobStore) -> None:
    with pytest.raises(TypeError, match="field 'spec' of job 'j'"):
        store.put("j", spec=object())


def test_open_job_store_by_url() -> None:
    assert isinstance(open_job_store(None), MemoryJobStore)
    assert isinstance(open_job_store("memory://"), MemoryJobStore)
    with pytest.raises(JobStoreError, match="scheme 'http' is not supported"):
        open_job_store("http://127.0.0.1:6379")


def test_redis_keys_stay_under_prefix(redis_server: RedisServer) -> None:  # noqa: F811
    store = open_job_store(redis_server.url, prefix=PREFIX)
    store.put("job-a", state=PENDING)
    store.acquire_lease("job-a", "learner-a", ttl_s=5)
    with redis_server.admin() as admin:
        keys = set(admin.scan_iter("*"))
    assert keys == {f"{PREFIX}:job:job-a", f"{PREFIX}:jobs", f"{PREFIX}:lease:job-a"}


# --- credentials and permissions ---------------------------------------------------------------


@pytest.mark.parametrize("user", ["metaopt", "nobody"])
def test_bad_credentials_are_explained_without_the_password(redis_server: RedisServer, user: str) -> None:  # noqa: F811
    with pytest.raises(JobStoreError, match=f"refused user '{user}'.*wrong password, unknown user") as info:
        open_job_store(redis_server.url_for(user, "not-the-password-xyz"))
    assert "not-the-password-xyz" not in str(info.value)
    assert not isinstance(info.value, JobStoreUnavailableError)


def test_password_from_environment(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    url = redis_server.url_for("metaopt")  # user, no password
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(JobStoreError, match=f"no password, and {PASSWORD_ENV} is not set"):
        open_job_store(url)
    monkeypatch.setenv(PASSWORD_ENV, redis_server.password)
    store = open_job_store(url, prefix=PREFIX)
    store.put("job-a", state=PENDING)
    assert store.get("job-a")["state"] == PENDING  # type: ignore[index]


def test_no_credentials_at_all(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(JobStoreError, match=f"requires a user and password.*{PASSWORD_ENV}"):
        open_job_store(f"redis://127.0.0.1:{redis_server.port}/0")


def test_prefix_outside_the_acl_is_explained(redis_server: RedisServer) -> None:  # noqa: F811
    with pytest.raises(JobStoreError, match=r"may not .* needs keys ~elsewhere:\* and the commands") as info:
        open_job_store(redis_server.url, prefix="elsewhere")
    assert redis_server.password not in str(info.value)


def test_unreachable_redis_fails_fast(redis_server: RedisServer) -> None:  # noqa: F811
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(JobStoreUnavailableError, match="cannot reach Redis") as info:
        open_job_store(redis_server.url)
    assert time.monotonic() - started < 5
    assert redis_server.password not in str(info.value)


# --- leases ------------------------------------------------------------------------------------


def test_lease_refuses_a_second_owner_until_released(store: JobStore) -> None:
    lease = store.acquire_lease("job-a", "learner-a", ttl_s=5)
    with pytest.raises(LeaseHeldError, match="already run by learner 'learner-a'.*stop the other") as info:
        store.acquire_lease("job-a", "learner-b", ttl_s=5)
    assert info.value.holder == "learner-a" and 0 < info.value.expires_in_s <= 5
    assert lease.renew()
    lease.release()
    assert store.acquire_lease("job-a", "learner-b", ttl_s=5).owner == "learner-b"


def test_an_expired_lease_passes_to_another_owner_and_the_old_one_finds_out(store: JobStore) -> None:
    old = store.acquire_lease("job-a", "learner-a", ttl_s=0.2)
    time.sleep(0.3)
    new = store.acquire_lease("job-a", "learner-b", ttl_s=5)
    assert not old.renew()  # taken over: the old owner finds out
    old.release()  # and cannot release the new owner's lease
    assert new.renew()
    # The same owner name twice is still two leases: the token carries a nonce.
    new.release()
    first = store.acquire_lease("job-a", "same-name", ttl_s=0.2)
    time.sleep(0.3)
    second = store.acquire_lease("job-a", "same-name", ttl_s=5)
    assert not first.renew() and second.renew()


# --- the recorder ------------------------------------------------------------------------------


@pytest.fixture
def recorder() -> Iterator[Callable[..., JobRecorder]]:
    """Makes recorders of job-a with short intervals, and stops them all at teardown, so a failed
    test leaves no thread behind to log into the next one."""
    made: list[JobRecorder] = []

    def make(store: JobStore, learner: FakeLearner, owner: str = "learner-a", **kwargs: Any) -> JobRecorder:
        made.append(JobRecorder(store, "job-a", learner.snapshot, interval_s=INTERVAL_S, lease_ttl_s=TTL_S,
                                owner=owner, **kwargs))
        return made[-1]

    yield make
    for rec in made:
        if rec._thread is not None:
            rec.stop(timeout_s=0.5)


def test_recorder_follows_a_run(store: JobStore, recorder: Callable[..., JobRecorder]) -> None:
    store.put("job-a", state=PENDING, submitted_by="alice")  # as `metaopt submit` would
    learner = FakeLearner()
    rec = recorder(store, learner).start()
    record = store.get("job-a")
    assert record is not None and record["state"] == RUNNING and record["learner"] == "learner-a"
    for version in range(1, 4):
        learner.step()
        wait_for(lambda v=version: (store.get("job-a") or {}).get("theta_version") == v,
                 what=f"θ version {version}")
    assert rec.stop({"state": SUCCEEDED, "artifact": "file:///tmp/lopt"})
    record = store.get("job-a")
    assert record is not None
    assert record["state"] == SUCCEEDED and record["theta_version"] == 3 and record["error"] is None
    assert record["artifact"] == "file:///tmp/lopt" and record["submitted_by"] == "alice"
    assert record["meta_loss"] == pytest.approx(0.25)
    store.acquire_lease("job-a", "learner-b", ttl_s=1)  # released at stop


def test_second_recorder_is_refused_at_start(store: JobStore, recorder: Callable[..., JobRecorder]) -> None:
    first = recorder(store, FakeLearner()).start()
    snapshots_taken = []
    second = JobRecorder(store, "job-a", lambda: snapshots_taken.append(1) or {}, interval_s=INTERVAL_S,
                         lease_ttl_s=TTL_S, owner="learner-b")
    with pytest.raises(LeaseHeldError, match="learner-a"):
        second.start()
    assert not snapshots_taken  # refused before doing anything
    assert (store.get("job-a") or {})["learner"] == "learner-a"
    first.stop()
    assert (store.get("job-a") or {})["state"] == STOPPED


def test_recorder_survives_a_redis_restart(
        redis_server: RedisServer, recorder: Callable[..., JobRecorder],  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    store = RedisJobStore(redis_server.url, prefix=PREFIX)
    learner = FakeLearner()
    rec = recorder(store, learner).start()
    learner.step()
    wait_for(lambda: (store.get("job-a") or {}).get("theta_version") == 1, what="first record")

    caplog.set_level(logging.INFO, logger="metaopt.jobrecorder")
    redis_server.stop()  # data gone: no persistence
    for _ in range(10):  # ≈1 s of outage, ≈10 intervals: the run goes on
        learner.step()
        time.sleep(INTERVAL_S)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "the run goes on" in warnings[0].getMessage()
    assert not rec.lost_lease
    # ≈1 s without confirmation, more than half the TTL: the lease may have lapsed, so writes
    # only its holder may make (checkpoints) wait.
    assert not rec.holds_lease()

    redis_server.start()  # same port, empty
    record = wait_for(lambda: store.get("job-a"), timeout_s=3, what="record rewritten after restart")
    assert record["state"] == RUNNING and record["theta_version"] == 11
    assert record["spec"] == {"name": "quickstart"}  # the full record, not only what changed
    with pytest.raises(LeaseHeldError, match="learner-a"):
        store.acquire_lease("job-a", "learner-b", ttl_s=1)
    assert rec.holds_lease()
    assert rec.stop({"state": SUCCEEDED})
    assert (store.get("job-a") or {})["state"] == SUCCEEDED
    assert any("back after" in r.getMessage() for r in caplog.records)


def test_recorder_stop_does_not_hang_while_redis_is_down(
        redis_server: RedisServer, recorder: Callable[..., JobRecorder]) -> None:  # noqa: F811
    rec = recorder(RedisJobStore(redis_server.url, prefix=PREFIX), FakeLearner()).start()
    redis_server.stop()
    started = time.monotonic()
    assert not rec.stop({"state": SUCCEEDED}, timeout_s=1.0)
    assert time.monotonic() - started < 4


def test_recorder_learns_of_a_takeover(
        redis_server: RedisServer, recorder: Callable[..., JobRecorder]) -> None:  # noqa: F811
    store = RedisJobStore(redis_server.url, prefix=PREFIX)
    lost: list[LeaseHeldError] = []
    rec = recorder(store, FakeLearner(), on_lease_lost=lost.append).start()
    with redis_server.admin() as admin:  # another learner takes the job, as after a lapsed lease
        admin.set(f"{PREFIX}:lease:job-a", "learner-b#0001", px=5000)
        admin.hset(f"{PREFIX}:job:job-a", "learner", '"learner-b"')
    # The recorder sets lost_lease just before it calls back: wait for the call itself.
    wait_for(lambda: rec.lost_lease and lost, what="lost_lease and the callback")
    assert lost[0].holder == "learner-b"
    assert not rec.stop({"state": SUCCEEDED})  # must not overwrite the new owner's record
    record = store.get("job-a") or {}
    assert record["state"] == RUNNING and record["learner"] == "learner-b"
