"""Family ``mlp``: MLP classifiers on scikit-learn's 8x8 digits (1797 images, 10 classes).

The data ship with scikit-learn (no download). They are loaded once per process, scaled to
[0, 1] and split by a fixed-seed permutation into 1500 train and 297 test examples; every task
of the family sees the same split, and only the architecture and batch size vary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from task_zoo._spec import spec_error, spec_kwargs
from task_zoo.base import SPLITS, TRAIN, TaskSpec

NAME = "mlp"
N_TRAIN = 1500
N_FEATURES = 64
N_CLASSES = 10
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
}


@functools.lru_cache(maxsize=1)
def digits() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(train_x (1500, 64) f32, train_y (1500,) i32, test_x (297, 64) f32, test_y (297,) i32).

    Cached as device arrays (immutable), so building many tasks copies nothing to the device.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow-ish

    data = load_digits()
    x = np.asarray(data.data, np.float32) / 16.0  # pixel values are 0..16
    y = np.asarray(data.target, np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    arrays = (x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])
    return tuple(jnp.asarray(a) for a in arrays)  # type: ignore[return-value]


@struct.dataclass
class MLPTask:
    """An MLP classifier task. Sizes and activation are static; data and init scale are leaves,
    so tasks of equal architecture and batch size share one compiled program."""

    train_x: jax.Array  # (1500, 64) float32 in [0, 1]
    train_y: jax.Array  # (1500,) int32 in [0, 10)
    test_x: jax.Array  # (297, 64) float32
    test_y: jax.Array  # (297,) int32
    init_scale: jax.Array  # () float32, multiplies the LeCun-normal weight init
    hidden: tuple[int, ...] = struct.field(pytree_node=False)  # hidden widths, one per layer
    activation: str = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """{"layer_i": {"w": (fan_in, fan_out), "b": (fan_out,)}} float32, i = 0..len(hidden)."""
        sizes = (N_FEATURES, *self.hidden, N_CLASSES)
        keys = jax.random.split(key, len(sizes) - 1)
        params = {}
        for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
            w = jax.random.normal(k, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
            params[f"layer_{i}"] = {"w": self.init_scale * w, "b": jnp.zeros(fan_out, jnp.float32)}
        return params

    def logits(self, params: dict, x: jax.Array) -> jax.Array:
        """(B, 64) inputs -> (B, 10) logits."""
        act = ACTIVATIONS[self.activation]
        n = len(self.hidden) + 1
        for i in range(n):
            layer = params[f"layer_{i}"]
            x = x @ layer["w"] + layer["b"]
            if i < n - 1:
                x = act(x)
        return x

    def loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 mean softmax cross-entropy. `key` is unused (no dropout)."""
        del key
        logits = self.logits(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def accuracy(self, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 fraction of `batch` classified correctly."""
        pred = jnp.argmax(self.logits(params, batch["x"]), axis=-1)
        return jnp.mean(pred == batch["y"]).astype(jnp.float32)

    def full(self, split: str) -> dict[str, jax.Array]:
        """The whole of `split` as one batch: {"x": (N, 64), "y": (N,)}."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == TRAIN:
            return {"x": self.train_x, "y": self.train_y}
        return {"x": self.test_x, "y": self.test_y}

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, 64) float32, "y": (batch_size,) int32}, drawn with replacement."""
        data = self.full(split)
        idx = jax.random.randint(key, (self.batch_size,), 0, data["y"].shape[0])
        return {"x": data["x"][idx], "y": data["y"][idx]}


def _choices(name: str, values: Sequence, allowed: Sequence | None = None) -> tuple:
    out = tuple(values)
    if not out:
        raise ValueError(f"{name} must be non-empty")
    if allowed is not None and not set(out) <= set(allowed):
        raise ValueError(f"{name} must be drawn from {sorted(allowed)}, got {values!r}")
    if allowed is None and not all(isinstance(v, int) and v >= 1 for v in out):
        raise ValueError(f"{name} must be positive ints, got {values!r}")
    return out


class MLPFamily:
    """Distribution over digit-MLP tasks: width, depth, activation and batch size are drawn
    uniformly from their sets. Example: ``MLPFamily(widths=(32,), activations=("relu",))``."""

    name = NAME

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        depths: Sequence[int] = (1, 2),
        activations: Sequence[str] = ("relu", "tanh", "gelu"),
        batch_sizes: Sequence[int] = (32, 64, 128),
    ):
        self.widths = _choices("widths", widths)
        self.depths = _choices("depths", depths)
        self.activations = _choices("activations", activations, ACTIVATIONS)
        self.batch_sizes = _choices("batch_sizes", batch_sizes)

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, 5)

        def pick(k: jax.Array, options: tuple):
            return options[int(jax.random.randint(k, (), 0, len(options)))]

        return TaskSpec(
            NAME,
            {
                "width": pick(keys[0], self.widths),
                "depth": pick(keys[1], self.depths),
                "activation": pick(keys[2], self.activations),
                "batch_size": pick(keys[3], self.batch_sizes),
                # The seed only tells apart two draws of equal settings (the data split is fixed);
                # the inner run's randomness comes from the keys passed to init and batch.
                "seed": int(jax.random.randint(keys[4], (), 0, 2**31 - 1)),
            },
        )

    def task_fn(self, spec: TaskSpec) -> MLPTask:
        """Spec kwargs: width, depth, activation, batch_size, seed; optional init_scale (1)."""
        kw = spec_kwargs(
            spec,
            NAME,
            required={
                "width": int,
                "depth": int,
                "activation": str,
                "batch_size": int,
                "seed": int,
            },
            optional={"init_scale": (float, 1.0)},
        )
        if min(kw["width"], kw["depth"], kw["batch_size"]) < 1:
            raise spec_error(spec, "width, depth and batch_size must be >= 1")
        if kw["activation"] not in ACTIVATIONS:
            raise spec_error(spec, f"activation must be one of {sorted(ACTIVATIONS)}")
        train_x, train_y, test_x, test_y = digits()
        return MLPTask(
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            hidden=(kw["width"],) * kw["depth"],
            activation=kw["activation"],
            batch_size=kw["batch_size"],
        )
