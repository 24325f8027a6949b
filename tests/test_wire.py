"""Arrays on the wire (metaopt/wire.py): the hand parser of chunk messages against protobuf's
own, on generated and on arbitrary bytes (hypothesis, 300 examples each); the checksum is
zlib's."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt import wire
from metaopt._proto import learner_pb2 as pb

UINT64 = st.integers(0, 2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(sequence=UINT64, index=st.integers(0, 2**32 - 1), values=st.binary(max_size=600))
def test_parse_chunk_reads_what_protobuf_wrote(sequence, index, values):
    chunk = pb.EstimateChunk(sequence=sequence, index=index, values=values)
    raw = pb.WorkerMessage(chunk=chunk).SerializeToString()
    got_sequence, got_index, got_values = wire.parse_chunk(raw)
    assert (got_sequence, got_index, bytes(got_values)) == (sequence, index, values)
    assert isinstance(got_values, memoryview) and got_values.obj is raw  # a view, not a copy


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64) | st.binary(max_size=8).map(lambda b: b"\x1a" + b))
def test_parse_chunk_never_disagrees_with_protobuf_on_arbitrary_bytes(raw):
    """On any input it either declines (protobuf then decides) or agrees with protobuf."""
    parsed = wire.parse_chunk(raw)
    if parsed is None:
        return
    message = pb.WorkerMessage.FromString(raw)  # must not raise: the hand parser accepted it
    assert message.WhichOneof("kind") == "chunk"
    assert (message.chunk.sequence, message.chunk.index, message.chunk.values) == (
        parsed[0], parsed[1], bytes(parsed[2]))


def test_parse_chunk_declines_other_messages_and_damage():
    estimate = pb.WorkerMessage(estimate=pb.GradientEstimate(sequence=3)).SerializeToString()
    chunk = pb.WorkerMessage(chunk=pb.EstimateChunk(sequence=1, values=b"abcd")).SerializeToString()
    assert wire.parse_chunk(estimate) is None
    assert wire.parse_chunk(chunk[:-1]) is None  # cut short
    assert wire.parse_chunk(chunk + chunk) is None  # two chunks: protobuf's merge rules decide
    with pytest.raises(DecodeError):
        pb.WorkerMessage.FromString(chunk[:-1])


def test_checksum_is_zlibs_crc32_and_continues():
    data = np.random.default_rng(0).normal(size=1000).astype(np.float32).tobytes()
    assert wire.checksum(data) == zlib.crc32(data) == wire.encode(np.frombuffer(data, np.float32))[2]
    assert wire.checksum(data[400:], wire.checksum(data[:400])) == zlib.crc32(data)
