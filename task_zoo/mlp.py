"""Family ``mlp``: MLP classifiers on an image data set (default: scikit-learn's 8x8 digits).

Every task of one data set sees the same preloaded split (see `task_zoo.images`); the sampled
width, depth, activation, batch size and init scale vary. Also home to the helpers the other
sampled families share (setting validation, drawing, dense stacks, minibatches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from task_zoo._spec import spec_error, spec_kwargs
from task_zoo.base import SPLITS, TRAIN, TaskCost, TaskSpec
from task_zoo.images import DIGITS, check_dataset, check_datasets, image_info, load_images

NAME = "mlp"
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
}


# ---- helpers shared by the sampled families ------------------------------------------------


def choices(name: str, values: Sequence, allowed: Sequence | None = None) -> tuple:
    """A family setting: a non-empty set drawn from `allowed`, or of positive ints if None."""
    out = tuple(values)
    if not out:
        raise ValueError(f"{name} must be non-empty")
    if allowed is not None and not set(out) <= set(allowed):
        raise ValueError(f"{name} must be drawn from {sorted(allowed)}, got {values!r}")
    if allowed is None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ValueError(f"{name} must be positive ints, got {values!r}")
    return out


def positive_range(name: str, value: Sequence[float], low: float = 0.0) -> tuple[float, float]:
    """A family setting: a (lo, hi) pair with low < lo <= hi (log-uniform draws need lo > 0)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not low < lo <= hi:
        raise ValueError(f"{name} must be a range with {low} < low <= high, got {value!r}")
    return lo, hi


def pick(key: jax.Array, options: tuple):
    """One of `options`, uniformly (host-side: returns the Python value)."""
    return options[int(jax.random.randint(key, (), 0, len(options)))]


def log_uniform(key: jax.Array, lo: float, hi: float) -> float:
    """A float log-uniform in [lo, hi] (scales span orders of magnitude)."""
    return float(np.exp(jax.random.uniform(key, (), minval=np.log(lo), maxval=np.log(hi))))


def seed(key: jax.Array) -> int:
    """A spec seed: tells apart two draws of equal settings, and seeds any spec-made data."""
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def dense_init(key: jax.Array, sizes: Sequence[int], scale: jax.Array) -> dict:
    """{"layer_i": {"w": (sizes[i], sizes[i+1]), "b": (sizes[i+1],)}} float32; w is LeCun-normal
    times `scale` (a leaf, so the scale does not change the compiled program), b is zero."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        w = jax.random.normal(k, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
        params[f"layer_{i}"] = {"w": scale * w, "b": jnp.zeros(fan_out, jnp.float32)}
    return params


def dense_apply(params: dict, x: jax.Array, n: int, activation: str, prefix: int = 0) -> jax.Array:
    """(B, in) -> (B, out) through layers prefix .. prefix+n-1; no activation after the last."""
    for i in range(prefix, prefix + n):
        x = x @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"]
        if i < prefix + n - 1:
            x = ACTIVATIONS[activation](x)
    return x


def dense_cost(sizes: Sequence[int], batch_size: int) -> TaskCost:
    """Exact parameter count of a dense stack; FLOPs = 3 x forward, forward = 2 * B * (weights
    + biases) (a multiply-add per weight, a bias add and activation per unit)."""
    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return TaskCost(parameters=params, flops_per_step=3.0 * 2.0 * batch_size * params)


def split_data(task, split: str) -> dict[str, jax.Array]:
    """{"x": task.<split>_x, "y": task.<split>_y} of a task holding train_/test_ arrays."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == TRAIN:
        return {"x": task.train_x, "y": task.train_y}
    return {"x": task.test_x, "y": task.test_y}


def draw(data: dict[str, jax.Array], key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """`batch_size` rows of every array in `data`, drawn with replacement (jittable)."""
    idx = jax.random.randint(key, (batch_size,), 0, next(iter(data.values())).shape[0])
    return {k: v[idx] for k, v in data.items()}


# ---- the mlp family ---------------------------------------------------------------------------


@struct.dataclass
class MLPTask:
    """An MLP classifier task. Sizes and activation are static; data and init scale are leaves,
    so tasks of equal data shape, architecture and batch size share one compiled program."""

    train_x: jax.Array  # (N_train, D) float32 in [0, 1], D = H*W*C (digits: (1500, 64))
    train_y: jax.Array  # (N_train,) int32 in [0, num_classes)
    test_x: jax.Array  # (N_test, D) float32 (digits: (297, 64))
    test_y: jax.Array  # (N_test,) int32
    init_scale: jax.Array  # () float32, multiplies the LeCun-normal weight init
    hidden: tuple[int, ...] = struct.field(pytree_node=False)  # hidden widths, one per layer
    activation: str = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)
    num_classes: int = struct.field(pytree_node=False, default=10)

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """{"layer_i": {"w": (fan_in, fan_out), "b": (fan_out,)}} float32, i = 0..len(hidden)."""
        return dense_init(key, (self.train_x.shape[1], *self.hidden, self.num_classes), self.init_scale)

    def logits(self, params: dict, x: jax.Array) -> jax.Array:
        """(B, D) inputs -> (B, num_classes) logits."""
        return dense_apply(params, x, len(self.hidden) + 1, self.activation)

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
        """The whole of `split` as one batch: {"x": (N, D), "y": (N,)}."""
        return split_data(self, split)

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, D) float32, "y": (batch_size,) int32}, drawn with replacement."""
        return draw(self.full(split), key, self.batch_size)


class MLPFamily:
    """Distribution over image-MLP tasks: width, depth, activation, batch size and data set drawn
    uniformly from their sets, init scale log-uniformly from its range.
    Example: ``MLPFamily(widths=(32,), activations=("relu",), datasets=("idx:/data/mnist",))``."""

    name = NAME
    description = "MLP image classifiers: sampled width, depth, activation, init scale, batch size"

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        depths: Sequence[int] = (1, 2),
        activations: Sequence[str] = ("relu", "tanh", "gelu"),
        batch_sizes: Sequence[int] = (32, 64, 128),
        init_scales: Sequence[float] = (0.5, 2.0),
        datasets: Sequence[str] = (DIGITS,),
    ):
        self.widths = choices("widths", widths)
        self.depths = choices("depths", depths)
        self.activations = choices("activations", activations, ACTIVATIONS)
        self.batch_sizes = choices("batch_sizes", batch_sizes)
        self.init_scales = positive_range("init_scales", init_scales)
        self.datasets = check_datasets(datasets)

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, 5)  # as before init_scale/dataset existed: same draws
        extra = jax.random.split(jax.random.fold_in(key, 1), 2)
        return TaskSpec(
            NAME,
            {
                "width": pick(keys[0], self.widths),
                "depth": pick(keys[1], self.depths),
                "activation": pick(keys[2], self.activations),
                "batch_size": pick(keys[3], self.batch_sizes),
                # The seed only tells apart two draws of equal settings (the data split is fixed);
                # the inner run's randomness comes from the keys passed to init and batch.
                "seed": seed(keys[4]),
                "init_scale": log_uniform(extra[0], *self.init_scales),
                "dataset": pick(extra[1], self.datasets),
            },
        )

    @staticmethod
    def _kwargs(spec: TaskSpec) -> dict:
        kw = spec_kwargs(
            spec,
            NAME,
            required={"width": int, "depth": int, "activation": str, "batch_size": int, "seed": int},
            optional={"init_scale": (float, 1.0), "dataset": (str, DIGITS)},
        )
        if min(kw["width"], kw["depth"], kw["batch_size"]) < 1:
            raise spec_error(spec, "width, depth and batch_size must be >= 1")
        if kw["activation"] not in ACTIVATIONS:
            raise spec_error(spec, f"activation must be one of {sorted(ACTIVATIONS)}")
        if kw["init_scale"] < 0:
            raise spec_error(spec, "init_scale must be >= 0")
        try:
            check_dataset(kw["dataset"])
        except ValueError as e:
            raise spec_error(spec, str(e)) from None
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """`dense_cost` of (H*W*C, width x depth, num_classes) at the spec's batch size."""
        kw = self._kwargs(spec)
        shape, classes = image_info(kw["dataset"])
        return dense_cost((math.prod(shape), *(kw["width"],) * kw["depth"], classes), kw["batch_size"])

    def task_fn(self, spec: TaskSpec) -> MLPTask:
        """Spec kwargs: width, depth, activation, batch_size, seed; optional init_scale (1) and
        dataset ("digits")."""
        kw = self._kwargs(spec)
        data = load_images(kw["dataset"])
        return MLPTask(
            train_x=data.train_x,
            train_y=data.train_y,
            test_x=data.test_x,
            test_y=data.test_y,
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            hidden=(kw["width"],) * kw["depth"],
            activation=kw["activation"],
            batch_size=kw["batch_size"],
            num_classes=data.num_classes,
        )
