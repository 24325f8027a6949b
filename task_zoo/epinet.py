"""Family ``epinet``: epistemic neural networks (Osband et al. 2021), trained for joint log-loss.

An ENN is a network of an input x and an epistemic index z ~ N(0, I_{index_dim}). Here it is
the paper's epinet: a base MLP μ(x) with last hidden features φ(x), plus a small network of
(stop_gradient(φ(x)), z):

    f(x, z) = μ(x) + σ_L(sg[φ(x)], z) + prior_scale · σ_P(sg[φ(x)], z),
    σ(φ, z) = MLP([φ, z]) reshaped to (outputs, index_dim), times z

σ_L is trained; σ_P, the prior, has the same shape and fixed random weights (the task's leaves,
drawn from the spec's seed, never parameters). Varying z varies the prediction where the prior
is not yet explained away: that is the network's epistemic uncertainty.

The loss is the *joint* log-loss of the paper's evaluation (the Neural Testbed's): the batch is cut
into groups of `tau` inputs, `num_indices` indices z_k are drawn from the loss's key, and each
group scores -log( (1/K) Σ_k Π_i p(y_i | x_i, z_k) ), divided by tau so that it reads per input
(at tau = 1 it is the marginal log-loss of the ensemble's mean prediction). A network that is
confident and wrong on a group together pays for it, which the marginal loss does not see.

Problems: "classification" on scikit-learn's 8x8 digits (softmax likelihood) and "regression"
on its diabetes table (10 features, standardised target, Gaussian likelihood of std `noise`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from metaopt.task_zoo._layers import ACTIVATIONS, dense_apply, dense_cost, dense_init, draw, split_data
from metaopt.task_zoo._spec import choices, log_uniform, pick, positive_range, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import TaskCost, TaskSpec
from metaopt.task_zoo.images import DIGITS, load_images
from metaopt.task_zoo.layer_stats import Taps, tap

NAME = "epinet"
PROBLEMS = ("classification", "regression")
EPINET_HIDDEN = 16  # the epinet MLP's hidden width (learnable part and prior alike)


@functools.lru_cache(maxsize=1)
def _diabetes() -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets  # deferred: the sklearn import is slow-ish

    data = sklearn.datasets.load_diabetes()
    return np.asarray(data.data, np.float64), np.asarray(data.target, np.float64)


def _regression_data(data_seed: int) -> dict[str, np.ndarray]:
    """Diabetes in a seeded order, a fifth held out; x and y standardised on the training part."""
    x, y = _diabetes()
    order = np.random.default_rng(data_seed).permutation(len(y))
    x, y = x[order], y[order]
    n_train = len(y) - len(y) // 5
    x = (x - x[:n_train].mean(0)) / x[:n_train].std(0)
    y = (y - y[:n_train].mean()) / y[:n_train].std()
    return {"train_x": x[:n_train], "train_y": y[:n_train], "test_x": x[n_train:], "test_y": y[n_train:]}


def epinet_apply(layers: dict, phi: jax.Array, z: jax.Array, outputs: int, prefix: str,
                 taps: Taps | None = None) -> jax.Array:
    """σ(φ, z): (B, F) features and (K, D) indices -> (B, K, outputs). `layers` holds
    {prefix}_0 ((F + D) -> EPINET_HIDDEN, relu) and {prefix}_1 (-> outputs·D)."""
    b, k, d = phi.shape[0], z.shape[0], z.shape[1]
    x = jnp.concatenate([jnp.broadcast_to(phi[:, None], (b, k, phi.shape[1])),
                         jnp.broadcast_to(z[None], (b, k, d))], axis=-1)
    for i in range(2):
        name = f"{prefix}_{i}"
        x = tap(taps, name, x, x @ layers[name]["w"] + layers[name]["b"])
        x = jax.nn.relu(x) if i == 0 else x
    return jnp.einsum("bkod,kd->bko", x.reshape(b, k, outputs, d), z)


def joint_log_loss(log_likelihoods: jax.Array, tau: int) -> jax.Array:
    """(B, K) log p(y_i | x_i, z_k) -> mean over groups of tau inputs of
    -log((1/K) Σ_k Π_{i in group} p(y_i | x_i, z_k)) / tau."""
    b, k = log_likelihoods.shape
    per_group = log_likelihoods.reshape(b // tau, tau, k).sum(axis=1)  # (groups, K)
    return -jnp.mean(jax.scipy.special.logsumexp(per_group, axis=1) - jnp.log(k)) / tau


@struct.dataclass
class EpinetTask:
    """A base MLP with an epinet head. Sizes are static; data, prior and noise are leaves."""

    train_x: jax.Array  # (N_train, D) float32
    train_y: jax.Array  # (N_train,) int32 labels, or float32 standardised targets
    test_x: jax.Array
    test_y: jax.Array
    prior: dict  # {"prior_0", "prior_1"}: the fixed random epinet σ_P
    prior_scale: jax.Array  # () float32
    noise: jax.Array  # () float32 std of the regression likelihood (unused for classification)
    init_scale: jax.Array  # () float32, multiplies the LeCun-normal init of the base network
    hidden: tuple[int, ...] = struct.field(pytree_node=False)
    activation: str = struct.field(pytree_node=False)
    outputs: int = struct.field(pytree_node=False)  # classes, or 1 for regression
    classification: bool = struct.field(pytree_node=False)
    index_dim: int = struct.field(pytree_node=False)
    num_indices: int = struct.field(pytree_node=False)
    tau: int = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)

    def init(self, key: jax.Array) -> dict:
        """{"layer_i": base MLP, i = 0..len(hidden); "epinet_0", "epinet_1": the learnable σ_L}."""
        k_base, k_epi = jax.random.split(key)
        base = dense_init(k_base, (self.train_x.shape[1], *self.hidden, self.outputs), self.init_scale)
        epinet = _epinet_init(k_epi, self.hidden[-1], self.index_dim, self.outputs, "epinet")
        return {**base, **epinet}

    def predict(self, params: dict, x: jax.Array, z: jax.Array, taps: Taps | None = None) -> jax.Array:
        """f(x, z): (B, D) inputs, (K, index_dim) indices -> (B, K, outputs)."""
        n = len(self.hidden)
        phi = ACTIVATIONS[self.activation](dense_apply(params, x, n, self.activation, taps=taps))
        mean = dense_apply(params, phi, 1, self.activation, prefix=n, taps=taps)
        phi = jax.lax.stop_gradient(phi)
        learned = epinet_apply(params, phi, z, self.outputs, "epinet", taps)
        prior = epinet_apply(self.prior, phi, z, self.outputs, "prior")
        return mean[:, None] + learned + self.prior_scale * prior

    def log_likelihoods(self, params: dict, z: jax.Array, batch: dict, taps: Taps | None = None) -> jax.Array:
        """(B, K) log p(y_i | x_i, z_k)."""
        out = self.predict(params, batch["x"], z, taps)
        if self.classification:
            return jnp.take_along_axis(jax.nn.log_softmax(out), batch["y"][:, None, None], axis=-1)[..., 0]
        residual = (out[..., 0] - batch["y"][:, None]) / self.noise
        return -0.5 * residual**2 - jnp.log(self.noise) - 0.5 * jnp.log(2 * jnp.pi)

    def loss(self, params: dict, key: jax.Array, batch: dict) -> jax.Array:
        """Scalar float32 joint log-loss per input over groups of tau (module docstring); the
        indices come from `key`."""
        return self.tapped_loss(params, key, batch, None)

    def tapped_loss(self, params: dict, key: jax.Array, batch: dict, taps: Taps | None) -> jax.Array:
        """`loss` with every trained layer tapped (see `task_zoo.layer_stats`)."""
        z = jax.random.normal(key, (self.num_indices, self.index_dim), jnp.float32)
        return joint_log_loss(self.log_likelihoods(params, z, batch, taps), self.tau)

    def full(self, split: str) -> dict[str, jax.Array]:
        return split_data(self, split)

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, D), "y": (batch_size,)}, drawn with replacement."""
        return draw(self.full(split), key, self.batch_size)


def _epinet_init(key: jax.Array, features: int, index_dim: int, outputs: int, prefix: str) -> dict:
    layers = dense_init(key, (features + index_dim, EPINET_HIDDEN, outputs * index_dim), jnp.float32(1.0))
    return {f"{prefix}_{i}": layers[f"layer_{i}"] for i in range(2)}


class EpinetFamily:
    """Distribution over epinet tasks: problem, base width and depth, index dimension, number of
    sampled indices, group size tau and batch size uniform over their sets; prior scale and init
    scale log-uniform in their ranges."""

    name = NAME
    description = "epistemic neural networks (epinets) on digits or diabetes, joint log-loss"

    def __init__(
        self,
        problems: Sequence[str] = PROBLEMS,
        widths: Sequence[int] = (32, 64),
        depths: Sequence[int] = (1, 2),
        index_dims: Sequence[int] = (4, 8),
        prior_scales: Sequence[float] = (0.3, 1.0),
        num_indices: Sequence[int] = (8,),
        taus: Sequence[int] = (1, 4, 8),
        batch_sizes: Sequence[int] = (32, 64),
        init_scales: Sequence[float] = (0.5, 2.0),
    ):
        self.problems = choices("problems", problems, PROBLEMS)
        self.widths = choices("widths", widths)
        self.depths = choices("depths", depths)
        self.index_dims = choices("index_dims", index_dims)
        self.prior_scales = positive_range("prior_scales", prior_scales)
        self.num_indices = choices("num_indices", num_indices)
        self.taus = choices("taus", taus)
        self.batch_sizes = choices("batch_sizes", batch_sizes)
        if any(b % t for b in self.batch_sizes for t in self.taus):
            raise ValueError(f"every batch size must be a multiple of every tau, got {batch_sizes!r} "
                             f"and {taus!r}")
        self.init_scales = positive_range("init_scales", init_scales)

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, 10)
        return TaskSpec(NAME, {
            "problem": pick(keys[0], self.problems),
            "width": pick(keys[1], self.widths),
            "depth": pick(keys[2], self.depths),
            "index_dim": pick(keys[3], self.index_dims),
            "prior_scale": log_uniform(keys[4], *self.prior_scales),
            "num_indices": pick(keys[5], self.num_indices),
            "tau": pick(keys[6], self.taus),
            "batch_size": pick(keys[7], self.batch_sizes),
            "seed": seed(keys[8]),  # the prior's weights and the regression split
            "init_scale": log_uniform(keys[9], *self.init_scales),
        })

    @staticmethod
    def _kwargs(spec: TaskSpec) -> dict:
        kw = spec_kwargs(
            spec, NAME,
            required={"problem": str, "width": int, "depth": int, "batch_size": int, "seed": int},
            optional={"index_dim": (int, 8), "prior_scale": (float, 1.0), "num_indices": (int, 8),
                      "tau": (int, 4), "noise": (float, 0.5), "activation": (str, "relu"),
                      "init_scale": (float, 1.0)},
        )
        if kw["problem"] not in PROBLEMS:
            raise spec_error(spec, f"problem must be one of {list(PROBLEMS)}")
        if kw["activation"] not in ACTIVATIONS:
            raise spec_error(spec, f"activation must be one of {sorted(ACTIVATIONS)}")
        if min(kw["width"], kw["depth"], kw["batch_size"], kw["index_dim"], kw["num_indices"], kw["tau"]) < 1:
            raise spec_error(spec, "width, depth, batch_size, index_dim, num_indices and tau must be >= 1")
        if kw["batch_size"] % kw["tau"]:
            raise spec_error(spec, f"batch_size ({kw['batch_size']}) must be a multiple of tau ({kw['tau']})")
        if kw["noise"] <= 0 or kw["prior_scale"] < 0 or kw["init_scale"] < 0:
            raise spec_error(spec, "need noise > 0, prior_scale >= 0 and init_scale >= 0")
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """The base MLP's `dense_cost` plus both epinet MLPs run on num_indices copies of the batch."""
        kw = self._kwargs(spec)
        d, outputs = (64, 10) if kw["problem"] == "classification" else (10, 1)
        base = dense_cost((d, *(kw["width"],) * kw["depth"], outputs), kw["batch_size"])
        epi = dense_cost((kw["width"] + kw["index_dim"], EPINET_HIDDEN, outputs * kw["index_dim"]),
                         kw["batch_size"] * kw["num_indices"])
        return TaskCost(base.parameters + epi.parameters, base.flops_per_step + 2 * epi.flops_per_step)

    def task_fn(self, spec: TaskSpec) -> EpinetTask:
        """Spec kwargs: problem, width, depth, batch_size, seed; optional index_dim (8),
        prior_scale (1), num_indices (8), tau (4), noise (0.5, regression), activation ("relu"),
        init_scale (1)."""
        kw = self._kwargs(spec)
        if kw["problem"] == "classification":
            images = load_images(DIGITS)
            data = {"train_x": images.train_x, "train_y": images.train_y,
                    "test_x": images.test_x, "test_y": images.test_y}
            outputs, dtype = images.num_classes, jnp.int32
        else:
            data, outputs, dtype = _regression_data(kw["seed"]), 1, jnp.float32
        prior = _epinet_init(jax.random.key(kw["seed"]), kw["width"], kw["index_dim"], outputs, "prior")
        return EpinetTask(
            train_x=jnp.asarray(data["train_x"], jnp.float32), train_y=jnp.asarray(data["train_y"], dtype),
            test_x=jnp.asarray(data["test_x"], jnp.float32), test_y=jnp.asarray(data["test_y"], dtype),
            prior=prior, prior_scale=jnp.float32(kw["prior_scale"]), noise=jnp.float32(kw["noise"]),
            init_scale=jnp.float32(kw["init_scale"]), hidden=(kw["width"],) * kw["depth"],
            activation=kw["activation"], outputs=outputs, classification=kw["problem"] == "classification",
            index_dim=kw["index_dim"], num_indices=kw["num_indices"], tau=kw["tau"],
            batch_size=kw["batch_size"],
        )
