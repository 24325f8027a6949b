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
import optax
from flax import struct

from metaopt.task_zoo._layers import ACTIVATIONS, dense_apply, dense_cost, dense_init, draw, split_data
from metaopt.task_zoo._spec import choices, log_uniform, pick, positive_range, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import TaskCost, TaskSpec
from metaopt.task_zoo.images import DIGITS, check_datasets, check_image_spec, image_info, load_images
from metaopt.task_zoo.layer_stats import Taps

NAME = "mlp"


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

    def logits(self, params: dict, x: jax.Array, taps: Taps | None = None) -> jax.Array:
        """(B, D) inputs -> (B, num_classes) logits."""
        return dense_apply(params, x, len(self.hidden) + 1, self.activation, taps=taps)

    def loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 mean softmax cross-entropy. `key` is unused (no dropout)."""
        return self.tapped_loss(params, key, batch, None)

    def tapped_loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array],
                    taps: Taps | None) -> jax.Array:
        """`loss` with every layer tapped (see `task_zoo.layer_stats`)."""
        del key
        logits = self.logits(params, batch["x"], taps)
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
        check_image_spec(spec, kw)
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
