"""The job store: each meta-training job's record, and the lease that lets one learner run it.

A job's *record* is a flat mapping of fields, each value JSON. The learner writes it as it runs;
the CLI and other tools read it. Conventional fields (the store does not enforce them):

    spec                  the validated job spec (a dict)
    state                 PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED
    theta_version         θ's version, i.e. outer steps applied
    meta_loss, estimates_per_second, workers_alive
    last_checkpoint       URI of the newest checkpoint
    artifact              NAME:VERSION of the published optimizer
    artifact_digest       its content digest, sha256:HEX (NAME@sha256:HEX pins exactly it)
    error                 why the job failed (None otherwise)
    learner               the lease owner that writes the record
    created_at, started_at, updated_at    Unix seconds; every write sets `updated_at`

Two stores share one interface, `JobStore`: `MemoryJobStore` for `metaopt train` on one machine
(in-process, thread-safe), and `RedisJobStore` for a cluster, with keys

    {prefix}:job:{job_id}     hash, one JSON value per field
    {prefix}:jobs             sorted set of job ids, score = created_at (for listing)
    {prefix}:lease:{job_id}   string: the lease holder's token, with a TTL

**Lease.** Two learners must never run one job. A lease is acquired with `SET NX PX` and
renewed or released by Lua scripts that act only if the key still holds *our* token (a random
nonce is added to the owner's name), so a learner whose lease lapsed and was taken over learns
it from `renew()` returning False and never deletes or extends the new holder's lease.

**Outages.** The learner writes through a `metaopt.jobrecorder.JobRecorder`, which writes the
FULL record every interval rather than deltas: after Redis restarts empty (it is not on the
gradient path and may run without persistence) the record is whole again one interval after it
is back, and the lease is taken again. Calls use 1 s socket timeouts and at most one immediate
retry (which replaces a pooled connection that died with the server), so no call can block the
learner for long, and an outage is logged once, not once per attempt.

**ACL.** A Redis user for the store needs keys `~{prefix}:*` and the commands in
`ACL_COMMANDS` (the test fixture grants exactly these), e.g.

    ACL SETUSER metaopt on >PASSWORD resetkeys ~metaopt:* -@all +ping +exists +hset ...

Give the user in the URL (`redis://metaopt@host:6379/0`) and the password in the environment
variable `METAOPT_REDIS_PASSWORD`, so it stays out of job specs and logs.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)

PASSWORD_ENV = "METAOPT_REDIS_PASSWORD"
ACL_COMMANDS = ("ping", "exists", "hset", "hsetnx", "hget", "hgetall", "zadd", "zrevrange", "set", "get",
                "pttl", "pexpire", "del", "evalsha", "script|load")
_SOCKET_TIMEOUT_S = 1.0


class JobStoreError(RuntimeError):
    """The job store refused or failed an operation (credentials, permissions, bad URL)."""


class JobStoreUnavailableError(JobStoreError):
    """The job store cannot be reached right now; retrying later may succeed."""


class LeaseHeldError(JobStoreError):
    """Another owner holds the job's lease."""

    def __init__(self, job_id: str, holder: str, expires_in_s: float):
        self.job_id, self.holder, self.expires_in_s = job_id, holder, expires_in_s
        super().__init__(
            f"job {job_id!r} is already run by learner {holder!r} (its lease ends in {expires_in_s:.1f} s "
            "unless renewed); two learners must not run one job: stop the other learner, or if it has "
            "died, start this one again once its lease has expired")


def _holder(token: str) -> str:
    return token.rpartition("#")[0] or token  # the owner's name, without the nonce


class Lease:
    """A held lease on one job. `renew()` returns False once it is no longer ours (lapsed or taken
    over); it raises `JobStoreUnavailableError` when the store cannot be asked."""

    def __init__(self, store: JobStore, job_id: str, token: str, ttl_s: float):
        self._store, self.job_id, self.token, self.ttl_s = store, job_id, token, ttl_s

    @property
    def owner(self) -> str:
        return _holder(self.token)

    def renew(self) -> bool:
        return self._store._renew_lease(self.job_id, self.token, _ms(self.ttl_s))

    def release(self) -> None:
        """Give the lease up, if it is still ours (never someone else's)."""
        self._store._release_lease(self.job_id, self.token)


class JobStore(abc.ABC):
    """Job records and leases; see the module docstring for the semantics."""

    @abc.abstractmethod
    def put(self, job_id: str, /, **fields: Any) -> None:
        """Merge `fields` into the job's record (creating it); also sets `updated_at`, and
        `created_at` unless the record or `fields` has it."""

    @abc.abstractmethod
    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's record (with `job_id`), or None if there is none."""

    @abc.abstractmethod
    def list_jobs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Records of all jobs, newest `created_at` first."""

    def acquire_lease(self, job_id: str, owner: str, ttl_s: float) -> Lease:
        """Take the job's lease for `ttl_s` seconds, or raise `LeaseHeldError` naming the holder."""
        _check_job_id(job_id)
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        token = f"{owner}#{secrets.token_hex(4)}"  # the nonce tells apart two learners given one name
        held = self._set_lease_if_free(job_id, token, _ms(ttl_s))
        if held is not None:
            raise LeaseHeldError(job_id, _holder(held[0]), held[1])
        return Lease(self, job_id, token, ttl_s)

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""

    @abc.abstractmethod
    def _set_lease_if_free(self, job_id: str, token: str, ttl_ms: int) -> tuple[str, float] | None:
        """Atomically: if the lease is free, take it and return None; else (holder token, seconds left)."""

    @abc.abstractmethod
    def _renew_lease(self, job_id: str, token: str, ttl_ms: int) -> bool: ...

    @abc.abstractmethod
    def _release_lease(self, job_id: str, token: str) -> None: ...


# --------------------------------------------------------------------------------------------
# Encoding, shared by both stores so they agree on what round-trips (tuples come back as lists)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _check_job_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not job_id or any(c.isspace() for c in job_id):
        raise ValueError(f"job id {job_id!r} is invalid: use a non-empty string without whitespace")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy and jax arrays and scalars
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _encode_fields(job_id: str, fields: Mapping[str, Any], now: float) -> dict[str, str]:
    _check_job_id(job_id)
    encoded = {}
    for name, value in {**fields, "job_id": job_id, "updated_at": now}.items():
        try:
            encoded[name] = json.dumps(value, default=_json_default)
        except (TypeError, ValueError) as e:
            raise TypeError(f"field {name!r} of job {job_id!r}'s record cannot be stored ({e}); pass "
                            "numbers, strings, None, lists and dicts of them") from e
    return encoded


def _decode(record: Mapping[str, str]) -> dict[str, Any]:
    decoded = {}
    for name, raw in record.items():
        try:
            decoded[name] = json.loads(raw)
        except ValueError:  # written by some other tool: hand it back as it is
            decoded[name] = raw
    return decoded


# --------------------------------------------------------------------------------------------
# In-process store


class MemoryJobStore(JobStore):
    """In-process store for one machine; thread-safe; leases expire by the monotonic clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, str]] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # job id -> (token, monotonic expiry)

    def put(self, job_id: str, /, **fields: Any) -> None:
        encoded = _encode_fields(job_id, fields, time.time())
        with self._lock:
            record = self._records.setdefault(job_id, {})
            record.update(encoded)
            record.setdefault("created_at", encoded["updated_at"])

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._records.get(job_id)
            return _decode(record) if record else None

    def list_jobs(self, limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            records = [_decode(r) for r in self._records.values()]
        records.sort(key=lambda r: r["created_at"], reverse=True)
        return records[:limit]

    def _live_lease(self, job_id: str) -> tuple[str, float] | None:
        lease = self._leases.get(job_id)
        if lease is not None and lease[1] <= time.monotonic():
            del self._leases[job_id]
            lease = None
        return lease

    def _set_lease_if_free(self, job_id: str, token: str, ttl_ms: int) -> tuple[str, float] | None:
        with self._lock:
            lease = self._live_lease(job_id)
            if lease is not None:
                return lease[0], lease[1] - time.monotonic()
            self._leases[job_id] = (token, time.monotonic() + ttl_ms / 1000)
            return None

    def _renew_lease(self, job_id: str, token: str, ttl_ms: int) -> bool:
        with self._lock:
            lease = self._live_lease(job_id)
            if lease is None or lease[0] != token:
                return False
            self._leases[job_id] = (token, time.monotonic() + ttl_ms / 1000)
            return True

    def _release_lease(self, job_id: str, token: str) -> None:
        with self._lock:
            lease = self._live_lease(job_id)
            if lease is not None and lease[0] == token:
                del self._leases[job_id]

    def close(self) -> None:
        pass  # nothing to release


# --------------------------------------------------------------------------------------------
# Redis store

# Every write of a record is one script, so a reader never sees fields without `updated_at`, and
# the listing index is rebuilt by any write after Redis lost its data.
_PUT = """
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[2])
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], created, ARGV[1])
"""
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return nil end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisJobStore(JobStore):
    """Job store in Redis (`redis://` or `rediss://` URL; user and password for an ACL user)."""

    def __init__(self, url: str, prefix: str = "metaopt"):
        parts = urlsplit(url)
        if not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"key prefix {prefix!r} is invalid: use a non-empty string without whitespace")
        user = unquote(parts.username) if parts.username else None
        self.prefix, self._user = prefix, user or "default"
        password = unquote(parts.password) if parts.password else os.environ.get(PASSWORD_ENV) or None
        # Shown in messages: the URL without its password.
        host = parts.netloc.rpartition("@")[2]
        self.where = f"{parts.scheme}://{user + '@' if user else ''}{host}{parts.path}"
        if user and password is None:
            raise JobStoreError(f"the Redis URL {self.where} names user {user!r} but no password, "
                                f"and {PASSWORD_ENV} is not set: set it to the user's password")
        self._password = password
        self._redis = redis.Redis.from_url(
            url, password=password, decode_responses=True, socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
        self._put, self._acquire, self._renew, self._release = (
            self._redis.register_script(s) for s in (_PUT, _ACQUIRE, _RENEW, _RELEASE))

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one Redis operation, turning redis-py's errors into messages that say what to check."""
        try:
            return fn()
        except redis.AuthenticationError:  # before ConnectionError: it is a subclass
            if self._password is None:
                raise JobStoreError(
                    f"Redis at {self.where} requires a user and password: put the user in the URL "
                    f"(redis://USER@host:port/db) and the password in {PASSWORD_ENV}") from None
            raise JobStoreError(
                f"Redis at {self.where} refused user {self._user!r}: wrong password, unknown user, or "
                f"the user is disabled; check the user in the URL and the password (from the URL or "
                f"{PASSWORD_ENV}) against the server's ACL (ACL LIST)") from None
        except redis.exceptions.NoPermissionError as e:
            raise JobStoreError(
                f"Redis user {self._user!r} at {self.where} may not {what} ({self._scrub(e)}); the job "
                f"store needs keys ~{self.prefix}:* and the commands "
                f"{' '.join('+' + c for c in ACL_COMMANDS)}") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise JobStoreUnavailableError(
                f"cannot reach Redis at {self.where} to {what}: {self._scrub(e)}") from None
        except redis.RedisError as e:
            raise JobStoreError(f"Redis at {self.where} failed to {what}: {self._scrub(e)}") from None

    def _scrub(self, error: Exception) -> str:
        text = str(error)
        return text.replace(self._password, "***") if self._password else text

    def check(self) -> None:
        """Connect, authenticate and touch the key space once, so a misconfiguration shows now."""
        self._call("ping", self._redis.ping)
        self._call(f"read keys under {self.prefix}:", lambda: self._redis.exists(self._key("jobs")))

    def put(self, job_id: str, /, **fields: Any) -> None:
        encoded = _encode_fields(job_id, fields, time.time())
        args = [job_id, encoded["updated_at"], *(x for kv in encoded.items() for x in kv)]
        self._call(f"write job {job_id}'s record",
                   lambda: self._put(keys=[self._key("job", job_id), self._key("jobs")], args=args))

    def get(self, job_id: str) -> dict[str, Any] | None:
        _check_job_id(job_id)
        key = self._key("job", job_id)
        record = self._call(f"read job {job_id}'s record", lambda: self._redis.hgetall(key))
        return _decode(record) if record else None

    def list_jobs(self, limit: int | None = None) -> list[dict[str, Any]]:
        if limit is not None and limit <= 0:  # ZREVRANGE 0 -1 would mean "all"
            return []

        def read() -> list[dict[str, str]]:
            job_ids = self._redis.zrevrange(self._key("jobs"), 0, -1 if limit is None else limit - 1)
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(self._key("job", job_id))
            return pipe.execute()

        return [_decode(r) for r in self._call("list jobs", read) if r]

    def _set_lease_if_free(self, job_id: str, token: str, ttl_ms: int) -> tuple[str, float] | None:
        held = self._call(f"acquire job {job_id}'s lease",
                          lambda: self._acquire(keys=[self._key("lease", job_id)], args=[token, ttl_ms]))
        return None if held is None else (held[0], max(0, held[1]) / 1000)

    def _renew_lease(self, job_id: str, token: str, ttl_ms: int) -> bool:
        return bool(self._call(f"renew job {job_id}'s lease",
                               lambda: self._renew(keys=[self._key("lease", job_id)], args=[token, ttl_ms])))

    def _release_lease(self, job_id: str, token: str) -> None:
        self._call(f"release job {job_id}'s lease",
                   lambda: self._release(keys=[self._key("lease", job_id)], args=[token]))

    def close(self) -> None:
        self._redis.close()


def open_job_store(url: str | None, prefix: str = "metaopt") -> JobStore:
    """None or `memory://` → a new `MemoryJobStore`; `redis://[USER[:PASSWORD]@]HOST:PORT/DB` or
    `rediss://…` → a `RedisJobStore`, checked at once (bad credentials or permissions raise
    `JobStoreError`, an unreachable server `JobStoreUnavailableError`)."""
    if url is None or url == "memory://":
        return MemoryJobStore()
    if urlsplit(url).scheme not in ("redis", "rediss"):
        raise JobStoreError(f"job store URL scheme {urlsplit(url).scheme!r} is not supported: use memory:// "
                            "or redis://USER@HOST:PORT/DB (rediss:// for TLS)")
    store = RedisJobStore(url, prefix)
    try:
        store.check()
    except JobStoreError:
        store.close()
        raise
    return store
