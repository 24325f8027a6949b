"""Bad input: hostile messages of every kind against the real learner gRPC server
(`benchmarks/chaos_fuzz.py`: hypothesis, seeded, 8 inputs of each kind). None may be accepted,
each is refused for its own reason, the server stays up and θ does not move by a bit."""

from __future__ import annotations

import warnings

import grpc
import numpy as np
import pytest

from benchmarks.chaos_fuzz import KINDS, fuzz_learner
from learner import security
from learner.core import Learner, LearnerConfig
from learner.server import make_server
from metaopt import wire
from metaopt._proto import learner_pb2 as pb

PER_KIND = 8  # hostile inputs of each kind
REASONS = {name.removeprefix("REJECT_REASON_") for name in pb.RejectReason.keys()}
UNAUTHENTICATED = {"status:UNAUTHENTICATED"}  # refused by the token check: a status, never an ack
# What each kind may be refused with: ack reasons, `status:CODE` when the call itself is refused,
# `dropped` when the server ends the stream without acking it (a stray or unfinished estimate);
# a message that does not decode ends its stream with INVALID_ARGUMENT.
EXPECTED = {
    "truncated_payload": {"WRONG_SHAPE", "status:INVALID_ARGUMENT"},  # the serialised message cut short
    "oversized_payload": {"WRONG_SHAPE", "BAD_CHUNK"},  # BAD_CHUNK: chunks carrying too many bytes
    "over_message_limit": {"status:RESOURCE_EXHAUSTED"},
    "wrong_length": {"WRONG_SHAPE"},
    "wrong_encoding": {"UNKNOWN_ENCODING", "WRONG_SHAPE", "BAD_CHUNK"},
    "non_finite": {"NON_FINITE"},
    "huge_norm": {"NORM_TOO_LARGE"},
    "bad_checksum": {"BAD_CHECKSUM"},
    "stale_version": {"STALE"},
    "future_version": {"FUTURE_VERSION"},
    "invalid_field": {"INVALID_FIELD"},
    "no_hello": {"status:INVALID_ARGUMENT"},
    "wrong_job": {"status:NOT_FOUND", "WRONG_JOB"},
    "wrong_structure": {"status:FAILED_PRECONDITION"},
    "foreign_worker": {"NOT_CONNECTED"},
    "replay": {"REPLAYED"},
    "missing_token": UNAUTHENTICATED,
    "wrong_token": UNAUTHENTICATED,
    "half_closed": {"dropped", "status:CANCELLED"},
    "random_bytes": None,  # anything but acceptance or a server fault
    "bad_chunks": {"BAD_CHUNK", "WRONG_SHAPE", "NOT_CONNECTED", "dropped"},
    "inline_values_with_chunks": {"BAD_CHUNK", "INVALID_FIELD"},
}

@pytest.fixture(scope="module")
def report() -> dict:
    return fuzz_learner(examples=PER_KIND * len(KINDS), seed=0)


def test_the_expected_reasons_are_the_protos_reject_reasons():
    assert set(EXPECTED) == set(KINDS)
    named = {r for family in EXPECTED.values() if family for r in family}
    assert {r for r in named if not r.startswith("status:") and r != "dropped"} <= REASONS


def test_every_kind_is_tried(report):
    assert report["fuzz_messages"] == PER_KIND * len(KINDS)
    assert {kind: s["tried"] for kind, s in report["by_kind"].items()} == dict.fromkeys(KINDS, PER_KIND)


def test_the_server_survives_and_theta_is_unchanged(report):
    assert report["server_crashes"] == 0 and report["valid_worker_served_after"]
    assert report["server_faults"] == 0, report["faults"] + report["errors_logged"]
    assert report["theta_unchanged_by_invalid"] is True
    assert report["controls_accepted"] == report["control_estimates"]  # a replay's original is valid


def test_no_invalid_input_is_accepted(report):
    by_kind = report["by_kind"]
    # Every acceptance was acked: the learner accepted nothing the fuzzer does not know of.
    assert report["invalid_accepted"] == sum(stats["accepted"] for stats in by_kind.values()) == 0
    assert {kind: s["accepted"] for kind, s in by_kind.items()} == dict.fromkeys(KINDS, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_refused_for_its_reason(report, kind):
    stats = report["by_kind"][kind]
    assert stats["accepted"] == 0, stats
    reasons = set(stats["reasons"])
    assert reasons and "ACCEPTED" not in reasons and "served" not in reasons, stats
    if EXPECTED[kind] is not None:
        assert reasons <= EXPECTED[kind], stats


def test_an_overflowing_norm_is_rejected_without_a_warning():
    """Where warnings are errors, a warning on the ingest thread would end the stream unacked."""
    learner = Learner(LearnerConfig(job_id="j", max_outer_steps=10), {"w": np.zeros(4, np.float32)})
    try:
        data, length, crc = wire.encode(np.full(4, 1e20, np.float32))
        est = pb.GradientEstimate(job_id="j", worker_id="w", run_id="r", sequence=1, num_particles=1,
                                  inner_steps=1, encoding=pb.ENCODING_FLOAT32_LE, values=data,
                                  length=length, crc32=crc)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ack = learner.submit(est)
        assert ack.reason == pb.REJECT_REASON_NORM_TOO_LARGE
    finally:
        learner.stop()


def test_an_undecodable_request_is_invalid_argument_with_a_reason_and_counted():
    """As a stranger would try it: a plain grpcio client, bytes that are no message, the right
    token. gRPC's own deserializer would answer UNKNOWN; the learner decodes requests itself."""
    learner = Learner(LearnerConfig(job_id="j", max_outer_steps=10), {"w": np.zeros(4, np.float32)})
    server, port = make_server(learner, token="t0ken")
    garbage, auth = b"\xff\xff\xff", security.token_call_metadata("t0ken")
    hello = pb.WorkerMessage(hello=pb.Hello(job_id="j", worker_id="w", run_id="r",
                                            theta_structure_digest=learner.digest))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            get_theta = channel.unary_unary("/metaopt.v1.Learner/GetTheta")  # bytes both ways
            connect = channel.stream_stream("/metaopt.v1.Learner/Connect")
            refusals = [  # (a call, how its refusal must begin)
                (lambda: get_theta(garbage, metadata=auth, timeout=10),
                 "the request does not decode as a metaopt.v1.GetThetaRequest"),
                (lambda: list(connect(iter([garbage]), metadata=auth, timeout=10)),
                 "the stream's first message does not decode as a metaopt.v1.WorkerMessage"),
                (lambda: list(connect(iter([hello.SerializeToString(), garbage]), metadata=auth,
                                      timeout=10)),
                 "a message does not decode as a metaopt.v1.WorkerMessage"),
            ]
            for call, beginning in refusals:
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
                assert info.value.details().startswith(beginning), info.value.details()
                assert "learner.proto" in info.value.details()
        counted = learner.metrics.registry.get_sample_value(
            "metaopt_gradient_estimates_rejected_total", {"job_id": "j", "reason": "undecodable"})
        assert counted == 3
    finally:
        learner.stop()
        server.stop(None)
