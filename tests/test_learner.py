"""The learner: outer updates against optax, rejection by reason, checkpoints, the real gRPC
server (port 0, with the standard health service)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
import urllib.request

import grpc
import jax
import numpy as np
import optax
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt._proto import learner_pb2_grpc as pb_grpc
from metaopt.jobspec import OuterSpec
from metaopt.learner.checkpointing import Checkpointer
from metaopt.learner.core import Learner, LearnerConfig, make_outer_optimizer
from metaopt.learner.server import ANNOUNCE_INTERVAL_S, make_server

THETA0 = {"mlp": {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
                  "b": np.zeros(4, np.float32)}, "scale": np.float32(0.5)}
SIZE = 11


def make_learner(**overrides) -> Learner:
    """Overrides of the job spec's `outer` section and of LearnerConfig's own fields alike."""
    outer = dict(meta_batch_size=2, clip_norm=1.0, learning_rate=0.01, max_staleness=1, max_estimate_norm=1e3)
    outer |= {k: overrides.pop(k) for k in list(overrides) if k in OuterSpec.model_fields}
    config = dict(job_id="job-1", max_outer_steps=100, task_families=("quadratic", "mlp")) | overrides
    return Learner(LearnerConfig(**config, outer=OuterSpec(**outer)), THETA0)


SEQUENCE = itertools.count(1)  # estimates of worker "w", run "r": each sequence is new


def estimate(values, version=0, job_id="job-1", loss=1.0, length=None, crc=None, family="quadratic",
             particles=2, sequence=None) -> pb.GradientEstimate:
    data, n, checksum = wire.encode(np.asarray(values, np.float32))
    return pb.GradientEstimate(
        job_id=job_id, worker_id="w", run_id="r", theta_version=version,
        sequence=next(SEQUENCE) if sequence is None else sequence,
        task=pb.TaskSpec(name=family, kwargs_json="{}"), num_particles=particles, inner_steps=3,
        mean_loss=loss, encoding=pb.ENCODING_FLOAT32_LE, values=data,
        length=n if length is None else length, crc32=checksum if crc is None else crc,
    )


def sample_value(learner: Learner, name: str, **labels) -> float:
    return learner.metrics.registry.get_sample_value(name, labels) or 0.0


def test_one_meta_batch_matches_optax_adam_with_clipping():
    learner = make_learner()
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=SIZE) * 3, rng.normal(size=SIZE) * 3  # mean norm > clip: clipping acts
    assert learner.submit(estimate(g1, loss=2.0)).accepted
    assert learner.version == 0  # half a meta-batch does nothing yet
    assert learner.submit(estimate(g2, loss=4.0)).accepted
    assert learner.wait_idle() and learner.version == 1

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.01))
    grad_tree = wire.unflatten(((g1.astype(np.float32) + g2.astype(np.float32)) / 2), THETA0)
    params = jax.tree.map(np.asarray, THETA0)
    updates, _ = tx.update(grad_tree, tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    got = learner.theta_tree()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)
    assert learner.history[-1].meta_loss == pytest.approx(3.0)
    assert sample_value(learner, "metaopt_outer_steps_total", job_id="job-1") == 1


def test_each_outer_step_records_the_mean_meta_loss_of_each_task_family():
    learner = make_learner(meta_batch_size=3)
    for family, loss in (("quadratic", 1.0), ("mlp", 4.0), ("quadratic", 2.0)):
        assert learner.submit(estimate(np.ones(SIZE) * 0.1, loss=loss, family=family)).accepted
    assert learner.wait_idle() and learner.version == 1
    step = learner.history[-1]
    assert step.family_losses == {"mlp": 4.0, "quadratic": 1.5}
    assert step.meta_loss == pytest.approx(7.0 / 3)
    assert learner.submit(estimate(np.ones(SIZE) * 0.1, loss=3.0, family="mlp", version=1)).accepted
    for _ in range(2):  # the next meta-batch starts from nothing
        assert learner.submit(estimate(np.ones(SIZE) * 0.1, loss=5.0, family="mlp", version=1)).accepted
    assert learner.wait_idle() and learner.history[-1].family_losses == {"mlp": pytest.approx(13.0 / 3)}


@pytest.mark.parametrize("bad, reason", [
    (dict(values=np.ones(SIZE + 1)), "wrong_shape"),
    (dict(values=np.ones(SIZE), length=SIZE + 1), "wrong_shape"),
    (dict(values=np.full(SIZE, np.nan)), "non_finite"),
    (dict(values=np.ones(SIZE), loss=float("inf")), "non_finite"),
    (dict(values=np.full(SIZE, 1e4)), "norm_too_large"),
    (dict(values=np.ones(SIZE), crc=12345), "bad_checksum"),
    (dict(values=np.ones(SIZE), job_id="other"), "wrong_job"),
    (dict(values=np.ones(SIZE), version=7), "future_version"),
    (dict(values=np.ones(SIZE), family="nosuchfamily"), "invalid_field"),
    (dict(values=np.ones(SIZE), particles=0), "invalid_field"),
])
def test_invalid_estimates_change_nothing_and_are_counted(bad, reason):
    learner = make_learner(meta_batch_size=1)
    before = np.array(learner.theta)
    ack = learner.submit(estimate(**bad))
    assert not ack.accepted and pb.RejectReason.Name(ack.reason).lower().endswith(reason)
    assert ack.detail  # says what was wrong
    np.testing.assert_array_equal(np.array(learner.theta), before)
    assert learner.version == 0
    name = "metaopt_gradient_estimates_rejected_total"
    assert sample_value(learner, name, job_id="job-1", reason=reason) == 1


def test_acks_tell_theta_version_and_staleness_is_counted_in_its_buckets():
    learner = make_learner(meta_batch_size=1, max_staleness=2)
    staleness = []
    for version in (0, 1, 2, 2, 2):  # each applied before the next: staleness 0, 0, 0, 1, 2
        before = learner.version
        staleness.append(before - version)
        ack = learner.submit(estimate(np.ones(SIZE) * 0.1, version=version))
        # The ack tells θ's version when it was made: before this estimate's own update, or
        # after it if the updater was quicker.
        assert ack.accepted and before <= ack.theta_version <= before + 1
        assert learner.wait_idle()
    assert staleness == [0, 0, 0, 1, 2] and learner.version == 5
    bucket = lambda le: sample_value(  # noqa: E731
        learner, "metaopt_estimate_staleness_versions_bucket", job_id="job-1", le=le)
    assert [bucket(le) for le in ("0.0", "1.0", "2.0", "4.0", "+Inf")] == [3, 4, 5, 5, 5]
    assert sample_value(learner, "metaopt_estimate_staleness_versions_sum", job_id="job-1") == 3


def test_stale_estimates_are_rejected():
    learner = make_learner(meta_batch_size=1, max_staleness=1)
    for _ in range(3):
        assert learner.submit(estimate(np.ones(SIZE) * 0.1, version=learner.version)).accepted
        learner.wait_idle()
    before = np.array(learner.theta)
    ack = learner.submit(estimate(np.ones(SIZE), version=1))  # current is 3, bound is 1
    assert ack.reason == pb.REJECT_REASON_STALE
    np.testing.assert_array_equal(np.array(learner.theta), before)
    assert learner.submit(estimate(np.ones(SIZE) * 0.1, version=2)).accepted  # within the bound


def test_no_estimate_is_accepted_beyond_the_last_outer_step():
    """Every accepted estimate counts in exactly one outer step: once the full meta-batches
    reach max_outer_steps, more would be acknowledged and then dropped, so they are refused."""
    learner = make_learner(meta_batch_size=2, max_outer_steps=2, max_pending_batches=2)
    acks = [learner.submit(estimate(np.ones(SIZE) * 0.1)) for _ in range(6)]
    assert [ack.accepted for ack in acks] == [True] * 4 + [False] * 2
    assert {ack.reason for ack in acks[4:]} == {pb.REJECT_REASON_JOB_FINISHED}
    assert learner.wait_idle() and learner.version == 2 and learner.done.is_set()
    assert sum(step.estimates for step in learner.history) == sum(learner.accepted_by_worker.values())


def test_the_last_steps_estimate_counts_while_the_step_before_is_committed():
    """Listeners run after a step is in θ's version but before its accumulator is given back.
    An estimate for the last step arriving then was refused as "the last outer step is full"
    (that batch counted twice), so its worker stopped and the job hung one step short."""
    learner = make_learner(meta_batch_size=1, max_outer_steps=2)
    acks = []
    learner.add_listener(lambda version: version == 1 and acks.append(
        learner.submit(estimate(np.ones(SIZE) * 0.1, version=1))))
    assert learner.submit(estimate(np.ones(SIZE) * 0.1)).accepted
    assert learner.wait_idle()
    assert [ack.accepted for ack in acks] == [True], acks
    assert learner.wait_idle() and learner.version == 2 and learner.done.is_set()


def test_worker_incarnations_are_counted_at_their_first_accepted_estimate():
    """A restarted worker keeps its worker id and gets a new run id: a new incarnation, counted
    (in `metaopt_worker_incarnations_total`, which the chaos benchmark waits on) when the learner
    first accepts one of its estimates. A refused estimate counts nothing."""
    learner = make_learner(meta_batch_size=1)
    name = "metaopt_worker_incarnations_total"
    # Exported from the start (0), not only after the first: a reader sees the count, not a gap.
    assert learner.metrics.registry.get_sample_value(name, {"job_id": "job-1"}) == 0

    def from_run(run_id: str, version: int) -> pb.GradientEstimate:
        est = estimate(np.ones(SIZE) * 0.1, version=version)
        est.run_id = run_id
        return est

    assert not learner.submit(from_run("r1", version=7)).accepted  # from the future: refused
    assert sample_value(learner, name, job_id="job-1") == 0 and learner.worker_incarnations == 0
    counts = []
    for run_id in ("r1", "r1", "r2", "r1"):
        assert learner.submit(from_run(run_id, learner.version)).accepted
        assert learner.wait_idle()
        counts.append(sample_value(learner, name, job_id="job-1"))
    assert counts == [1, 1, 2, 2] and learner.worker_incarnations == 2


def test_a_stop_applies_every_accepted_estimate_and_then_refuses_more():
    """Stopped early (a time budget, SIGTERM, a cancel), the learner still applies what it
    accepted: the full meta-batches, then the partial one as a smaller last step."""
    learner = make_learner(meta_batch_size=4, max_outer_steps=100)
    grads = np.random.default_rng(1).normal(size=(6, SIZE)).astype(np.float32)
    assert all(learner.submit(estimate(g)).accepted for g in grads)
    learner.stop()
    assert learner.done.is_set() and learner.version == 2
    assert [step.estimates for step in learner.history] == [4, 2]
    late = learner.submit(estimate(np.ones(SIZE) * 0.1, version=2))
    assert not late.accepted and late.reason == pb.REJECT_REASON_JOB_FINISHED

    outer = make_outer_optimizer(learner.config)  # the same two steps with optax itself
    theta = jax.numpy.asarray(wire.flatten(THETA0))
    state = outer.init(theta)
    for batch in (grads[:4], grads[4:]):
        updates, state = outer.update(jax.numpy.asarray(batch.mean(axis=0)), state, theta)
        theta = optax.apply_updates(theta, updates)
    np.testing.assert_allclose(np.asarray(learner.theta), np.asarray(theta), rtol=1e-6, atol=1e-7)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    learner = make_learner(meta_batch_size=1)
    rng = np.random.default_rng(1)
    for _ in range(3):  # each after the last is applied, so none is stale
        assert learner.submit(estimate(rng.normal(size=SIZE), version=learner.version)).accepted
        assert learner.wait_idle()
    learner.next_worker_seed()
    Checkpointer(learner, str(tmp_path)).save()

    restored = make_learner(meta_batch_size=1)
    assert Checkpointer(restored, str(tmp_path)).restore_latest() == 3
    np.testing.assert_array_equal(np.array(restored.theta), np.array(learner.theta))
    for a, b in zip(jax.tree.leaves(restored.outer_state), jax.tree.leaves(learner.outer_state), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(restored.rng, learner.rng)
    assert restored.version == 3 and restored.history == learner.history
    assert restored.next_worker_seed() == learner.next_worker_seed()


def test_a_damaged_checkpoint_is_refused_with_a_clear_error():
    learner = make_learner()
    _, arrays, meta = learner.snapshot()
    for damage in (lambda a, m: a.pop("rng"), lambda a, m: m.pop("history"),
                   lambda a, m: a.__setitem__("theta", np.zeros(3, np.float32))):
        a, m = dict(arrays), dict(meta)
        damage(a, m)
        with pytest.raises(ValueError, match="checkpoint"):
            make_learner().restore(a, m)


@pytest.mark.parametrize(("bad", "why"), [
    (dict(meta_batch_size=0), "meta_batch_size\n  Input should be greater than or equal to 1"),
    (dict(max_in_flight=0), "max_in_flight\n  Input should be greater than or equal to 1"),
    (dict(clip_norm=0.0), "clip_norm\n  Input should be greater than 0"),
    (dict(max_outer_steps=0), "max_outer_steps must be >= 1, got 0"),
    (dict(max_pending_batches=0), "max_pending_batches must be >= 1, got 0"),
])
def test_learner_config_is_validated(bad, why):
    """The outer settings are checked by the job spec's OuterSpec, the rest by LearnerConfig."""
    with pytest.raises(ValueError, match=why):
        make_learner(**bad)


def test_checkpoint_of_another_optimizer_is_refused(tmp_path):
    learner = make_learner()
    Checkpointer(learner, str(tmp_path), interval_s=60).save()
    other = Learner(LearnerConfig(job_id="job-1", max_outer_steps=5), {"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="same optimizer settings"):
        Checkpointer(other, str(tmp_path), interval_s=60).restore_latest()


@pytest.fixture
def served():
    learner = make_learner(meta_batch_size=1, max_outer_steps=2)
    server, port = make_server(learner, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield learner, channel
    channel.close()
    server.stop(grace=None)


def hello(digest: str) -> pb.WorkerMessage:
    return pb.WorkerMessage(hello=pb.Hello(job_id="job-1", worker_id="w", run_id="r",
                                           theta_structure_digest=digest))


def test_grpc_health_and_get_theta(served):
    learner, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "metaopt.v1.Learner"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    theta = pb_grpc.LearnerStub(channel).GetTheta(pb.GetThetaRequest(job_id="job-1"), timeout=5)
    assert theta.version == 0 and theta.structure_digest == learner.digest
    flat = wire.decode(theta.values, theta.length, theta.crc32)
    np.testing.assert_array_equal(flat, wire.flatten(THETA0))
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.LearnerStub(channel).GetTheta(pb.GetThetaRequest(job_id="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_stream_acks_pushes_versions_and_stops(served):
    learner, channel = served
    stub = pb_grpc.LearnerStub(channel)

    def worker():  # keeps its stream open, as a worker does, until the job is over
        yield hello(learner.digest)
        yield pb.WorkerMessage(estimate=estimate(np.ones(SIZE) * 0.1, version=0))
        deadline = time.monotonic() + 10
        while learner.version < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(3 * ANNOUNCE_INTERVAL_S)  # time for version 1's news, if no ack told it
        yield pb.WorkerMessage(estimate=estimate(np.ones(SIZE) * 0.1, version=1))
        learner.done.wait(10)

    replies = list(stub.Connect(worker(), timeout=10))
    kinds = [m.WhichOneof("kind") for m in replies]
    assert kinds[0] == "welcome" and kinds.count("ack") == 2
    assert kinds[-1] == "stop" and kinds.count("stop") == 1  # max_outer_steps=2 reached
    # θ's new versions reach the stream in acks or, when no ack told it, as ThetaUpdated.
    told = [m.ack.theta_version if k == "ack" else m.theta_updated.theta_version
            for m, k in zip(replies, kinds, strict=True) if k in ("ack", "theta_updated")]
    assert told == sorted(told) and 1 in told
    assert learner.version == 2


def test_grpc_stream_refuses_a_worker_with_another_theta_structure(served):
    _, channel = served
    with pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.LearnerStub(channel).Connect(iter([hello("0" * 64)]), timeout=5))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "same learned optimizer" in err.value.details()


def test_grpc_stream_must_begin_with_hello(served):
    _, channel = served
    first = pb.WorkerMessage(estimate=estimate(np.ones(SIZE)))
    with pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.LearnerStub(channel).Connect(iter([first]), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_scrape_passes_promtool():
    """A real HTTP scrape of the learner's /metrics, checked by Prometheus's own promtool."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package (make system-deps)"
    learner = make_learner(meta_batch_size=1)
    learner.submit(estimate(np.ones(SIZE) * 0.1))
    learner.submit(estimate(np.full(SIZE, np.nan)))
    assert learner.wait_idle()
    learner.metrics.evaluated("tiny", 0.5, 0.8)  # what an in-run evaluation sets
    server, port = learner.metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
    assert 'metaopt_gradient_estimates_accepted_total{job_id="job-1",task_family="quadratic"} 1.0' in text
    assert 'metaopt_gradient_estimates_rejected_total{job_id="job-1",reason="non_finite"} 1.0' in text
    assert 'metaopt_outer_steps_total{job_id="job-1"} 1.0' in text
    assert 'metaopt_eval_win_share{job_id="job-1",suite="tiny"} 0.5' in text
    assert 'metaopt_eval_final_loss_ratio{job_id="job-1",suite="tiny"} 0.8' in text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
