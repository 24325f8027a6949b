"""Bad input: hostile messages of every kind against the real learner gRPC server
(`benchmarks/chaos_fuzz.py`: hypothesis, seeded, 8 inputs of each kind, then 200 hostile mutants
of real traffic). None may be accepted, each is refused for its own reason, the server stays up
and θ does not move by a bit. The long form (10,200 inputs) is in the slow suite."""

from __future__ import annotations

import warnings

import grpc
import numpy as np
import pytest

from benchmarks import chaos_fuzz
from benchmarks.chaos_fuzz import KINDS, fuzz_learner
from benchmarks.chaos_mutations import EXCHANGES, OPERATORS, Contract, judge, mutate, traffic
from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt.learner import security
from metaopt.learner.core import Learner, LearnerConfig
from metaopt.learner.server import make_server

PER_KIND = 8  # hostile inputs of each kind
MUTATIONS = 200  # hostile mutants of real traffic
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
    return fuzz_learner(examples=PER_KIND * len(KINDS), seed=0, mutations=MUTATIONS)


def test_the_expected_reasons_are_the_protos_reject_reasons():
    assert set(EXPECTED) == set(KINDS)
    named = {r for family in EXPECTED.values() if family for r in family}
    assert {r for r in named if not r.startswith("status:") and r != "dropped"} <= REASONS


def test_every_kind_and_every_mutation_is_tried(report):
    assert report["fuzz_inputs"] == {"hypothesis": PER_KIND * len(KINDS), "mutations": MUTATIONS}
    assert report["fuzz_messages"] == PER_KIND * len(KINDS) + MUTATIONS
    assert {kind: s["tried"] for kind, s in report["by_kind"].items()} == dict.fromkeys(KINDS, PER_KIND)
    operators = report["mutation_by_operator"]
    assert set(operators) == set(OPERATORS) and all(s["tried"] >= 20 for s in operators.values()), operators
    assert all(set(s["variants"]) == set(EXCHANGES) for s in operators.values()), operators


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
    assert all(s["accepted"] == 0 for s in report["mutation_by_operator"].values())
    # Valid mutants are sent too; the learner may refuse some (it is stricter than the judge).
    assert 0 < report["mutants_valid_accepted"] <= report["mutants_valid"]


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


def _traffic(sequence=7):
    who = chaos_fuzz.Who("w", "r", "digest")
    est = chaos_fuzz._estimate(who, np.linspace(-1, 1, chaos_fuzz.SIZE), sequence=sequence)
    contract = Contract(chaos_fuzz.JOB, "digest", chaos_fuzz.SIZE, chaos_fuzz.FAMILY,
                        range(chaos_fuzz.VERSION + 1), chaos_fuzz.MAX_NORM)
    return traffic(who.hello().hello, est), contract


def test_the_judge_finds_real_traffic_valid_and_a_flipped_value_invalid():
    exchanges, contract = _traffic()
    assert {name: judge(contract, name, raws) for name, raws in exchanges.items()} == dict.fromkeys(
        EXCHANGES, (1, False))
    hello, header, *chunks = exchanges["chunked"]
    assert len(chunks) >= 2
    last = bytearray(chunks[-1])
    last[-1] ^= 1  # a value's bit: the checksum no longer matches
    assert judge(contract, "chunked", [hello, header, *chunks[:-1], bytes(last)]) == (0, False)
    assert judge(contract, "chunked", [hello, header, *chunks[:-1]]) == (0, False)  # one chunk short
    assert judge(contract, "inline", [exchanges["inline"][1]]) == (0, True)  # no Hello


def test_every_mutation_changes_the_message_and_is_reproducible():
    exchanges, _ = _traffic()
    partners = [raw for raws in exchanges.values() for raw in raws]
    for seed in range(50):
        for name, raws in exchanges.items():
            for raw in raws:
                got = [mutate(np.random.default_rng(seed), raw, partners, name != "get_theta")
                       for _ in range(2)]
                assert got[0] == got[1] and got[0][1] != raw


@pytest.mark.slow
def test_the_long_form_accepts_none_of_ten_thousand_hostile_inputs():
    """`chaos_fuzz.py` without --quick: 100 inputs of each kind and 8,000 hostile mutants."""
    report = fuzz_learner()
    assert report["fuzz_messages"] >= 10_000
    assert report["invalid_accepted"] == 0 and report["server_crashes"] == 0
    assert report["server_faults"] == 0, report["faults"] + report["errors_logged"]
    assert report["theta_unchanged_by_invalid"] is True
