"""Family ``cnn``: small convolutional classifiers on an image data set (default: 8x8 digits).

Architecture: `depth` (1-2) conv layers of `channels` 3x3 filters ('SAME' padding), each followed
by the activation and an optional 2x downsampling ("max"/"avg" 2x2 pooling, or "stride": the conv
itself has stride 2), then a dense layer from the flattened feature map to the class logits.
Kept small so a step is cheap on CPU (digits: at most ~20 kFLOP per image forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from metaopt.task_zoo._layers import ACTIVATIONS, draw, split_data
from metaopt.task_zoo._spec import choices, log_uniform, pick, positive_range, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import TaskCost, TaskSpec
from metaopt.task_zoo.images import DIGITS, check_datasets, check_image_spec, image_info, load_images
from metaopt.task_zoo.layer_stats import Taps, conv_patches, tap

NAME = "cnn"
KERNEL = 3
DOWNSAMPLES = ("none", "max", "avg", "stride")


def _out_size(size: int, downsample: str) -> int:
    """Spatial size after one layer: 'SAME' convs keep it, a 2x downsample takes ceil(size / 2)."""
    return size if downsample == "none" else -(-size // 2)


def _layer_shapes(
    shape: Sequence[int], channels: int, depth: int, downsample: str
) -> tuple[list[tuple[int, int, int]], tuple[int, int]]:
    """([(H_out, W_out, C_in)] of each conv layer's output size and input channels, the (H, W)
    of the feature map the dense head flattens)."""
    h, w, c = shape
    out = []
    for _ in range(depth):
        strided = downsample == "stride"  # the conv itself downsamples; pooling comes after it
        out.append((_out_size(h, downsample), _out_size(w, downsample), c) if strided else (h, w, c))
        h, w, c = _out_size(h, downsample), _out_size(w, downsample), channels
    return out, (h, w)


@struct.dataclass
class CNNTask:
    """A conv classifier task. Sizes are static; data and init scale are leaves, so tasks of equal
    data shape, architecture and batch size share one compiled program."""

    train_x: jax.Array  # (N_train, H*W*C) float32 in [0, 1], flattened row-major (H, W, C)
    train_y: jax.Array  # (N_train,) int32
    test_x: jax.Array  # (N_test, H*W*C) float32
    test_y: jax.Array  # (N_test,) int32
    init_scale: jax.Array  # () float32, multiplies the LeCun-normal weight init
    image_shape: tuple[int, int, int] = struct.field(pytree_node=False)  # (H, W, C)
    channels: int = struct.field(pytree_node=False)
    depth: int = struct.field(pytree_node=False)
    downsample: str = struct.field(pytree_node=False)
    activation: str = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)
    num_classes: int = struct.field(pytree_node=False)

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """{"conv_i": {"w": (3, 3, C_in, channels), "b": (channels,)}, i < depth,
        "head": {"w": (H' * W' * channels, num_classes), "b": (num_classes,)}} float32."""
        layers, (h, w) = _layer_shapes(self.image_shape, self.channels, self.depth, self.downsample)
        keys = jax.random.split(key, self.depth + 1)
        params = {}
        for i, (_, _, c_in) in enumerate(layers):
            fan_in = KERNEL * KERNEL * c_in
            kernel = jax.random.normal(keys[i], (KERNEL, KERNEL, c_in, self.channels), jnp.float32)
            params[f"conv_{i}"] = {
                "w": self.init_scale * kernel / np.sqrt(fan_in),
                "b": jnp.zeros(self.channels, jnp.float32),
            }
        fan_in = h * w * self.channels
        head = jax.random.normal(keys[-1], (fan_in, self.num_classes), jnp.float32) / np.sqrt(fan_in)
        params["head"] = {"w": self.init_scale * head, "b": jnp.zeros(self.num_classes, jnp.float32)}
        return params

    def logits(self, params: dict, x: jax.Array, taps: Taps | None = None) -> jax.Array:
        """(B, H*W*C) flattened images -> (B, num_classes) logits. `taps`: see
        `task_zoo.layer_stats` (a conv layer's inputs are its patches)."""
        x = x.reshape(x.shape[0], *self.image_shape)  # NHWC
        stride = 2 if self.downsample == "stride" else 1
        for i in range(self.depth):
            name = f"conv_{i}"
            out = jax.lax.conv_general_dilated(
                x,
                params[name]["w"],
                (stride, stride),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ) + params[name]["b"]
            if taps is not None:  # the conv itself, not patches @ w, so loss == tapped_loss exactly
                out = taps(name, conv_patches(x, KERNEL, stride), out)
            x = ACTIVATIONS[self.activation](out)
            if self.downsample in ("max", "avg"):
                init, op = (-jnp.inf, jax.lax.max) if self.downsample == "max" else (0.0, jax.lax.add)
                x = jax.lax.reduce_window(x, init, op, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
                if self.downsample == "avg":
                    x = x / 4.0  # 'SAME' edge windows average in zero padding; harmless here
        x = x.reshape(x.shape[0], -1)
        return tap(taps, "head", x, x @ params["head"]["w"] + params["head"]["b"])

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
        """The whole of `split` as one batch: {"x": (N, H*W*C), "y": (N,)}."""
        return split_data(self, split)

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, H*W*C) float32, "y": (batch_size,) int32}, drawn with replacement."""
        return draw(self.full(split), key, self.batch_size)


class CNNFamily:
    """Distribution over small conv classifiers: channels, depth, downsampling, activation, batch
    size and data set uniform over their sets, init scale log-uniform in its range."""

    name = NAME
    description = "small conv image classifiers: sampled channels, depth, pooling, activation, batch size"

    def __init__(
        self,
        channels: Sequence[int] = (8, 16),
        depths: Sequence[int] = (1, 2),
        downsamples: Sequence[str] = DOWNSAMPLES,
        activations: Sequence[str] = ("relu", "tanh", "gelu"),
        batch_sizes: Sequence[int] = (32, 64, 128),
        init_scales: Sequence[float] = (0.5, 2.0),
        datasets: Sequence[str] = (DIGITS,),
    ):
        self.channels = choices("channels", channels)
        self.depths = choices("depths", depths)
        self.downsamples = choices("downsamples", downsamples, DOWNSAMPLES)
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
                "channels": pick(keys[0], self.channels),
                "depth": pick(keys[1], self.depths),
                "downsample": pick(keys[2], self.downsamples),
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
                "channels": int,
                "depth": int,
                "downsample": str,
                "activation": str,
                "batch_size": int,
                "seed": int,
            },
            optional={"init_scale": (float, 1.0), "dataset": (str, DIGITS)},
        )
        if min(kw["channels"], kw["depth"], kw["batch_size"]) < 1:
            raise spec_error(spec, "channels, depth and batch_size must be >= 1")
        if kw["downsample"] not in DOWNSAMPLES:
            raise spec_error(spec, f"downsample must be one of {list(DOWNSAMPLES)}")
        check_image_spec(spec, kw)
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """Exact parameter count; FLOPs = 3 x forward, forward = 2 * B * (Σ_conv H_out * W_out *
        (9 * C_in * C_out + C_out) + dense weights + biases); pooling is negligible."""
        kw = self._kwargs(spec)
        shape, classes = image_info(kw["dataset"])
        layers, (h, w) = _layer_shapes(shape, kw["channels"], kw["depth"], kw["downsample"])
        c = kw["channels"]
        params = sum(KERNEL * KERNEL * c_in * c + c for _, _, c_in in layers) + (h * w * c + 1) * classes
        forward = sum(ho * wo * (KERNEL * KERNEL * c_in * c + c) for ho, wo, c_in in layers)
        forward += (h * w * c + 1) * classes
        return TaskCost(parameters=params, flops_per_step=3.0 * 2.0 * kw["batch_size"] * forward)

    def task_fn(self, spec: TaskSpec) -> CNNTask:
        """Spec kwargs: channels, depth, downsample, activation, batch_size, seed; optional
        init_scale (1) and dataset ("digits")."""
        kw = self._kwargs(spec)
        data = load_images(kw["dataset"])
        return CNNTask(
            train_x=data.train_x,
            train_y=data.train_y,
            test_x=data.test_x,
            test_y=data.test_y,
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            image_shape=data.shape,
            channels=kw["channels"],
            depth=kw["depth"],
            downsample=kw["downsample"],
            activation=kw["activation"],
            batch_size=kw["batch_size"],
            num_classes=data.num_classes,
        )
