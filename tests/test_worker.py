"""The PES worker against a real gRPC learner: it waits for a learner that is not up yet,
and reconnects (same run id, with backoff) after the learner goes away and comes back."""

from __future__ import annotations

import threading
import time

import jax
import pytest

from metaopt import optimizers
from metaopt.jobspec import OuterSpec, parse_job_spec
from metaopt.learner.core import Learner, LearnerConfig
from metaopt.learner.server import make_server
from metaopt.workers.actor import PESWorker
from tests.ports import free_port

SPEC = parse_job_spec({
    "name": "reconnect", "tasks": [{"family": "quadratic", "kwargs": {"dims": [4]}}],
    "optimizer": {"name": "small_fc", "hparams": {"hidden": 8}},
    "estimator": {"num_particles": 2, "truncation_length": 5, "inner_horizon": 20},
    "outer": {"meta_batch_size": 1},
    "stop": {"max_outer_steps": 40},
})


def new_learner() -> Learner:
    theta0 = optimizers.make("small_fc", hidden=8).init(jax.random.key(0))
    return Learner(LearnerConfig("job-r", max_outer_steps=40, outer=OuterSpec(meta_batch_size=1)), theta0)


def wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.mark.slow  # default run: test_chaos_learner
def test_worker_waits_for_the_learner_and_reconnects_after_it_restarts():
    port = free_port()
    worker = PESWorker(SPEC, f"127.0.0.1:{port}", "worker-0", "job-r")
    result: dict = {}
    def run():
        result.update(worker.run(max_backoff_s=0.5, connect_timeout_s=0.5))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(2.0)  # nothing listens yet: the worker retries with backoff
    assert thread.is_alive() and worker.stats["reconnects"] >= 1

    first = new_learner()
    server, _ = make_server(first, "127.0.0.1", port)
    wait_for(lambda: first.version >= 3, timeout_s=60)
    reconnects_before = worker.stats["reconnects"]
    server.stop(grace=None)  # the learner goes away mid-run
    _, arrays, meta = first.snapshot()
    assert first.version < 40, "the first learner finished before it could be stopped"

    second = new_learner()  # a new learner process would resume from its checkpoint
    second.restore(arrays, meta)
    server, _ = make_server(second, "127.0.0.1", port)
    try:
        thread.join(timeout=60)
        assert not thread.is_alive(), "the worker did not finish after the learner came back"
    finally:
        server.stop(grace=None)
    assert second.version == 40
    assert worker.stats["reconnects"] > reconnects_before, (worker.stats, result)
    assert result["run_id"] == worker.run_id  # the same incarnation throughout
    assert result["accepted"] >= 1


def test_a_worker_with_another_optimizer_is_refused_with_a_clear_error():
    other = SPEC.with_overrides(**{"optimizer.hparams": {"hidden": 4}})
    learner = new_learner()
    server, port = make_server(learner, "127.0.0.1", 0)
    try:
        with pytest.raises(RuntimeError, match="same learned optimizer"):
            PESWorker(other, f"127.0.0.1:{port}", "worker-0", "job-r").run()
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("kind", ["truncated_es", "full_es", "tbptt"])
def test_every_estimator_kind_meta_trains_through_the_real_learner(kind):
    spec = SPEC.with_overrides(**{"estimator.kind": kind, "stop.max_outer_steps": 3})
    theta0 = optimizers.make("small_fc", hidden=8).init(jax.random.key(0))
    learner = Learner(LearnerConfig("job-k", max_outer_steps=3, outer=OuterSpec(meta_batch_size=1)), theta0)
    server, port = make_server(learner, "127.0.0.1", 0)
    try:
        worker = PESWorker(spec, f"127.0.0.1:{port}", "worker-0", "job-k")
        stats = worker.run()
    finally:
        server.stop(grace=None)
    # The worker stops once the last step's estimate is accepted; the learner's updater
    # thread may still be applying it.
    assert learner.wait_idle()
    assert learner.version == 3 and stats["accepted"] >= 2
    per_estimate = worker.estimator.inner_steps_per_estimate
    assert all(step.inner_steps == per_estimate for step in learner.history)


def test_workers_share_a_compilation_cache_only_when_the_spec_names_one(tmp_path):
    from metaopt.workers.actor import worker_env

    assert "JAX_COMPILATION_CACHE_DIR" not in worker_env(SPEC)
    spec = SPEC.with_overrides(**{"workers.compile_cache_dir": str(tmp_path)})
    env = worker_env(spec)
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path)
    assert float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]) > 0  # the unrolls, not every op


def test_workers_are_spread_over_nodes_and_come_back_wherever_there_is_room():
    """The promises of Ray's actor options, restated without a cluster (a real three-node one
    loses a node in tests/test_chaos_nodes.py, slow): spread, not packed, so one node's loss
    costs its share; restarted without limit, loop included."""
    from metaopt.workers.actor import actor_options

    options = actor_options(SPEC.with_overrides(**{"workers.cpus": 2}))
    assert options["scheduling_strategy"] == "SPREAD"
    assert options["max_restarts"] == options["max_task_retries"] == -1
    assert (options["num_cpus"], options["num_gpus"]) == (2, 0)
    assert repr(PESWorker(SPEC, "127.0.0.1:1", "worker-3", "job-r")) == "PESWorker(worker-3)"  # Ray shows it
