"""Arrays on the wire: θ and gradient estimates as flat little-endian float32 buffers.

The flat order is JAX's tree order of θ's leaves (`jax.flatten_util.ravel_pytree`), which the
estimators also use. A `ThetaStructure` names every leaf's path and shape; its sha256 digest
is compared once per connection, so a worker whose learned optimizer differs from the
learner's is refused before it sends anything.
"""

from __future__ import annotations

import hashlib
import zlib

import jax
import numpy as np

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


def encode(flat: np.ndarray) -> tuple[bytes, int, int]:
    """(little-endian float32 bytes, length, crc32) of a flat vector."""
    data = np.ascontiguousarray(flat, FLOAT32_LE).tobytes()
    return data, int(flat.size), zlib.crc32(data)


def decode(values: bytes, length: int, crc32: int) -> np.ndarray:
    """A read-only float32 view of `values`, after checking length and checksum."""
    if len(values) != 4 * length:
        raise ValueError(f"buffer has {len(values)} bytes, expected 4 × {length}")
    if zlib.crc32(values) != crc32:
        raise ValueError("checksum mismatch: the buffer was corrupted in transit")
    return np.frombuffer(values, FLOAT32_LE)


def theta_message(flat: np.ndarray, version: int, structure: pb.ThetaStructure) -> pb.Theta:
    values, length, crc = encode(flat)
    return pb.Theta(
        version=version, structure=structure, structure_digest=structure_digest(structure),
        values=values, length=length, crc32=crc,
    )
