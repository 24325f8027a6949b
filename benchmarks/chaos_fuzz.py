"""Bad input: a property-based fuzzer (hypothesis) and mutations of real traffic drive the real
learner gRPC server with malformed and hostile messages and check that none is accepted, nothing
crashes and θ does not move.

One learner (θ of 37 values, resumed at version 5 so that stale versions exist) is served on
127.0.0.1 with a job token. Every example is one hostile input of one kind (`KINDS`, each tried
about equally often; hypothesis draws everything else), sent on a Connect stream of its own (or
a GetTheta call), which the fuzzer then half-closes and reads to its end: the server settles a
stream's messages in order before ending it, so every ack it will send has arrived. A hostile
input is an otherwise valid estimate with one fault, or a fault in the stream itself (no
Hello, bad tokens, chunks, random bytes, a client that goes away). Its outcome is the reasons
of its acks (`BAD_CHECKSUM`, ...), `status:CODE` if the call ended in an error, or `dropped`
if the stream ended cleanly without a word about it.

Then come mutants of real traffic (`chaos_mutations.py`: bit flips, truncations, splices and
duplicated fields of the messages a worker's own code writes), each an exchange of its own, until
`mutations` of them are hostile by that module's judge; the mutants it finds still valid are sent
too and must not have more estimates accepted than it allows.

The meta-batch is larger than the number of estimates sent, so accepted estimates never reach
an outer step: θ and its version must be bit for bit what they were, and the learner's own
count of accepted estimates must equal the valid ones the fuzzer sent (so an invalid estimate
accepted without an ack is caught too). At the end a real worker client (`LearnerClient`) must
still connect and get a valid estimate accepted, and the health service must answer.

Figures: `fuzz_messages` (hostile inputs sent), `fuzz_inputs` (of those, `hypothesis` and
`mutations`), `invalid_accepted` (of those, accepted: by an ack, a Welcome or θ served to a call
that must be refused, or in the learner's own count),
`server_crashes` (1 if the server no longer serves a valid worker or its health check),
`theta_unchanged_by_invalid`, `server_faults` (inputs whose call ended in a status only a
server fault gives, or that made the server log an error), and `by_kind`: per kind, inputs
`tried`, `accepted`, outcome `reasons` and `variants` tried; `mutation_by_operator` the same per
mutation operator (variants: the exchange mutated), with `valid` mutants apart, and
`mutants_valid` and `mutants_valid_accepted` in all.

    python benchmarks/chaos_fuzz.py [--quick] [--json] [--examples N] [--mutations N] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import pathlib
import sys
import threading
import time
from typing import NamedTuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt.jobspec import OuterSpec
from metaopt.learner import security
from metaopt.learner.core import Learner, LearnerConfig
from metaopt.learner.server import MAX_RECEIVE_BYTES, SERVICE_NAME, make_server
from metaopt.workers.client import LearnerClient

# Run as a script, only benchmarks/ is on sys.path: the mutations are imported as `benchmarks.*`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.chaos_mutations import EXCHANGES, Contract, judge, mutate, traffic  # noqa: E402

JOB, TOKEN, FAMILY, SIZE = "fuzz", "fuzz-token-7f3a", "quadratic", 37
VERSION, MAX_STALENESS, MAX_NORM = 5, 2, 1e3  # θ's version when fuzzing starts; the learner's limits
PER_KIND, MUTATIONS = 100, 8_000  # the long form: 10,200 hostile inputs
QUICK_PER_KIND, QUICK_MUTATIONS = 5, 200
F32, BF16 = pb.ENCODING_FLOAT32_LE, pb.ENCODING_BFLOAT16_LE
UINT64 = 2**64 - 1
AUTH = security.token_call_metadata(TOKEN)
CASE_TIMEOUT_S = 15.0
# Statuses only a fault of the server gives: a handler that raised, a stream that hung, a server gone.
FAULT_STATUSES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS}

VALUES = arrays(np.float32, SIZE, elements=st.floats(-1, 1, width=32))  # norm ≤ √37, far below MAX_NORM
ENCODINGS = st.sampled_from([F32, BF16])
SEQUENCES = st.integers(1, UINT64)
FRESH = st.integers(VERSION - MAX_STALENESS, VERSION)
CHUNK_BYTES = st.sampled_from([0, 0, 16, 40])  # 0: inline; else ≥ 2 chunks (θ is ≥ 74 bytes)
TOKEN_CHARS = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", max_size=40)


class Who(NamedTuple):
    """The worker incarnation an example speaks as: a run id of its own, so nothing carries over."""

    worker: str
    run: str
    digest: str

    def hello(self, **fields) -> pb.WorkerMessage:
        hello = pb.Hello(job_id=JOB, worker_id=self.worker, run_id=self.run,
                         theta_structure_digest=self.digest)
        for name, value in fields.items():
            setattr(hello, name, value)
        return pb.WorkerMessage(hello=hello)


@dataclasses.dataclass
class Case:
    variant: str
    messages: list  # WorkerMessages or raw bytes, Hello first unless its absence is the fault
    metadata: tuple | None = AUTH
    controls: int = 0  # valid estimates right after the Hello, acked before the hostile part
    setup: list = dataclasses.field(default_factory=list)  # a stream of valid estimates sent first
    cancel: bool = False  # the client goes away after sending, instead of half-closing
    refused: bool = False  # the whole call must be refused: a Welcome or a θ counts as accepted
    get_theta: bool = False  # messages[0] is a GetThetaRequest


def _estimate(who: Who, flat, sent_as=F32, **fields) -> pb.GradientEstimate:
    """A valid estimate of `flat` encoded `sent_as`, then `fields` set as they are given."""
    data, length, crc = wire.encode(np.asarray(flat, np.float32), sent_as)
    est = pb.GradientEstimate(
        job_id=JOB, worker_id=who.worker, run_id=who.run, sequence=1, theta_version=VERSION,
        task=pb.TaskSpec(name=FAMILY, kwargs_json="{}"), num_particles=1, inner_steps=1, mean_loss=1.0,
        encoding=sent_as, values=data, length=length, crc32=crc)
    for name, value in fields.items():
        setattr(est, name, value)
    return est


def _valid(draw, who: Who, values=None) -> tuple[pb.GradientEstimate, int]:
    """A valid estimate of `who` and the chunk size it travels in (0: inline)."""
    values = draw(VALUES) if values is None else values
    est = _estimate(who, values, draw(ENCODINGS), sequence=draw(SEQUENCES), theta_version=draw(FRESH))
    return est, draw(CHUNK_BYTES)


def _chunk(sequence: int, index: int, values: bytes) -> pb.WorkerMessage:
    return pb.WorkerMessage(chunk=pb.EstimateChunk(sequence=sequence, index=index, values=values))


def _split(est: pb.GradientEstimate, chunk_bytes: int) -> list[pb.WorkerMessage]:
    """`est` inline (chunk_bytes 0, or no values), else a header and chunks of `chunk_bytes`."""
    data = est.values
    if not chunk_bytes or not data:
        return [pb.WorkerMessage(estimate=est)]
    header = pb.GradientEstimate()
    header.CopyFrom(est)
    header.ClearField("values")
    header.chunks = math.ceil(len(data) / chunk_bytes)
    starts = range(0, len(data), chunk_bytes)
    return [pb.WorkerMessage(estimate=header)] + [
        _chunk(est.sequence, i, data[at:at + chunk_bytes]) for i, at in enumerate(starts)]


def _is_hello(raw: bytes) -> bool:
    try:
        return pb.WorkerMessage.FromString(raw).WhichOneof("kind") == "hello"
    except DecodeError:
        return False


def _sent_as(chunk: int) -> str:
    return "chunked" if chunk else "inline"


# -- the kinds of hostile input: (draw, who) → Case ----------------------------------------------

def truncated_payload(draw, who):
    est, chunk = _valid(draw, who)
    if draw(st.booleans()):  # the serialised message itself cut short: protobuf cannot parse it
        raw = pb.WorkerMessage(estimate=est).SerializeToString()
        return Case("message_cut", [who.hello(), raw[:-draw(st.integers(1, len(raw) - 1))]])
    est.values = est.values[:draw(st.integers(0, len(est.values) - 1))]
    if draw(st.booleans()):
        est.crc32 = wire.checksum(est.values)  # a checksum that matches what is left
    return Case(f"values_cut_{_sent_as(chunk)}", [who.hello(), *_split(est, chunk)])


def oversized_payload(draw, who):
    est, chunk = _valid(draw, who)
    width = wire.DECODERS[est.encoding][0]
    est.values += draw(st.binary(min_size=1, max_size=64))
    variant = draw(st.sampled_from(["more_values", "trailing_bytes"]))
    if variant == "more_values":  # whole extra values, and a length that says so
        est.values += bytes(-len(est.values) % width)
        est.length = len(est.values) // width
    est.crc32 = wire.checksum(est.values)
    return Case(f"{variant}_{_sent_as(chunk)}", [who.hello(), *_split(est, chunk)])


def over_message_limit(draw, who):
    est, _ = _valid(draw, who)
    big = bytes(MAX_RECEIVE_BYTES + draw(st.integers(1, 64 * 1024)))
    if draw(st.booleans()):
        est.values, est.crc32 = big, wire.checksum(big)
        return Case("estimate", [who.hello(), pb.WorkerMessage(estimate=est)])
    header, *_ = _split(est, 16)
    return Case("chunk", [who.hello(), header, _chunk(est.sequence, 0, big)])


def wrong_length(draw, who):
    est, chunk = _valid(draw, who)
    est.length = draw(st.integers(0, UINT64).filter(lambda n: n != SIZE))
    return Case(_sent_as(chunk), [who.hello(), *_split(est, chunk)])


def wrong_encoding(draw, who):
    values, chunk = draw(VALUES), draw(CHUNK_BYTES)
    variant = draw(st.sampled_from(["unknown_enum", "bf16_declared_f32_sent", "f32_declared_bf16_sent",
                                    "float64_sent"]))
    if variant == "unknown_enum":
        est = _estimate(who, values, encoding=draw(st.integers(-2**31, 2**31 - 1).filter(
            lambda e: e not in wire.DECODERS)))
    elif variant == "bf16_declared_f32_sent":
        est = _estimate(who, values, F32, encoding=BF16)
    elif variant == "f32_declared_bf16_sent":
        est = _estimate(who, values, BF16, encoding=F32)
    else:
        data = values.astype("<f8").tobytes()
        est = _estimate(who, values, values=data, crc32=wire.checksum(data))
    est.sequence = draw(SEQUENCES)
    return Case(f"{variant}_{_sent_as(chunk)}", [who.hello(), *_split(est, chunk)])


def non_finite(draw, who):
    values = draw(VALUES).copy()
    if draw(st.booleans()):
        est, chunk = _valid(draw, who, values)
        est.mean_loss = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return Case("mean_loss", [who.hello(), *_split(est, chunk)])
    positions = draw(st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=SIZE, unique=True))
    values[positions] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    est, chunk = _valid(draw, who, values)
    return Case("values", [who.hello(), *_split(est, chunk)])


def huge_norm(draw, who):
    values = draw(VALUES).copy()
    variant = draw(st.sampled_from(["one_large", "all_large"]))
    magnitude = draw(st.floats(2 * MAX_NORM, float(np.float32(1e38)), width=32))  # finite in bfloat16 too
    if variant == "one_large":
        values[draw(st.integers(0, SIZE - 1))] = magnitude * draw(st.sampled_from([1, -1]))
    else:
        values[:] = magnitude  # above 1e19 the squared norm overflows float32
    est, chunk = _valid(draw, who, values)
    return Case(variant, [who.hello(), *_split(est, chunk)])


def bad_checksum(draw, who):
    est, chunk = _valid(draw, who)
    if draw(st.booleans()):
        est.crc32 ^= draw(st.integers(1, 2**32 - 1))
        variant = "wrong_crc"
    else:
        bit = draw(st.integers(0, 8 * len(est.values) - 1))
        data = bytearray(est.values)
        data[bit // 8] ^= 1 << (bit % 8)
        est.values, variant = bytes(data), "flipped_bit"
    return Case(variant, [who.hello(), *_split(est, chunk)])


def stale_version(draw, who):
    est, chunk = _valid(draw, who)
    est.theta_version = draw(st.integers(0, VERSION - MAX_STALENESS - 1))
    return Case(_sent_as(chunk), [who.hello(), *_split(est, chunk)])


def future_version(draw, who):
    est, chunk = _valid(draw, who)
    est.theta_version = draw(st.integers(VERSION + 1, UINT64))
    return Case(_sent_as(chunk), [who.hello(), *_split(est, chunk)])


def invalid_field(draw, who):
    est, chunk = _valid(draw, who)
    field = draw(st.sampled_from(["sequence", "num_particles", "inner_steps", "task_family"]))
    if field == "task_family":
        est.task.name = draw(st.text(max_size=20).filter(lambda name: name != FAMILY))
    else:
        setattr(est, field, 0)
    return Case(field, [who.hello(), *_split(est, chunk)])


def no_hello(draw, who):
    est, chunk = _valid(draw, who)
    variant = draw(st.sampled_from(["estimate_first", "chunk_first", "empty_message", "random_bytes",
                                    "nothing"]))
    first = {"estimate_first": _split(est, chunk), "chunk_first": [_chunk(est.sequence, 0, est.values)],
             "empty_message": [b""], "nothing": [],
             "random_bytes": [draw(st.binary(max_size=200).filter(lambda raw: not _is_hello(raw)))]}
    return Case(variant, first[variant], refused=True)


def wrong_job(draw, who):
    est, chunk = _valid(draw, who)
    other = draw(st.text(max_size=40).filter(lambda job: job != JOB))
    variant = draw(st.sampled_from(["hello", "estimate", "get_theta"]))
    if variant == "get_theta":
        return Case(variant, [pb.GetThetaRequest(job_id=other)], refused=True, get_theta=True)
    if variant == "hello":
        return Case(variant, [who.hello(job_id=other), *_split(est, chunk)], refused=True)
    est.job_id = other
    return Case(variant, [who.hello(), *_split(est, chunk)])


def wrong_structure(draw, who):
    est, chunk = _valid(draw, who)
    digest = draw(st.text("0123456789abcdef", max_size=64).filter(lambda d: d != who.digest))
    return Case("digest", [who.hello(theta_structure_digest=digest), *_split(est, chunk)], refused=True)


def foreign_worker(draw, who):
    est, chunk = _valid(draw, who)
    variant = draw(st.sampled_from(["other_worker", "other_run", "second_hello", "no_kind"]))
    if variant == "second_hello":
        return Case(variant, [who.hello(), who.hello()])
    if variant == "no_kind":  # an empty WorkerMessage: none of hello, estimate, chunk
        return Case(variant, [who.hello(), b""])
    field = "worker_id" if variant == "other_worker" else "run_id"
    setattr(est, field, draw(st.text(max_size=20).filter(lambda name: name != getattr(est, field))))
    return Case(variant, [who.hello(), *_split(est, chunk)])


def replay(draw, who):
    original, chunk = _valid(draw, who)
    again = pb.GradientEstimate()
    again.CopyFrom(original)
    if draw(st.booleans()):  # other values under an old sequence
        again, _ = _valid(draw, who)
    again.sequence = draw(st.integers(1, original.sequence))  # not above the last one accepted
    if draw(st.booleans()):  # the worker reconnects with the same run id
        return Case("new_stream", [who.hello(), *_split(again, chunk)],
                    setup=[who.hello(), *_split(original, chunk)])
    return Case("same_stream", [who.hello(), *_split(original, chunk), *_split(again, chunk)], controls=1)


def missing_token(draw, who):
    est, chunk = _valid(draw, who)
    variant = draw(st.sampled_from(["none", "not_bearer", "other_key", "get_theta"]))
    metadata = None
    if variant == "other_key":
        metadata = (("x-job-token", TOKEN),)
    elif variant == "not_bearer":
        scheme = draw(TOKEN_CHARS.filter(lambda v: v and not v.lower().startswith("bearer")))
        metadata = ((security.TOKEN_METADATA_KEY, scheme),)
    if variant == "get_theta":
        return Case(variant, [pb.GetThetaRequest(job_id=JOB)], metadata, refused=True, get_theta=True)
    return Case(variant, [who.hello(), *_split(est, chunk)], metadata, refused=True)


def wrong_token(draw, who):
    est, chunk = _valid(draw, who)
    token = draw((TOKEN_CHARS | st.sampled_from([TOKEN[:-1], TOKEN + "x", TOKEN.upper()])).filter(
        lambda t: t != TOKEN))
    metadata = ((security.TOKEN_METADATA_KEY, f"Bearer {token}"),)
    if draw(st.booleans()):
        return Case("get_theta", [pb.GetThetaRequest(job_id=JOB)], metadata, refused=True, get_theta=True)
    return Case("connect", [who.hello(), *_split(est, chunk)], metadata, refused=True)


def half_closed(draw, who):
    est, _ = _valid(draw, who)
    messages = _split(est, draw(st.sampled_from([16, 40])))
    sent = messages[:1 + draw(st.integers(0, len(messages) - 2))]  # the header and not all its chunks
    cancel = draw(st.booleans())
    return Case("cancelled" if cancel else "half_closed", [who.hello(), *sent], cancel=cancel)


def random_bytes(draw, who):
    raws = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
    return Case("one" if len(raws) == 1 else "several", [who.hello(), *raws])


def bad_chunks(draw, who):
    est, _ = _valid(draw, who)
    header, *chunks = _split(est, draw(st.sampled_from([16, 40])))
    n, seq = len(chunks), est.sequence
    variant = draw(st.sampled_from(["out_of_order", "duplicated", "foreign_sequence", "index_out_of_range",
                                    "empty_chunk", "stray_chunk", "cut_off", "fewer_declared"]))
    i = draw(st.integers(0, n - 2))  # never the last chunk: the estimate must not complete whole
    if variant == "out_of_order":
        chunks[i], chunks[i + 1] = chunks[i + 1], chunks[i]
    elif variant == "duplicated":
        chunks.insert(i + 1, chunks[i])
    elif variant == "foreign_sequence":
        chunks[i] = _chunk(draw(SEQUENCES.filter(lambda s: s != seq)), i, chunks[i].chunk.values)
    elif variant == "index_out_of_range":
        chunks[i] = _chunk(seq, draw(st.integers(n, 2**32 - 1)), chunks[i].chunk.values)
    elif variant == "empty_chunk":
        chunks.insert(i, _chunk(seq, i, b""))
    elif variant == "stray_chunk":  # a chunk with no header before it
        return Case(variant, [who.hello(), chunks[i]])
    elif variant == "cut_off":  # a Hello (anything but the next chunk) cuts the estimate off
        chunks = [*chunks[:i + 1], who.hello()]
    else:
        header.estimate.chunks = draw(st.integers(1, n - 1))  # the values end short; the rest stray
    return Case(variant, [who.hello(), header, *chunks])


def inline_values_with_chunks(draw, who):
    """The proto says `values` is empty when `chunks` > 0; here both are set."""
    est, _ = _valid(draw, who)
    est.chunks = draw(st.integers(1, 8))
    if draw(st.booleans()):
        return Case("no_chunks_follow", [who.hello(), pb.WorkerMessage(estimate=est)])
    size = math.ceil(len(est.values) / est.chunks)
    chunks = [_chunk(est.sequence, i, est.values[i * size:(i + 1) * size]) for i in range(est.chunks)]
    return Case("chunks_follow", [who.hello(), pb.WorkerMessage(estimate=est), *chunks])


KINDS = {f.__name__: f for f in (
    truncated_payload, oversized_payload, over_message_limit, wrong_length, wrong_encoding, non_finite,
    huge_norm, bad_checksum, stale_version, future_version, invalid_field, no_hello, wrong_job,
    wrong_structure, foreign_worker, replay, missing_token, wrong_token, half_closed, random_bytes,
    bad_chunks, inline_values_with_chunks)}


# -- the fuzzer ----------------------------------------------------------------------------------

class _Errors(logging.Handler):
    """Error records logged anywhere while fuzzing (a stream the server ended on an exception)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


class _Fuzzer:
    def __init__(self, learner: Learner, port: int, errors: _Errors):
        self.learner, self.errors = learner, errors
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.connect = self.channel.stream_stream("/metaopt.v1.Learner/Connect",
                                                  response_deserializer=pb.LearnerMessage.FromString)
        self.get_theta = self.channel.unary_unary("/metaopt.v1.Learner/GetTheta")  # bytes both ways
        self.by_kind = {kind: _stats() for kind in KINDS}
        self.by_operator = collections.defaultdict(_stats)
        self.mutants_valid = self.mutants_valid_accepted = 0
        self.tried = self.faults = self.messages_sent = self.controls = self.controls_accepted = 0
        self.seen_errors = 0  # error records already put down to earlier cases
        self.faulty: list[str] = []  # what the faults were, for people

    def theta(self) -> tuple[bytes, int, bytes | None]:
        """θ's bytes, its version, and θ as GetTheta serves it (None if it does not: a crash)."""
        try:
            served = self.get_theta(pb.GetThetaRequest(job_id=JOB).SerializeToString(), metadata=AUTH,
                                    timeout=10)
        except grpc.RpcError:
            served = None
        return np.asarray(self.learner.theta).tobytes(), self.learner.version, served

    def run(self, examples: int, seed: int) -> None:
        """`examples` hostile inputs, shared out evenly among the kinds; one hypothesis run per kind
        (hypothesis wants a test's draws to depend on nothing but its own earlier draws)."""
        for i, kind in enumerate(KINDS):
            self._run_kind(kind, examples // len(KINDS) + (i < examples % len(KINDS)), seed)

    def _run_kind(self, kind: str, examples: int, seed: int) -> None:
        @hypothesis_seed(seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large], print_blob=False)
        @given(st.data())
        def one(data):
            who = Who(f"fuzz-{kind}", f"run-{self.tried}", self.learner.digest)
            case = KINDS[kind](data.draw, who)
            self._record(self.by_kind[kind], case.variant, *self._send(case))

        one()

    def mutations(self, hostile: int, seed: int) -> None:
        """Mutants of real traffic, each an exchange of its own, until `hostile` of them are
        hostile by `chaos_mutations.judge`; the valid ones are sent as well."""
        rng = np.random.default_rng(seed)
        versions = range(VERSION - MAX_STALENESS, VERSION + 1)
        contract = Contract(JOB, self.learner.digest, SIZE, FAMILY, versions, MAX_NORM)
        sent = 0
        while self.hostile_mutants() < hostile:
            who = Who("fuzz-mutation", f"run-{sent}", self.learner.digest)
            values = rng.uniform(-1, 1, SIZE).astype(np.float32)
            est = _estimate(who, values, (F32, BF16)[rng.integers(2)], sequence=int(rng.integers(1, 2**63)),
                            theta_version=int(rng.choice(versions)))
            exchanges = traffic(who.hello().hello, est)
            exchange = EXCHANGES[rng.integers(len(EXCHANGES))]
            raws = list(exchanges[exchange])
            at = rng.integers(len(raws))
            partners = [raw for messages in exchanges.values() for raw in messages]
            operator, raws[at] = mutate(rng, raws[at], partners, worker_message=exchange != "get_theta")
            allowed, refused = judge(contract, exchange, raws)
            accepted, reasons, status = self._send(
                Case(exchange, raws, refused=refused, get_theta=exchange == "get_theta"))
            sent += 1
            if refused or not allowed:
                self._record(self.by_operator[operator], exchange, accepted, reasons, status)
                continue
            acks = reasons.count("ACCEPTED")  # estimates; θ served is allowed here
            self.mutants_valid += 1
            self.mutants_valid_accepted += min(acks, allowed)
            self._record(self.by_operator[operator], exchange, acks > allowed, [], status, hostile=False)

    def hostile_mutants(self) -> int:
        return sum(stats["tried"] for stats in self.by_operator.values())

    def _send(self, case: Case) -> tuple[bool, list[str], grpc.StatusCode]:
        """(accepted, reasons, final status) of one hostile input."""
        raws = [m if isinstance(m, bytes) else m.SerializeToString() for m in case.messages]
        self.messages_sent += len(raws) + len(case.setup)
        if case.get_theta:
            try:
                self.get_theta(raws[0], metadata=case.metadata, timeout=CASE_TIMEOUT_S)
                return True, ["served"], grpc.StatusCode.OK
            except grpc.RpcError as err:
                return False, [f"status:{err.code().name}"], err.code()
        if case.setup:
            self._count_controls(self._stream(case.setup, AUTH)[1])
        welcomed, acks, status = self._stream(raws, case.metadata, case.cancel)
        self._count_controls(acks[:case.controls])
        hostile = acks[case.controls:]
        reasons = ["ACCEPTED" if a.accepted else pb.RejectReason.Name(a.reason).removeprefix("REJECT_REASON_")
                   for a in hostile]
        if status != grpc.StatusCode.OK:
            reasons.append(f"status:{status.name}")
        elif not hostile:
            reasons.append("dropped")
        return any(a.accepted for a in hostile) or (case.refused and welcomed), reasons, status

    def _count_controls(self, acks: list[pb.Ack]) -> None:
        self.controls += len(acks)
        self.controls_accepted += sum(a.accepted for a in acks)

    def _stream(self, raws: list, metadata, cancel: bool = False):
        """Send `raws` on one Connect stream, then half-close it (or cancel it, if `cancel`) and
        read it to its end: (welcomed, acks, final status)."""
        sent, release = threading.Event(), threading.Event()

        def requests():
            yield from (r if isinstance(r, bytes) else r.SerializeToString() for r in raws)
            sent.set()
            if cancel:
                release.wait(CASE_TIMEOUT_S)

        call = self.connect(requests(), metadata=metadata, timeout=CASE_TIMEOUT_S)
        if cancel:
            sent.wait(CASE_TIMEOUT_S)
            time.sleep(0.05)  # let the server take in the partial estimate first
            call.cancel()
        welcomed, acks, status = False, [], grpc.StatusCode.OK
        try:
            for reply in call:
                welcomed |= reply.WhichOneof("kind") == "welcome"
                if reply.WhichOneof("kind") == "ack":
                    acks.append(reply.ack)
        except grpc.RpcError as err:
            status = err.code()
        finally:
            release.set()
        return welcomed, acks, status

    def _record(self, stats: dict, variant: str, accepted: bool, reasons: list[str], status,
                hostile: bool = True) -> None:
        errors, self.seen_errors = len(self.errors.records) - self.seen_errors, len(self.errors.records)
        stats["tried" if hostile else "valid"] += 1
        stats["accepted"] += accepted
        stats["reasons"].update(reasons)
        stats["variants"][variant] += 1
        self.tried += hostile
        if status in FAULT_STATUSES or errors:
            self.faults += 1
            self.faulty.append(f"{variant}: {', '.join(reasons) or status.name}")

    def serves_a_valid_worker(self) -> bool:
        """Whether a real worker client still connects and gets a valid estimate accepted."""
        who = Who("fuzz-control", "after-fuzzing", self.learner.digest)
        try:
            client = LearnerClient(self.address, who.hello().hello, connect_timeout_s=10, token=TOKEN)
        except grpc.RpcError:
            return False
        try:
            values = np.linspace(-0.5, 0.5, SIZE, dtype=np.float32)
            if not client.send(_estimate(who, values, sequence=1, theta_version=self.learner.version)):
                return False
            deadline = time.monotonic() + CASE_TIMEOUT_S
            while client.accepted + client.rejected == 0 and client.alive and time.monotonic() < deadline:
                time.sleep(0.01)
            return client.accepted == 1
        finally:
            client.close()

    def healthy(self) -> bool:
        try:
            check = health_pb2_grpc.HealthStub(self.channel).Check
            reply = check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _stats() -> dict:
    return {"tried": 0, "valid": 0, "accepted": 0, "reasons": collections.Counter(),
            "variants": collections.Counter()}


def _figures(stats: dict) -> dict:
    return {key: dict(value) if isinstance(value, collections.Counter) else value
            for key, value in stats.items()}


def _make_learner() -> Learner:
    """A learner whose meta-batch is never full here (θ cannot move), resumed at VERSION."""
    outer = OuterSpec(meta_batch_size=1_000_000_000, max_staleness=MAX_STALENESS, max_estimate_norm=MAX_NORM)
    config = LearnerConfig(job_id=JOB, max_outer_steps=1_000_000, outer=outer, task_families=(FAMILY,))
    learner = Learner(config, {"w": np.linspace(-1, 1, SIZE, dtype=np.float32)})
    _, arrays_, meta = learner.snapshot()
    learner.restore(arrays_, meta | {"version": VERSION})  # as from a checkpoint: stale versions exist
    return learner


def fuzz_learner(examples: int = PER_KIND * len(KINDS), seed: int = 0, mutations: int = MUTATIONS) -> dict:
    """Send `examples` hostile inputs (hypothesis) and `mutations` hostile mutants of real traffic,
    both seeded (the same inputs for the same seed), to a real learner server; the figures
    described in this module's docstring."""
    if examples < len(KINDS):
        raise ValueError(f"examples must be at least {len(KINDS)} (one per kind), got {examples}")
    started = time.perf_counter()
    learner = _make_learner()
    server, port = make_server(learner, "127.0.0.1", 0, token=TOKEN)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    fuzzer = _Fuzzer(learner, port, errors)
    try:
        before = fuzzer.theta()
        fuzzer.run(examples, seed)
        fuzzer.mutations(mutations, seed)
        after_invalid = fuzzer.theta()
        served = fuzzer.serves_a_valid_worker()  # also a barrier: every earlier message is settled
        alive = server.loop.is_running() and fuzzer.healthy()
        after_valid = fuzzer.theta()
        server_accepted = sum(learner.accepted_by_worker.values())
    finally:
        logging.getLogger().removeHandler(errors)
        fuzzer.channel.close()
        learner.stop()
        server.stop(None)
    acked_invalid = sum(s["accepted"] for s in [*fuzzer.by_kind.values(), *fuzzer.by_operator.values()])
    # The learner's own count: accepted estimates the fuzzer did not send as valid ones.
    unacked_invalid = server_accepted - fuzzer.controls_accepted - fuzzer.mutants_valid_accepted - served
    return {
        "benchmark": "chaos_fuzz", "examples": examples, "seed": seed,
        "fuzz_messages": fuzzer.tried,
        "fuzz_inputs": {"hypothesis": fuzzer.tried - fuzzer.hostile_mutants(),
                        "mutations": fuzzer.hostile_mutants()},
        "invalid_accepted": max(acked_invalid, unacked_invalid),
        "server_crashes": 0 if served and alive else 1,
        "theta_unchanged_by_invalid": before[:2] == after_invalid[:2] == after_valid[:2] and len(
            {got for *_, got in (before, after_invalid, after_valid) if got is not None}) == 1,
        "server_faults": fuzzer.faults, "faults": fuzzer.faulty[:20], "errors_logged": errors.records[:20],
        "messages_sent": fuzzer.messages_sent, "control_estimates": fuzzer.controls,
        "controls_accepted": fuzzer.controls_accepted, "valid_worker_served_after": served,
        "theta_version": before[1], "seconds": round(time.perf_counter() - started, 2),
        "mutants_valid": fuzzer.mutants_valid, "mutants_valid_accepted": fuzzer.mutants_valid_accepted,
        "by_kind": {kind: _figures(s) for kind, s in fuzzer.by_kind.items()},
        "mutation_by_operator": {op: _figures(s) for op, s in sorted(fuzzer.by_operator.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_PER_KIND} examples of each kind, "
                        f"{QUICK_MUTATIONS} hostile mutants (default: {PER_KIND} and {MUTATIONS})")
    parser.add_argument("--examples", type=int, help="hostile inputs from hypothesis, shared among the kinds")
    parser.add_argument("--mutations", type=int, help="hostile mutants of real traffic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_fuzz.json here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # hostile input makes the server warn, by design
    per_kind, mutations = (QUICK_PER_KIND, QUICK_MUTATIONS) if args.quick else (PER_KIND, MUTATIONS)
    result = fuzz_learner(args.examples or per_kind * len(KINDS), args.seed,
                          mutations if args.mutations is None else args.mutations)
    for name, stats in [*result["by_kind"].items(), *result["mutation_by_operator"].items()]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(stats["reasons"].items()))
        print(f"{name:26s} tried {stats['tried']:4d}  accepted {stats['accepted']:3d}  {reasons}")
    print(f"{result['fuzz_messages']} hostile inputs ({result['fuzz_inputs']['hypothesis']} from hypothesis, "
          f"{result['fuzz_inputs']['mutations']} mutants; {result['messages_sent']} messages) in "
          f"{result['seconds']} s: {result['invalid_accepted']} accepted, {result['server_crashes']} "
          f"crashes, {result['server_faults']} server faults, θ unchanged: "
          f"{result['theta_unchanged_by_invalid']}; {result['mutants_valid']} valid mutants also sent")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_fuzz.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
