"""The real PESWorker with one planted fault, for tests/test_train.py: worker-1's loop raises
when it samples its first task (before compiling anything, so the test is quick), while worker-0
stays healthy and would carry the run on alone.

A module of its own, not the test's script, so that Ray's worker processes import it by name on
top of the real `workers.actor` (a class defined in `__main__` would travel by value instead)."""

from __future__ import annotations

from metaopt.workers.actor import PESWorker

FAULT = "planted fault: worker-1 cannot sample a task"


class WorkerThatFails(PESWorker):
    def _sample_task(self, key):
        if self.worker_id == "worker-1":
            raise ValueError(FAULT)
        return super()._sample_task(key)
