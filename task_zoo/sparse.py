"""Families ``sparse_mlp`` and ``sparse_cnn``: classifiers with a fixed budget of weights, rewired
during training by RigL (Evci et al., "Rigging the Lottery", ICML 2020).

A layer's weight is a (fan_in, fan_out) matrix of which only `nnz` entries exist. Its parameters
are those entries' values, a (nnz,) vector, so an optimizer (a learned one too) sees and updates
the active weights only; which entries they are, the layer's *topology* (flat positions in the
matrix, int32), is a leaf of the task. Biases are dense. Densities per layer follow RigL's
Erdős–Rényi(-Kernel) rule (a layer's density ∝ the sum of its weight's dimensions over their
product, dense layers capped at 1) so that all layers together keep 1 - `sparsity` of the weights.
Topologies are drawn uniformly at random from the spec's seed, values LeCun-normal over the
*sparse* fan-in (Evci et al. 2022: the dense fan-in would start sparse nets with vanishing signal).

Two storages compute the same function (tested to float32 rounding, loss and gradient):
"masked" scatters the values into a dense zero matrix and multiplies densely, which is what a
dense weight times a 0/1 mask computes; "bcoo" keeps the weight as a `jax.experimental.sparse`
BCOO matrix and multiplies sparsely, never forming the dense matrix.

RigL, applied between optimizer steps by the loops that train a task (`metaopt.inner`): every
`rewire_every` steps until `rewire_until` of the run, each layer drops the k active weights of
smallest magnitude and grows k inactive ones where the dense gradient (on a fresh minibatch) is
largest; k = ⌊f(t)·nnz⌋ with the cosine drop fraction f(t) = drop_fraction/2·(1 + cos(π t / T_end)).
A grown weight starts at 0 and reuses the dropped weight's slot, so the count of non-zeros and the
parameters' shapes never change. An optax transformation cannot see that a slot now holds another
weight: the loop resets the regrown slots' optimizer state (`metaopt.optimizers.reset_slots`), and
an optimizer that cannot do so is refused on a rewired task. Meta-training's workers rewire as the
loops do (workers/objective.py). `rewire_every: 0` in a spec or a family trains the initial
topology throughout (static sparse training); so does any loop that only calls `loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import sparse as jsparse

from metaopt.task_zoo._layers import ACTIVATIONS, draw, split_data
from metaopt.task_zoo._spec import choices, log_uniform, pick, positive_range, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import TRAIN, TaskCost, TaskSpec
from metaopt.task_zoo.cnn import KERNEL, _layer_shapes
from metaopt.task_zoo.images import DIGITS, check_datasets, check_image_spec, image_info, load_images
from metaopt.task_zoo.layer_stats import conv_patches

STORAGES = ("masked", "bcoo")
# RigL's defaults (Evci et al. 2020, section 4): ΔT = 100, α = 0.3, T_end = 0.75·T, cosine decay.
REWIRE_EVERY = 100
DROP_FRACTION = 0.3
REWIRE_UNTIL = 0.75


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Per-layer densities d_l = min(1, ε·Σshape_l/Πshape_l), ε chosen so that Σ d_l·n_l equals
    density·Σ n_l (n_l = Πshape_l), layers the rule would fill beyond 1 dense (RigL's ERK)."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while len(dense) < len(sizes):
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        scale = budget / sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        full = [i for i in range(len(sizes)) if i not in dense and scale * raw[i] >= 1.0]
        if not full:
            return [1.0 if i in dense else scale * raw[i] for i in range(len(sizes))]
        dense.add(max(full, key=lambda i: raw[i]))
    return [1.0] * len(sizes)  # density 1: every weight


def drop_fraction(step: jax.Array, num_steps: int, fraction: float, until: float) -> jax.Array:
    """RigL's cosine schedule: fraction/2·(1 + cos(π·step/T_end)), T_end = until·num_steps."""
    end = max(until * num_steps, 1.0)
    return fraction / 2 * (1 + jnp.cos(jnp.pi * jnp.minimum(step / end, 1.0)))


def rigl_layer(values: jax.Array, index: jax.Array, dense_grad: jax.Array, k: jax.Array):
    """One layer's drop-and-grow: (values, index, regrown) with the k smallest-magnitude active
    weights dropped and their slots given, best first, the k inactive positions of largest
    |dense_grad| (a flat (fan_in·fan_out,) gradient), at value 0. `regrown` marks those slots."""
    nnz = values.shape[0]
    order = jnp.argsort(jnp.abs(values))  # slots, smallest magnitude first
    regrown = jnp.zeros(nnz, bool).at[order].set(jnp.arange(nnz) < k)
    still_active = jnp.zeros(dense_grad.shape[0], bool).at[index].set(~regrown)
    _, grown = jax.lax.top_k(jnp.where(still_active, -jnp.inf, jnp.abs(dense_grad)), nnz)
    # the r-th dropped slot (in magnitude order) takes the r-th best position
    index = index.at[order].set(jnp.where(jnp.arange(nnz) < k, grown.astype(index.dtype), index[order]))
    return jnp.where(regrown, 0.0, values), index, regrown


@struct.dataclass
class SparseTask:
    """A sparse classifier (an MLP, or a CNN when `image_shape` is set). Sizes, storage and the
    RigL schedule are static; data, init scale and the topology are leaves."""

    train_x: jax.Array  # (N_train, D) float32
    train_y: jax.Array  # (N_train,) int32
    test_x: jax.Array
    test_y: jax.Array
    init_scale: jax.Array  # () float32
    topology: dict[str, jax.Array]  # layer -> (nnz,) int32 flat positions in its (fan_in, fan_out)
    layers: tuple[tuple[str, int, int], ...] = struct.field(pytree_node=False)  # (name, fan_in, fan_out)
    image_shape: tuple[int, int, int] | None = struct.field(pytree_node=False)  # a CNN's (H, W, C)
    activation: str = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)
    num_classes: int = struct.field(pytree_node=False)
    storage: str = struct.field(pytree_node=False)
    rewire_every: int = struct.field(pytree_node=False)
    drop_fraction: float = struct.field(pytree_node=False)
    rewire_until: float = struct.field(pytree_node=False)

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """{layer: {"w": (nnz,) values, "b": (fan_out,) zeros}} float32."""
        keys = jax.random.split(key, len(self.layers))
        params = {}
        for k, (name, _, fan_out) in zip(keys, self.layers, strict=True):
            nnz = self.topology[name].shape[0]
            w = jax.random.normal(k, (nnz,), jnp.float32) / np.sqrt(nnz / fan_out)  # the sparse fan-in
            params[name] = {"w": self.init_scale * w, "b": jnp.zeros(fan_out, jnp.float32)}
        return params

    def weights(self, params: dict, storage: str | None = None) -> dict:
        """{layer: its (fan_in, fan_out) weight}, a dense array ("masked") or a BCOO matrix."""
        out = {}
        for name, fan_in, fan_out in self.layers:
            values, index = params[name]["w"], self.topology[name]
            if (storage or self.storage) == "masked":
                dense = jnp.zeros(fan_in * fan_out, values.dtype).at[index].set(values)
                out[name] = dense.reshape(fan_in, fan_out)
            else:
                rows_cols = jnp.stack([index // fan_out, index % fan_out], axis=1)
                out[name] = jsparse.BCOO((values, rows_cols), shape=(fan_in, fan_out), unique_indices=True)
        return out

    def logits(self, weights: dict, params: dict, x: jax.Array) -> jax.Array:
        """(B, D) inputs -> (B, num_classes) logits through `weights` (see `weights`)."""
        act = ACTIVATIONS[self.activation]
        hidden = self.layers[:-1]
        if self.image_shape is not None:  # 3x3 stride-2 'SAME' convs as patches @ weight
            x = x.reshape(x.shape[0], *self.image_shape)
            for name, _, _ in hidden:
                x = act(conv_patches(x, KERNEL, 2) @ weights[name] + params[name]["b"])
            x = x.reshape(x.shape[0], -1)
        else:
            for name, _, _ in hidden:
                x = act(x @ weights[name] + params[name]["b"])
        head = self.layers[-1][0]
        return x @ weights[head] + params[head]["b"]

    def _loss(self, weights: dict, params: dict, batch: dict) -> jax.Array:
        logits = self.logits(weights, params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 mean softmax cross-entropy. `key` is unused (no dropout)."""
        del key
        return self._loss(self.weights(params), params, batch)

    def accuracy(self, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 fraction of `batch` classified correctly."""
        pred = jnp.argmax(self.logits(self.weights(params), params, batch["x"]), axis=-1)
        return jnp.mean(pred == batch["y"]).astype(jnp.float32)

    def dense_grads(self, params: dict, batch: dict) -> dict[str, jax.Array]:
        """{layer: (fan_in, fan_out)} the loss's gradient with respect to every entry of each
        weight, active or not (what RigL grows by)."""
        return jax.grad(lambda w: self._loss(w, params, batch))(self.weights(params, "masked"))

    def rewire(self, params: dict, step: jax.Array, num_steps: int, key: jax.Array):
        """(topology, params, regrown) after `step` optimizer steps of a `num_steps` run: RigL's
        drop-and-grow (module docstring) when step is one of its rewiring steps, else unchanged.
        `regrown` is a bool pytree shaped like params, true at the slots that now hold new weights."""
        unchanged = self.topology, params, jax.tree.map(lambda x: jnp.zeros(x.shape, bool), params)
        if self.rewire_every <= 0:
            return unchanged
        due = (step > 0) & (step % self.rewire_every == 0) & (step < self.rewire_until * num_steps)

        def rewired():
            grads = self.dense_grads(params, self.batch(key, TRAIN))
            fraction = drop_fraction(step, num_steps, self.drop_fraction, self.rewire_until)
            topology, new, regrown = {}, {}, {}
            for name, _, _ in self.layers:
                values, index = params[name]["w"], self.topology[name]
                k = jnp.floor(fraction * values.shape[0]).astype(jnp.int32)
                w, topology[name], r = rigl_layer(values, index, grads[name].reshape(-1), k)
                new[name] = {"w": w, "b": params[name]["b"]}
                regrown[name] = {"w": r, "b": jnp.zeros(params[name]["b"].shape, bool)}
            return topology, new, regrown

        return jax.lax.cond(due, rewired, lambda: unchanged)

    def full(self, split: str) -> dict[str, jax.Array]:
        return split_data(self, split)

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, D) float32, "y": (batch_size,) int32}, drawn with replacement."""
        return draw(self.full(split), key, self.batch_size)


def rewires(task) -> bool:
    """Whether the loops must rewire `task` between steps (a sparse task with RigL on)."""
    return isinstance(task, SparseTask) and task.rewire_every > 0


def _budget(layers: list[tuple[str, int, int]], sparsity: float) -> list[int]:
    """Weights per (name, fan_in, fan_out) layer at `sparsity`, spread by ERK; at least one each."""
    densities = erk_densities([(i, o) for _, i, o in layers], 1 - sparsity)
    return [max(1, round(d * i * o)) for d, (_, i, o) in zip(densities, layers, strict=True)]


class _SparseFamily:
    """What the two families share: sparsity, storage and the RigL schedule."""

    def __init__(self, sparsities, activations, batch_sizes, init_scales, datasets, storage, rewire_every):
        self.sparsities = tuple(float(s) for s in sparsities)
        if not self.sparsities or not all(0 <= s < 1 for s in self.sparsities):
            raise ValueError(f"sparsities must be a non-empty set of numbers in [0, 1), got {sparsities!r}")
        self.activations = choices("activations", activations, ACTIVATIONS)
        self.batch_sizes = choices("batch_sizes", batch_sizes)
        self.init_scales = positive_range("init_scales", init_scales)
        self.datasets = check_datasets(datasets)
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        if not isinstance(rewire_every, int) or rewire_every < 0:
            raise ValueError(f"rewire_every must be an int >= 0 (0: never rewire), got {rewire_every!r}")
        self.rewire_every = rewire_every

    def _common(self, keys) -> dict:
        return {
            "sparsity": pick(keys[0], self.sparsities),
            "activation": pick(keys[1], self.activations),
            "batch_size": pick(keys[2], self.batch_sizes),
            "seed": seed(keys[3]),
            "init_scale": log_uniform(keys[4], *self.init_scales),
            "dataset": pick(keys[5], self.datasets),
            "storage": self.storage,
            "rewire_every": self.rewire_every,
        }

    @staticmethod
    def _kwargs(spec: TaskSpec, required: dict) -> dict:
        kw = spec_kwargs(
            spec, spec.name,
            required={**required, "sparsity": float, "activation": str, "batch_size": int, "seed": int},
            optional={"init_scale": (float, 1.0), "dataset": (str, DIGITS), "storage": (str, "masked"),
                      "rewire_every": (int, REWIRE_EVERY), "drop_fraction": (float, DROP_FRACTION),
                      "rewire_until": (float, REWIRE_UNTIL)},
        )
        if not 0 <= kw["sparsity"] < 1:
            raise spec_error(spec, f"sparsity must lie in [0, 1), got {kw['sparsity']}")
        if kw["storage"] not in STORAGES:
            raise spec_error(spec, f"storage must be one of {STORAGES}, got {kw['storage']!r}")
        if kw["batch_size"] < 1 or kw["rewire_every"] < 0:
            raise spec_error(spec, "batch_size must be >= 1 and rewire_every >= 0 (0: never rewire)")
        if not (0 <= kw["drop_fraction"] <= 1 and 0 <= kw["rewire_until"] <= 1):
            raise spec_error(spec, "drop_fraction and rewire_until must lie in [0, 1]")
        check_image_spec(spec, kw)
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """Active weights plus biases; FLOPs = 3 x 2 x batch x (active weights x positions + biases)."""
        layers, positions = self._layers(spec)
        kw = self._kwargs(spec, self.required)
        weights = _budget(layers, kw["sparsity"])
        params = sum(weights) + sum(o for _, _, o in layers)
        flops = sum((w + o) * p for w, (_, _, o), p in zip(weights, layers, positions, strict=True))
        return TaskCost(parameters=params, flops_per_step=3.0 * 2.0 * kw["batch_size"] * flops)

    def task_fn(self, spec: TaskSpec) -> SparseTask:
        kw = self._kwargs(spec, self.required)
        layers, _ = self._layers(spec)
        data = load_images(kw["dataset"])
        rng = np.random.default_rng(kw["seed"])
        topology = {}
        for nnz, (name, fan_in, fan_out) in zip(_budget(layers, kw["sparsity"]), layers, strict=True):
            positions = np.sort(rng.choice(fan_in * fan_out, nnz, replace=False))
            topology[name] = jnp.asarray(positions, jnp.int32)
        return SparseTask(
            train_x=data.train_x, train_y=data.train_y, test_x=data.test_x, test_y=data.test_y,
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32), topology=topology,
            layers=tuple(layers), image_shape=self._image_shape(kw), activation=kw["activation"],
            batch_size=kw["batch_size"], num_classes=data.num_classes, storage=kw["storage"],
            rewire_every=kw["rewire_every"], drop_fraction=kw["drop_fraction"],
            rewire_until=kw["rewire_until"],
        )


class SparseMLPFamily(_SparseFamily):
    """Sparse MLP classifiers: width, depth, sparsity, activation, batch size, data set drawn
    from their sets, init scale log-uniformly; storage and rewire_every as set. Spec kwargs:
    width, depth, sparsity, activation, batch_size, seed; optional init_scale (1), dataset
    ("digits"), storage ("masked" | "bcoo"), rewire_every (100; 0: static), drop_fraction (0.3),
    rewire_until (0.75)."""

    name = "sparse_mlp"
    description = "sparse MLP image classifiers at a fixed weight budget, rewired by RigL"
    required = {"width": int, "depth": int}

    def __init__(self, widths: Sequence[int] = (64, 128, 256), depths: Sequence[int] = (1, 2),
                 sparsities: Sequence[float] = (0.8, 0.9, 0.95), activations: Sequence[str] = ("relu",),
                 batch_sizes: Sequence[int] = (64, 128), init_scales: Sequence[float] = (0.5, 2.0),
                 datasets: Sequence[str] = (DIGITS,), storage: str = "masked",
                 rewire_every: int = REWIRE_EVERY):
        super().__init__(sparsities, activations, batch_sizes, init_scales, datasets, storage, rewire_every)
        self.widths = choices("widths", widths)
        self.depths = choices("depths", depths)

    def sample(self, key: jax.Array) -> TaskSpec:
        keys = jax.random.split(key, 8)
        return TaskSpec(self.name, {"width": pick(keys[6], self.widths), "depth": pick(keys[7], self.depths),
                                    **self._common(keys)})

    def _layers(self, spec: TaskSpec):
        kw = self._kwargs(spec, self.required)
        if min(kw["width"], kw["depth"]) < 1:
            raise spec_error(spec, "width and depth must be >= 1")
        shape, classes = image_info(kw["dataset"])
        sizes = (math.prod(shape), *(kw["width"],) * kw["depth"], classes)
        layers = [(f"layer_{i}", a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
        return layers, [1] * len(layers)

    @staticmethod
    def _image_shape(kw) -> None:
        return None


class SparseCNNFamily(_SparseFamily):
    """Sparse CNN classifiers: `depth` 3x3 stride-2 'SAME' conv layers of `channels` filters, then
    a dense head, every weight sparse. Spec kwargs as sparse_mlp's, with channels instead of width."""

    name = "sparse_cnn"
    description = "sparse CNN image classifiers at a fixed weight budget, rewired by RigL"
    required = {"channels": int, "depth": int}

    def __init__(self, channels: Sequence[int] = (16, 32), depths: Sequence[int] = (1, 2),
                 sparsities: Sequence[float] = (0.8, 0.9, 0.95), activations: Sequence[str] = ("relu",),
                 batch_sizes: Sequence[int] = (64, 128), init_scales: Sequence[float] = (0.5, 2.0),
                 datasets: Sequence[str] = (DIGITS,), storage: str = "masked",
                 rewire_every: int = REWIRE_EVERY):
        super().__init__(sparsities, activations, batch_sizes, init_scales, datasets, storage, rewire_every)
        self.channels = choices("channels", channels)
        self.depths = choices("depths", depths)

    def sample(self, key: jax.Array) -> TaskSpec:
        keys = jax.random.split(key, 8)
        return TaskSpec(self.name, {"channels": pick(keys[6], self.channels),
                                    "depth": pick(keys[7], self.depths), **self._common(keys)})

    def _layers(self, spec: TaskSpec):
        kw = self._kwargs(spec, self.required)
        if min(kw["channels"], kw["depth"]) < 1:
            raise spec_error(spec, "channels and depth must be >= 1")
        shape, classes = image_info(kw["dataset"])
        convs, (h, w) = _layer_shapes(shape, kw["channels"], kw["depth"], "stride")
        layers = [(f"conv_{i}", KERNEL * KERNEL * c_in, kw["channels"])
                  for i, (_, _, c_in) in enumerate(convs)]
        positions = [h_out * w_out for h_out, w_out, _ in convs]
        return layers + [("head", h * w * kw["channels"], classes)], positions + [1]

    @staticmethod
    def _image_shape(kw) -> tuple[int, int, int]:
        return image_info(kw["dataset"])[0]
