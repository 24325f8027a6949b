"""Arrays on the wire: θ and gradient estimates as flat little-endian float32 buffers.

The flat order is JAX's tree order of θ's leaves (`jax.flatten_util.ravel_pytree`), which the
estimators also use. A `ThetaStructure` names every leaf's path and shape; its sha256 digest
is compared once per connection, so a worker whose learned optimizer differs from the
learner's is refused before it sends anything.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from isal import isal_zlib  # zlib's crc32, computed with carry-less multiplication: ~15× faster

from metaopt._proto import learner_pb2 as pb

FLOAT32_LE = np.dtype("<f4")


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def theta_structure(theta) -> pb.ThetaStructure:
    leaves = jax.tree_util.tree_flatten_with_path(theta)[0]
    return pb.ThetaStructure(
        arrays=[pb.ArraySpec(path=_path_name(p), shape=np.shape(x)) for p, x in leaves]
    )


def structure_digest(structure: pb.ThetaStructure) -> str:
    text = ";".join(f"{a.path}:{','.join(map(str, a.shape))}" for a in structure.arrays)
    return hashlib.sha256(text.encode()).hexdigest()


def structure_size(structure: pb.ThetaStructure) -> int:
    return sum(int(np.prod(a.shape, dtype=np.int64)) for a in structure.arrays)


def flatten(theta) -> np.ndarray:
    """θ as one flat float32 vector in tree order."""
    leaves = jax.tree.leaves(theta)
    if not leaves:
        return np.zeros(0, FLOAT32_LE)
    return np.concatenate([np.asarray(x, FLOAT32_LE).ravel() for x in leaves])


def unflatten(flat: np.ndarray, like):
    """The inverse of `flatten`, shaped like the pytree `like`."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.size(x)) for x in leaves]
    if flat.size != sum(sizes):
        raise ValueError(f"flat θ has {flat.size} values but the structure needs {sum(sizes)}")
    parts = np.split(np.asarray(flat, np.float32), np.cumsum(sizes)[:-1]) if leaves else []
    return jax.tree.unflatten(treedef, [p.reshape(np.shape(x)) for p, x in zip(parts, leaves, strict=True)])


def encode(flat: np.ndarray, encoding: int = pb.ENCODING_FLOAT32_LE) -> tuple[bytes, int, int]:
    """(bytes, length, crc32) of a flat vector, as float32 or bfloat16 (little-endian)."""
    if encoding == pb.ENCODING_BFLOAT16_LE:
        bits = np.ascontiguousarray(flat, FLOAT32_LE).view("<u4")
        # Round to nearest even on the 16 bits dropped (NaN and Inf stay NaN and Inf).
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        data = np.where(np.isfinite(flat), rounded, bits >> 16).astype("<u2").tobytes()
    elif encoding == pb.ENCODING_FLOAT32_LE:
        data = np.ascontiguousarray(flat, FLOAT32_LE).tobytes()
    else:
        raise ValueError(f"unknown encoding {encoding}")
    return data, int(flat.size), checksum(data)


def checksum(data, start: int = 0) -> int:
    """zlib's CRC-32 of `data` (continuing from `start`, the CRC of what came before)."""
    return isal_zlib.crc32(data, start)


def _bfloat16_to_float32(data) -> np.ndarray:
    return (np.frombuffer(data, "<u2").astype("<u4") << 16).view(FLOAT32_LE)


# Bytes per value and decoder (buffer → float32 array) of every encoding the learner accepts.
DECODERS = {
    pb.ENCODING_FLOAT32_LE: (4, lambda data: np.frombuffer(data, FLOAT32_LE)),
    pb.ENCODING_BFLOAT16_LE: (2, _bfloat16_to_float32),
}


def decode(values, length: int, crc32: int, encoding: int = pb.ENCODING_FLOAT32_LE) -> np.ndarray:
    """The float32 values of a buffer, after checking length and checksum: a read-only view
    without a copy for float32, a new array for bfloat16."""
    return decode_parts([values], length, crc32, encoding)[0]


def decode_parts(parts, length: int, crc32: int, encoding: int = pb.ENCODING_FLOAT32_LE) -> list[np.ndarray]:
    """`decode` for values that arrived in several buffers (a chunked estimate's, read in
    place): one float32 array per part. Each part must hold whole values (`aligned`)."""
    if encoding not in DECODERS:
        raise ValueError(f"unknown encoding {encoding}")
    width, to_float32 = DECODERS[encoding]
    total = sum(len(p) for p in parts)
    if total != width * length:
        raise ValueError(f"buffer has {total} bytes, expected {width} × {length}")
    crc = 0
    for part in parts:
        crc = checksum(part, crc)
    if crc != crc32:
        raise ValueError("checksum mismatch: the buffer was corrupted in transit")
    return [to_float32(part) for part in parts]


def aligned(parts, encoding: int) -> bool:
    """Whether every part holds whole values at an address numpy reads at full speed (a
    multiple of the value's width); misaligned float32 makes np.dot 10x and np.add 2x slower."""
    width = DECODERS[encoding][0]
    return all(len(p) % width == 0 and np.frombuffer(p, np.uint8).ctypes.data % width == 0 for p in parts)


CHUNK_ALIGN = 64  # bytes: where `chunk_message` places the values within the message


def chunk_message(sequence: int, index: int, values: bytes) -> bytes:
    """A serialised WorkerMessage holding EstimateChunk(sequence, index, values), with its
    padding field written before the values (protobuf allows any field order; its own
    serialiser never does this), sized so that the values start at a multiple of CHUNK_ALIGN
    bytes into the message. gRPC hands the learner every message in a fresh buffer, aligned
    for any value, so the learner reads the values where they arrived, without a copy."""
    head = b"\x08" + encode_varint(sequence) + b"\x10" + encode_varint(index)
    values_key = b"\x1a" + encode_varint(len(values))
    for pad in [None, *range(2 * CHUNK_ALIGN)]:
        padding = b"" if pad is None else b"\x22" + encode_varint(pad) + bytes(pad)
        inner = len(head) + len(padding) + len(values_key) + len(values)
        prefix = b"\x1a" + encode_varint(inner)
        if (len(prefix) + inner - len(values)) % CHUNK_ALIGN == 0:
            break
    return b"".join([prefix, head, padding, values_key, values])


def encode_varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_chunk(message: bytes) -> tuple[int, int, memoryview] | None:
    """(sequence, index, values) of a serialised WorkerMessage that holds an EstimateChunk,
    with the values a view into `message`, not a copy (protobuf would copy them twice); None
    if `message` is anything else, or not exactly that, for protobuf to parse."""
    view = memoryview(message)
    try:
        kind, chunk, end = _field(view, 0)
        if kind != (3, 2) or end != len(view):  # WorkerMessage.chunk, length-delimited, alone
            return None
        sequence = index = start = 0
        values = chunk[0:0]
        while start < len(chunk):
            kind, value, start = _field(chunk, start)
            if kind == (1, 0):
                sequence = value
            elif kind == (2, 0):
                index = value
            elif kind == (3, 2):
                values = value
            elif kind != (4, 2):  # padding is ignored
                return None
        return sequence, index, values
    except IndexError:
        return None


def decode_varint(view: bytes | memoryview, at: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `at`."""
    value = shift = 0
    while True:
        byte = view[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _field(view: memoryview, at: int) -> tuple[tuple[int, int], int | memoryview, int]:
    """((field number, wire type), value, position after it) of the field at `at`: a varint's
    value, or a length-delimited field's payload as a view."""
    key, at = decode_varint(view, at)
    wire_type = key & 7
    if wire_type == 0:
        return (key >> 3, 0), *decode_varint(view, at)
    if wire_type == 2:
        size, at = decode_varint(view, at)
        if at + size > len(view):
            raise IndexError("field runs past the message")
        return (key >> 3, 2), view[at:at + size], at + size
    raise IndexError(f"wire type {wire_type} is not used in an EstimateChunk")


def theta_message(flat: np.ndarray, version: int, structure: pb.ThetaStructure) -> pb.Theta:
    values, length, crc = encode(flat)
    return pb.Theta(
        version=version, structure=structure, structure_digest=structure_digest(structure),
        values=values, length=length, crc32=crc,
    )
