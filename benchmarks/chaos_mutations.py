"""Mutations of real traffic, for the gRPC fuzzer (`chaos_fuzz.py`), and the judge that says
whether a mutant is still valid.

Traffic is what a worker sends, written by the worker's own code: the Hello, an estimate inline
or as a header and chunks (`workers.client.split_estimate`, which pads chunks so that their
values arrive aligned, as no protobuf serialiser does), and a GetThetaRequest. A mutant is one
exchange (a stream, or a GetTheta call) with one of its messages changed by one of `OPERATORS`:

    bit_flip    1 to 4 bits flipped anywhere
    truncate    cut short at any byte, or after any field
    splice      its head joined to the tail of another message of the traffic, at any byte or
                at field boundaries
    duplicate   one field (of the message, or of the message inside it) written again with
                another value, before or after the original: protobuf keeps the last

Cuts at field boundaries are made in the message inside a WorkerMessage, with its length
rewritten, so that they decode. Some mutants are still valid (a flipped bit of `mean_loss`, a
duplicate placed before the field it copies), so `judge` decides, the plain way, from the
contract in proto/metaopt/v1/learner.proto (each message decoded by protobuf, each estimate
checked as the learner promises to check it): how many requests of the exchange are valid. Only
mutants with none count as hostile; the others are sent too and reported apart. The judge is
lenient where the contract is silent (an empty chunk): the learner may be stricter, never laxer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import numpy as np
from google.protobuf.message import DecodeError

from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt.workers.client import split_estimate

OPERATORS = ("bit_flip", "truncate", "splice", "duplicate")
EXCHANGES = ("inline", "chunked", "get_theta")
CHUNK_BYTES = 64  # so that a float32 estimate of a few dozen values travels in several chunks
WIDTH = {pb.ENCODING_FLOAT32_LE: 4, pb.ENCODING_BFLOAT16_LE: 2}


@dataclasses.dataclass(frozen=True)
class Contract:
    """What the fuzzed learner accepts: its job, θ's structure and size, a task family, the θ
    versions not stale, the largest norm."""

    job_id: str
    digest: str
    size: int
    family: str
    versions: range
    max_norm: float


def traffic(hello: pb.Hello, est: pb.GradientEstimate) -> dict[str, list[bytes]]:
    """The exchanges a worker with `hello` makes to send `est`, and to fetch θ, as bytes."""
    first = pb.WorkerMessage(hello=hello).SerializeToString()
    return {"inline": [first, pb.WorkerMessage(estimate=est).SerializeToString()],
            "chunked": [first, *split_estimate(est, CHUNK_BYTES)],
            "get_theta": [pb.GetThetaRequest(job_id=hello.job_id).SerializeToString()]}


def mutate(rng: np.random.Generator, raw: bytes, others: list[bytes],
           worker_message: bool) -> tuple[str, bytes]:
    """(operator, a mutant of `raw` different from it); `others` are splice partners."""
    while True:
        operator = OPERATORS[rng.integers(len(OPERATORS))]
        if operator == "duplicate":
            mutant = _inside(_duplicate, rng, raw) if worker_message else _duplicate(rng, raw)
        elif operator == "truncate" and worker_message and rng.integers(2):
            mutant = _inside(_truncate_fields, rng, raw)
        elif operator == "splice" and worker_message and rng.integers(2):
            other = _inner(others[rng.integers(len(others))])
            mutant = _inside(functools.partial(_splice_fields, other=other), rng, raw)
        else:
            mutant = _MUTATORS[operator](rng, raw, others)
        if mutant is not None and mutant != raw:
            return operator, mutant


def _bit_flip(rng, raw, _others):
    data = bytearray(raw)
    for bit in rng.integers(0, 8 * len(data), size=rng.integers(1, 5)):
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _truncate(rng, raw, _others):
    return raw[:rng.integers(0, len(raw))]


def _truncate_fields(rng, raw: bytes) -> bytes | None:
    fields = _fields(raw)
    return None if not fields else raw[:fields[rng.integers(len(fields))][0]]


def _splice(rng, raw, others):
    other = others[rng.integers(len(others))]
    return raw[:rng.integers(1, len(raw) + 1)] + other[rng.integers(1, len(other) + 1):]


def _splice_fields(rng, raw: bytes, other: tuple[bytes, bytes] | None) -> bytes | None:
    """The first fields of `raw` and the last of the message inside `other`."""
    if other is None or (fields := _fields(raw)) is None or (tail := _fields(other[1])) is None:
        return None
    heads, tails = [0, *(end for *_, end in fields)], [start for start, *_ in tail] or [0]
    return raw[:heads[rng.integers(len(heads))]] + other[1][tails[rng.integers(len(tails))]:]


def _duplicate(rng, raw: bytes) -> bytes | None:
    """`raw` with one of its fields written again, with another value, before the original (which
    then wins) or after it (the copy wins)."""
    fields = _fields(raw)
    if not fields:
        return None
    start, wire_type, value_at, end = fields[rng.integers(len(fields))]
    if wire_type == 0:
        value = wire.encode_varint(int(rng.choice([0, 1, 2**32, 2**63, rng.integers(0, 2**62)])))
    elif wire_type == 2:
        _, body_at = wire.decode_varint(raw, value_at)
        body = bytearray(raw[body_at:end] or rng.bytes(1))
        body[rng.integers(len(body))] ^= 1 << rng.integers(8)
        value = wire.encode_varint(len(body)) + bytes(body)
    else:
        value = rng.bytes(end - value_at)
    at = (0, len(raw))[rng.integers(2)]
    return raw[:at] + raw[start:value_at] + value + raw[at:]


def _inner(raw: bytes) -> tuple[bytes, bytes] | None:
    """(the tag, the message inside) of a WorkerMessage, whose one field is a message; None else."""
    fields = _fields(raw)
    if not fields or len(fields) != 1 or fields[0][1] != 2:
        return None
    start, _, length_at, end = fields[0]
    return raw[start:length_at], raw[wire.decode_varint(raw, length_at)[1]:end]


def _inside(mutator, rng, raw: bytes) -> bytes | None:
    """`mutator` applied to the message inside a WorkerMessage, its length rewritten (a field
    copied whole at the top would merge into the original: no change)."""
    if (inner := _inner(raw)) is None:
        return mutator(rng, raw)
    tag, body = inner
    mutant = mutator(rng, body)
    return None if mutant is None else tag + wire.encode_varint(len(mutant)) + mutant


def _fields(raw: bytes) -> list[tuple[int, int, int, int]] | None:
    """The top-level fields of a serialised message as (start, wire type, where the value begins,
    end); a length-delimited value begins with its length. None if `raw` does not parse."""
    fields, at = [], 0
    try:
        while at < len(raw):
            start = at
            key, at = wire.decode_varint(raw, at)
            wire_type = key & 7
            value_at = at
            if wire_type == 0:
                _, at = wire.decode_varint(raw, at)
            elif wire_type == 2:
                size, body = wire.decode_varint(raw, at)
                at = body + size
            elif wire_type in (1, 5):
                at += 8 if wire_type == 1 else 4
            else:
                return None
            if at > len(raw):
                return None
            fields.append((start, wire_type, value_at, at))
    except IndexError:  # a varint or a field runs past the end
        return None
    return fields


# -- the judge -----------------------------------------------------------------------------------

def judge(contract: Contract, exchange: str, raws: list[bytes]) -> tuple[int, bool]:
    """(valid requests in the exchange: θ requests, or estimates the learner may accept; whether
    the call as a whole must be refused: a Welcome, or θ served, counts as acceptance then)."""
    if exchange == "get_theta":
        try:
            refused = pb.GetThetaRequest.FromString(raws[0]).job_id != contract.job_id
        except DecodeError:
            refused = True
        return int(not refused), refused
    messages = []
    for raw in raws:  # the learner ends the stream at the first message that does not decode
        try:
            messages.append(pb.WorkerMessage.FromString(raw))
        except DecodeError:
            break
    if not messages or messages[0].WhichOneof("kind") != "hello":
        return 0, True
    hello = messages[0].hello
    if (hello.job_id, hello.theta_structure_digest) != (contract.job_id, contract.digest):
        return 0, True
    return _valid_estimates(contract, hello, messages[1:]), False


def _valid_estimates(contract: Contract, hello: pb.Hello, messages: list[pb.WorkerMessage]) -> int:
    """How many estimates of a stream are valid: inline, or a header with `chunks` > 0 and no
    values, then exactly its chunks in order; anything else cuts a chunked estimate off."""
    valid, last_sequence, pending, parts = 0, 0, None, []
    for message in messages:
        kind = message.WhichOneof("kind")
        if kind == "chunk" and pending is not None:
            chunk = message.chunk
            if chunk.sequence != pending.sequence or chunk.index != len(parts):
                pending = None
                continue
            parts.append(chunk.values)
            if len(parts) == pending.chunks:
                if _valid(contract, hello, pending, b"".join(parts), last_sequence):
                    valid, last_sequence = valid + 1, pending.sequence
                pending = None
            continue
        pending = None  # anything but its next chunk cuts a chunked estimate off; a stray chunk is dropped
        if kind != "estimate":
            continue
        est = message.estimate
        if est.chunks and not est.values:
            pending, parts = est, []
        elif not est.chunks and _valid(contract, hello, est, est.values, last_sequence):
            valid, last_sequence = valid + 1, est.sequence
    return valid


def _valid(contract: Contract, hello: pb.Hello, est: pb.GradientEstimate, values: bytes,
           last_sequence: int) -> bool:
    width = WIDTH.get(est.encoding)
    if ((est.job_id, est.worker_id, est.run_id) != (contract.job_id, hello.worker_id, hello.run_id)
            or est.task.name != contract.family or width is None
            or min(est.num_particles, est.inner_steps) < 1 or est.sequence <= last_sequence
            or est.length != contract.size or len(values) != width * contract.size
            or zlib.crc32(values) != est.crc32 or est.theta_version not in contract.versions
            or not math.isfinite(est.mean_loss)):
        return False
    if width == 4:
        flat = np.frombuffer(values, "<f4").astype(np.float64)
    else:  # bfloat16: the high half of a float32
        flat = (np.frombuffer(values, "<u2").astype("<u4") << 16).view("<f4").astype(np.float64)
    return bool(np.isfinite(flat).all() and np.sqrt(np.dot(flat, flat)) <= contract.max_norm)


_MUTATORS = {"bit_flip": _bit_flip, "truncate": _truncate, "splice": _splice}
