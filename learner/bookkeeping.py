"""What the learner counts and remembers over a whole job, in bounded memory.

A job may run for days and see thousands of worker incarnations, so nothing here grows with
the job's length: `Totals` are counters, and `Incarnations` keeps the replay record of an
incarnation (worker id, run id) only while one of its streams is open or one of its accepted
estimates could still pass the staleness check. Both go into every checkpoint and come back
exactly. Neither is thread-safe: the learner calls them under its lock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

Key = tuple[str, str]  # (worker id, run id)


@dataclasses.dataclass
class Totals:
    """Counts over the whole job: the learner's history keeps only its last outer steps."""

    estimates_accepted: int = 0  # acknowledged as accepted; after a crash some never reach θ
    estimates_applied: int = 0  # in an outer step now in θ
    inner_steps_applied: int = 0  # behind the applied estimates, both antithetic halves counted
    worker_incarnations: int = 0  # distinct (worker, run id) with an accepted estimate
    meta_loss_first: float | None = None  # of outer step 1: what the run started from
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)  # refused estimates by reason

    def to_meta(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rejected": dict(sorted(self.rejected.items()))}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Totals:
        """From a checkpoint's meta. One written before totals existed holds the full history,
        so what it can tell is derived from that; it never counted incarnations or refusals."""
        if "totals" in meta:
            return cls(**meta["totals"])
        history = meta["history"]
        applied = sum(h["estimates"] for h in history)
        return cls(estimates_accepted=applied, estimates_applied=applied,
                   inner_steps_applied=sum(h["inner_steps"] for h in history),
                   meta_loss_first=history[0]["meta_loss"] if history else None)


@dataclasses.dataclass
class _Record:
    last_sequence: int = 0  # of its newest accepted estimate; 0: none accepted yet
    newest_version: int = 0  # θ version of its newest accepted estimate
    streams: int = 0  # open streams: a reconnect's stream may open before the old one is seen to close


class Incarnations:
    """Replay records per worker incarnation, dropped once they can no longer matter.

    A record is dropped only once its incarnation's last open stream has closed (or a restore
    closed them all) and each of its accepted estimates is stale (computed at a θ version below
    `version - max_staleness`), so the staleness check alone would refuse a replay of it. A
    record of estimates submitted without a stream (the learner used directly) is kept.

    `forgotten_through` keeps the newest θ version of any dropped record's estimates: an
    estimate of an incarnation without an accepted estimate on record is refused at that
    version or older, so a replay never gets through, not even after a restore from a
    checkpoint or under a larger `max_staleness`. In steady state that refusal costs nothing:
    such an estimate is stale anyway.
    """

    def __init__(self, max_staleness: int):
        self.max_staleness = max_staleness
        self.records: dict[Key, _Record] = {}
        self.idle: set[Key] = set()  # records with no open stream: the candidates to drop
        self.forgotten_through = -1  # θ version; -1: nothing forgotten, every version is fresh

    def opened(self, key: Key) -> None:
        record = self.records.setdefault(key, _Record())
        record.streams += 1
        self.idle.discard(key)

    def closed(self, key: Key, version: int) -> None:
        record = self.records.get(key)
        if record is None or record.streams == 0:
            return  # not opened here (a restore in between): nothing to undo
        record.streams -= 1
        if record.streams == 0:
            self.idle.add(key)
            self.forget(version)

    def refusal(self, key: Key, sequence: int, theta_version: int) -> str | None:
        """Why an estimate would be a replay, or None if it is new work."""
        record = self.records.get(key)
        if record is not None and record.last_sequence:
            if sequence <= record.last_sequence:
                return f"sequence {sequence} of {key[0]}/{key[1]} was already seen"
            return None
        if theta_version <= self.forgotten_through:
            return (f"{key[0]}/{key[1]} has no record here and its θ version {theta_version} is at or "
                    f"below {self.forgotten_through}, up to which records were dropped: it could be "
                    "a replay")
        return None

    def accepted(self, key: Key, sequence: int, theta_version: int) -> bool:
        """Record an accepted estimate; True if it is its incarnation's first."""
        # Without a record, it came without a stream (the learner used directly): no stream
        # will close, so the record is kept; streams only ever end records.
        record = self.records.setdefault(key, _Record())
        first = record.last_sequence == 0
        record.last_sequence = sequence
        record.newest_version = max(record.newest_version, theta_version)
        return first

    def forget(self, version: int) -> None:
        """Drop the idle records that can no longer matter at θ version `version`."""
        horizon = version - self.max_staleness  # estimates below this version are stale
        for key in [k for k in self.idle if self._droppable(self.records[k], horizon)]:
            record = self.records.pop(key)
            self.idle.discard(key)
            if record.last_sequence:
                self.forgotten_through = max(self.forgotten_through, record.newest_version)

    @staticmethod
    def _droppable(record: _Record, horizon: int) -> bool:
        return record.last_sequence == 0 or record.newest_version < horizon

    def to_meta(self) -> dict[str, Any]:
        """The records that hold an accepted estimate (a stream's count is the process's own)."""
        records = [[*key, r.last_sequence, r.newest_version]
                   for key, r in sorted(self.records.items()) if r.last_sequence]
        return {"incarnations": records, "forgotten_through": self.forgotten_through}

    def restore(self, meta: dict[str, Any], version: int) -> None:
        """From a checkpoint's meta: every record idle, as no stream is open across a restore.
        A checkpoint written before these records existed tells nothing of who sent what, and
        θ at `version` may hold any estimate computed at `version - 1` or before: those are
        refused from every incarnation; from `version` on, estimates are new work."""
        self.records.clear()
        self.idle.clear()
        if "incarnations" not in meta:
            self.forgotten_through = version - 1
            return
        self.forgotten_through = int(meta["forgotten_through"])
        self._add(meta["incarnations"])

    def _add(self, rows: Iterable[list]) -> None:
        for worker_id, run_id, last_sequence, newest_version in rows:
            key = (str(worker_id), str(run_id))
            self.records[key] = _Record(int(last_sequence), int(newest_version))
            self.idle.add(key)
