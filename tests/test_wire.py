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


def _offset(view: memoryview, raw: bytes) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data - np.frombuffer(raw, np.uint8).ctypes.data


@settings(max_examples=300, deadline=None)
@given(sequence=UINT64, index=st.integers(0, 2**32 - 1), size=st.integers(1, 3000))
def test_chunk_message_aligns_the_values_and_protobuf_reads_it(sequence, index, size):
    values = np.random.default_rng(size).bytes(size)
    raw = wire.chunk_message(sequence, index, values)
    message = pb.WorkerMessage.FromString(raw)
    assert (message.chunk.sequence, message.chunk.index, message.chunk.values) == (sequence, index, values)
    got_sequence, got_index, got_values = wire.parse_chunk(raw)
    assert (got_sequence, got_index, bytes(got_values)) == (sequence, index, values)
    assert _offset(got_values, raw) % wire.CHUNK_ALIGN == 0


def test_chunk_message_aligns_a_full_size_chunk():
    values = np.arange(2**20, dtype=np.float32).tobytes()  # 4 MiB, as workers send them
    raw = wire.chunk_message(7, 2, memoryview(values))
    got = wire.parse_chunk(raw)
    assert _offset(got[2], raw) % wire.CHUNK_ALIGN == 0 and bytes(got[2]) == values
    assert wire.aligned([got[2]], pb.ENCODING_FLOAT32_LE)


def test_aligned_needs_whole_values_at_aligned_addresses():
    raw = memoryview(np.zeros(64, np.float32).tobytes())  # bytes' data is 16-byte aligned
    f32, bf16 = pb.ENCODING_FLOAT32_LE, pb.ENCODING_BFLOAT16_LE
    assert wire.aligned([raw[:16], raw[16:64]], f32)
    assert not wire.aligned([raw[1:17]], f32)  # misaligned address
    assert not wire.aligned([raw[:6], raw[6:16]], f32)  # a value split between parts
    assert wire.aligned([raw[:6], raw[6:16]], bf16)


def test_decode_parts_checks_the_whole_and_keeps_the_parts():
    flat = np.random.default_rng(1).normal(size=100).astype(np.float32)
    data, length, crc = wire.encode(flat)
    view = memoryview(data)
    parts = wire.decode_parts([view[:40], view[40:]], length, crc)
    assert [p.size for p in parts] == [10, 90]
    np.testing.assert_array_equal(np.concatenate(parts), flat)
    with pytest.raises(ValueError, match="checksum"):
        wire.decode_parts([view[40:], view[:40]], length, crc)  # the right bytes, out of order
    with pytest.raises(ValueError, match="bytes"):
        wire.decode_parts([view[:40]], length, crc)
