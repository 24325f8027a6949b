"""Family ``autoencoder``: MLP autoencoders on an image data set (default: 8x8 digits).

Encoder D -> width x depth -> bottleneck (linear code), decoder bottleneck -> width x depth -> D
with a sigmoid output (pixels are in [0, 1]). Loss: mean squared reconstruction error over
pixels and batch. Labels are not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from metaopt.task_zoo._layers import ACTIVATIONS, dense_apply, dense_cost, dense_init, draw
from metaopt.task_zoo._spec import choices, log_uniform, pick, positive_range, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import SPLITS, TRAIN, TaskCost, TaskSpec
from metaopt.task_zoo.images import DIGITS, check_datasets, check_image_spec, image_info, load_images
from metaopt.task_zoo.layer_stats import Taps

NAME = "autoencoder"


def _sizes(dim: int, width: int, depth: int, bottleneck: int) -> tuple[int, ...]:
    """Layer sizes of the whole encoder-decoder stack: (D, w.., bottleneck, w.., D)."""
    return (dim, *(width,) * depth, bottleneck, *(width,) * depth, dim)


@struct.dataclass
class AutoencoderTask:
    """An MLP autoencoder task. Sizes are static; data and init scale are leaves, so tasks of equal
    data shape, architecture and batch size share one compiled program."""

    train_x: jax.Array  # (N_train, D) float32 in [0, 1], D = H*W*C
    test_x: jax.Array  # (N_test, D) float32
    init_scale: jax.Array  # () float32, multiplies the LeCun-normal weight init
    width: int = struct.field(pytree_node=False)
    depth: int = struct.field(pytree_node=False)  # hidden layers on each side of the code
    bottleneck: int = struct.field(pytree_node=False)
    activation: str = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """{"layer_i": {"w": (fan_in, fan_out), "b": (fan_out,)}} float32, i = 0..2*depth+1:
        layers 0..depth encode, depth+1..2*depth+1 decode."""
        sizes = _sizes(self.train_x.shape[1], self.width, self.depth, self.bottleneck)
        return dense_init(key, sizes, self.init_scale)

    def encode(self, params: dict, x: jax.Array, taps: Taps | None = None) -> jax.Array:
        """(B, D) -> (B, bottleneck) linear code."""
        return dense_apply(params, x, self.depth + 1, self.activation, taps=taps)

    def reconstruct(self, params: dict, x: jax.Array, taps: Taps | None = None) -> jax.Array:
        """(B, D) -> (B, D) in (0, 1). The code is fed to the decoder through the activation, so
        the decoder is as non-linear as the encoder."""
        code = ACTIVATIONS[self.activation](self.encode(params, x, taps))
        out = dense_apply(params, code, self.depth + 1, self.activation, prefix=self.depth + 1, taps=taps)
        return jax.nn.sigmoid(out)

    def loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 mean squared reconstruction error. `key` is unused."""
        return self.tapped_loss(params, key, batch, None)

    def tapped_loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array],
                    taps: Taps | None) -> jax.Array:
        """`loss` with every layer tapped (see `task_zoo.layer_stats`)."""
        del key
        return jnp.mean((self.reconstruct(params, batch["x"], taps) - batch["x"]) ** 2)

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, D) float32}, drawn with replacement."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return draw({"x": self.train_x if split == TRAIN else self.test_x}, key, self.batch_size)


class AutoencoderFamily:
    """Distribution over image autoencoders: width, depth, bottleneck, activation, batch size and
    data set uniform over their sets, init scale log-uniform in its range."""

    name = NAME
    description = "MLP image autoencoders: sampled width, depth, bottleneck, activation, batch size"

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (1, 2),
        bottlenecks: Sequence[int] = (4, 8, 16),
        activations: Sequence[str] = ("relu", "tanh", "gelu"),
        batch_sizes: Sequence[int] = (32, 64, 128),
        init_scales: Sequence[float] = (0.5, 2.0),
        datasets: Sequence[str] = (DIGITS,),
    ):
        self.widths = choices("widths", widths)
        self.depths = choices("depths", depths)
        self.bottlenecks = choices("bottlenecks", bottlenecks)
        self.activations = choices("activations", activations, ACTIVATIONS)
        self.batch_sizes = choices("batch_sizes", batch_sizes)
        self.init_scales = positive_range("init_scales", init_scales)
        self.datasets = check_datasets(datasets)

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, 8)
        return TaskSpec(
            NAME,
            {
                "width": pick(keys[0], self.widths),
                "depth": pick(keys[1], self.depths),
                "bottleneck": pick(keys[2], self.bottlenecks),
                "activation": pick(keys[3], self.activations),
                "batch_size": pick(keys[4], self.batch_sizes),
                "init_scale": log_uniform(keys[5], *self.init_scales),
                "dataset": pick(keys[6], self.datasets),
                "seed": seed(keys[7]),  # tells apart equal draws; the data split is fixed
            },
        )

    @staticmethod
    def _kwargs(spec: TaskSpec) -> dict:
        kw = spec_kwargs(
            spec,
            NAME,
            required={
                "width": int,
                "depth": int,
                "bottleneck": int,
                "activation": str,
                "batch_size": int,
                "seed": int,
            },
            optional={"init_scale": (float, 1.0), "dataset": (str, DIGITS)},
        )
        if min(kw["width"], kw["bottleneck"], kw["batch_size"]) < 1 or kw["depth"] < 0:
            raise spec_error(spec, "width, bottleneck and batch_size must be >= 1, depth >= 0")
        check_image_spec(spec, kw)
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """`task_zoo.mlp.dense_cost` of the (D, w.., bottleneck, w.., D) stack at the batch size."""
        kw = self._kwargs(spec)
        shape, _ = image_info(kw["dataset"])
        sizes = _sizes(math.prod(shape), kw["width"], kw["depth"], kw["bottleneck"])
        return dense_cost(sizes, kw["batch_size"])

    def task_fn(self, spec: TaskSpec) -> AutoencoderTask:
        """Spec kwargs: width, depth, bottleneck, activation, batch_size, seed; optional
        init_scale (1) and dataset ("digits")."""
        kw = self._kwargs(spec)
        data = load_images(kw["dataset"])
        return AutoencoderTask(
            train_x=data.train_x,
            test_x=data.test_x,
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            width=kw["width"],
            depth=kw["depth"],
            bottleneck=kw["bottleneck"],
            activation=kw["activation"],
            batch_size=kw["batch_size"],
        )
