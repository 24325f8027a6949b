"""Image data sets for the image families (``mlp``, ``cnn``, ``autoencoder``).

Data set names (the ``dataset`` kwarg of a spec)::

    "digits"     scikit-learn's bundled 8x8 digits: 1797 images, 10 classes, split by a fixed-seed
                 permutation into 1500 train and 297 test examples (nothing is downloaded).
    "idx:URI"    a directory holding MNIST-format files (train-images-idx3-ubyte,
                 train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each
                 optionally gzipped as NAME.gz). URI is a local path or any fsspec URI
                 (file://, memory://, s3://, gs://, ... given the matching fsspec backend).

Everything is read once per process and preloaded onto the device; nothing is fetched at run time
beyond the files the URI names.
"""

from __future__ import annotations

import functools
import gzip
import math
from typing import NamedTuple

import fsspec
import jax
import jax.numpy as jnp
import numpy as np

from metaopt.task_zoo._layers import ACTIVATIONS
from metaopt.task_zoo._spec import spec_error
from metaopt.task_zoo.base import TaskSpec

DIGITS = "digits"
IDX_PREFIX = "idx:"
DIGITS_TRAIN = 1500
IDX_FILES = {  # split -> (images file, labels file), the standard MNIST names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08  # idx type code of unsigned bytes, the only one MNIST-format image sets use


class ImageData(NamedTuple):
    """One image data set. Images are flattened (row-major H, W, C), so MLPs take them as they are
    and convolutions reshape a batch to (B, H, W, C)."""

    train_x: jax.Array  # (N_train, H*W*C) float32 in [0, 1]
    train_y: jax.Array  # (N_train,) int32 in [0, num_classes)
    test_x: jax.Array  # (N_test, H*W*C) float32 in [0, 1]
    test_y: jax.Array  # (N_test,) int32
    shape: tuple[int, int, int]  # (H, W, C) of one image
    num_classes: int


def check_dataset(name: object) -> str:
    """`name` if it is a well-formed data set name (without reading anything), else ValueError."""
    if name == DIGITS or (isinstance(name, str) and name.startswith(IDX_PREFIX) and name[4:]):
        return name  # type: ignore[return-value]
    raise ValueError(f"image dataset must be {DIGITS!r} or 'idx:URI' (a directory), got {name!r}")


def _idx_dims(data: bytes, what: str) -> tuple[int, ...]:
    """The dims an idx header declares: 2 zero bytes, a type code (0x08 = unsigned byte), the
    number of dims n, then n big-endian uint32 sizes. `what` names the file in error messages."""
    if len(data) < 4:
        raise ValueError(f"{what}: too short for an idx header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{what}: bad idx magic number {data[:4].hex()} (must start with 0000)")
    if data[2] != _UBYTE:
        raise ValueError(f"{what}: idx type code 0x{data[2]:02x} unsupported (want 0x08 ubyte)")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{what}: idx header declares {ndim} dims but the file is too short")
    return tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))


def check_datasets(names: object) -> tuple[str, ...]:
    """A family's `datasets` setting: a non-empty sequence of well-formed names (not a str)."""
    if isinstance(names, str) or not names:
        raise ValueError(f"datasets must be a non-empty sequence of names, got {names!r}")
    return tuple(check_dataset(name) for name in names)  # type: ignore[union-attr]


def parse_idx(data: bytes, what: str) -> np.ndarray:
    """Decode one idx file (already gunzipped) into a uint8 array of its declared dims; the
    row-major data follow the header. `what` names the file in error messages."""
    dims = _idx_dims(data, what)
    size, start = math.prod(dims), 4 + 4 * len(dims)
    if len(data) - start != size:
        raise ValueError(f"{what}: idx dims {dims} need {size} data bytes, the file has {len(data) - start}")
    return np.frombuffer(data, np.uint8, size, offset=start).reshape(dims)


def write_idx(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array (the inverse of `parse_idx`; for tests and tools)."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def _idx_path(fs: fsspec.AbstractFileSystem, root: str, name: str) -> str:
    """`root/name`, or `root/name.gz` if only the gzipped file exists."""
    for path in (f"{root}/{name}", f"{root}/{name}.gz"):
        if fs.exists(path):
            return path
    raise FileNotFoundError(f"idx data set: neither {root}/{name} nor {root}/{name}.gz exists")


def _read_idx(fs: fsspec.AbstractFileSystem, root: str, name: str) -> np.ndarray:
    """Parse `root/name` (or its .gz)."""
    path = _idx_path(fs, root, name)
    raw = fs.cat_file(path)
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    return parse_idx(raw, path)


def _load_idx(uri: str) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, test_x, test_y) as uint8 arrays from an MNIST-format directory."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    out = []
    for split, (images_name, labels_name) in IDX_FILES.items():
        images, labels = _read_idx(fs, root, images_name), _read_idx(fs, root, labels_name)
        if images.ndim not in (3, 4) or labels.ndim != 1:
            raise ValueError(
                f"{uri}: {split} images must have 3 (N, H, W) or 4 (N, H, W, C) idx dims and "
                f"labels 1, got {images.shape} and {labels.shape}"
            )
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{uri}: {split} has {len(images)} images but {len(labels)} labels")
        out += [images, labels]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise ValueError(f"{uri}: train images {out[0].shape[1:]} != test images {out[2].shape[1:]}")
    return tuple(out)


@functools.lru_cache(maxsize=8)
def load_images(dataset: str) -> ImageData:
    """The data set `dataset` names (see the module docstring), loaded once per process.

    Cached as device arrays (immutable), so building many tasks copies nothing to the device.
    Call ``load_images.cache_clear()`` to re-read files that changed.
    """
    check_dataset(dataset)
    if dataset == DIGITS:
        from sklearn.datasets import load_digits  # deferred: the sklearn import is slow-ish

        data = load_digits()
        x = np.asarray(data.data, np.float32) / 16.0  # pixel values are 0..16
        y = np.asarray(data.target, np.int32)
        order = np.random.default_rng(0).permutation(len(y))  # fixed split, the same for all
        x, y = x[order], y[order]
        arrays = (x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])
        shape: tuple[int, ...] = (8, 8, 1)
    else:
        train_x, train_y, test_x, test_y = _load_idx(dataset[len(IDX_PREFIX) :])
        shape = train_x.shape[1:] + (1,) * (4 - train_x.ndim)  # (H, W) -> (H, W, 1)

        def flat(images: np.ndarray) -> np.ndarray:
            return images.reshape(len(images), -1).astype(np.float32) / 255.0

        arrays = (flat(train_x), train_y.astype(np.int32), flat(test_x), test_y.astype(np.int32))
    num_classes = int(max(arrays[1].max(), arrays[3].max())) + 1
    train_x, train_y, test_x, test_y = (jnp.asarray(a) for a in arrays)
    return ImageData(train_x, train_y, test_x, test_y, tuple(shape), num_classes)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=32)
def image_info(dataset: str) -> tuple[tuple[int, int, int], int]:
    """((H, W, C), num_classes) of `dataset`, for cost estimates: digits' are known, an idx set's
    come from the image header and the (small) label files, not from decoding every image."""
    check_dataset(dataset)
    if dataset == DIGITS:
        return (8, 8, 1), 10
    fs, root = fsspec.core.url_to_fs(dataset[len(IDX_PREFIX) :])
    root = root.rstrip("/")
    labels = [_read_idx(fs, root, IDX_FILES[split][1]) for split in IDX_FILES]
    path = _idx_path(fs, root, IDX_FILES["train"][0])
    with fs.open(path, "rb", compression="gzip" if path.endswith(".gz") else None) as f:
        dims = _idx_dims(f.read(20), path)  # magic + at most 4 dims; the pixels stay unread
    if len(dims) not in (3, 4):
        raise ValueError(f"{path}: images must have 3 or 4 idx dims, got {dims}")
    shape = dims[1:] + (1,) * (4 - len(dims))
    return shape, int(max(int(lab.max()) for lab in labels)) + 1  # type: ignore[return-value]


def check_image_spec(spec: TaskSpec, kw: dict) -> None:
    """The checks every image family makes of its spec kwargs: activation, init_scale, dataset."""
    if kw["activation"] not in ACTIVATIONS:
        raise spec_error(spec, f"activation must be one of {sorted(ACTIVATIONS)}")
    if kw["init_scale"] < 0:
        raise spec_error(spec, "init_scale must be >= 0")
    try:
        check_dataset(kw["dataset"])
    except ValueError as e:
        raise spec_error(spec, str(e)) from None
