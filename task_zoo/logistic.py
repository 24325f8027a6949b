"""Family ``logistic``: L2-regularised logistic regression on synthetic or real tabular data.

Data sets (the ``dataset`` kwarg)::

    "synthetic"      made with numpy from the spec's seed: x ~ N(0, I) of n_features; labels drawn
                     from softmax(separation * x @ W* / sqrt(n_features) + log prior), W* ~ N(0, I).
                     Large `separation` -> nearly separable, small -> noisy labels. Class prior
                     prior_k ∝ balance**k, so balance = 1 is balanced. n_samples rows in all; a
                     fifth are the test split.
    "breast_cancer", "wine", "iris"
                     scikit-learn's bundled tables (no download), split 80/20 by a permutation
                     from the spec's seed.

Features are standardised with the train split's mean and std. Two classes give binary logistic
regression (one weight vector, sigmoid); more give multinomial (softmax). Loss: mean
cross-entropy + 0.5 * l2 * ||W||^2 (biases unpenalised).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from metaopt.task_zoo._layers import dense_cost, dense_init, draw, split_data
from metaopt.task_zoo._spec import choices, log_uniform, pick, positive_range, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import TaskCost, TaskSpec
from metaopt.task_zoo.layer_stats import Taps, tap

NAME = "logistic"
SYNTHETIC = "synthetic"
REAL = {"breast_cancer": (30, 2), "wine": (13, 3), "iris": (4, 3)}  # name -> (features, classes)
DATASETS = (SYNTHETIC, *REAL)
# synthetic-only kwargs and their defaults (a spec for a real data set must not carry them)
SYNTHETIC_KWARGS = {
    "n_features": (int, 16),
    "n_samples": (int, 512),
    "n_classes": (int, 2),
    "separation": (float, 2.0),
    "balance": (float, 1.0),
}


@functools.lru_cache(maxsize=len(REAL))
def _real(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, features) float64, y (N,) int) of a bundled scikit-learn table."""
    import sklearn.datasets  # deferred: the sklearn import is slow-ish

    data = getattr(sklearn.datasets, f"load_{name}")()
    return np.asarray(data.data, np.float64), np.asarray(data.target, np.int64)


def _synthetic(kw: dict) -> tuple[np.ndarray, np.ndarray]:
    """(x (n_samples, n_features), y (n_samples,)) drawn deterministically from kw["seed"]."""
    rng = np.random.default_rng(kw["seed"])
    d, k = kw["n_features"], kw["n_classes"]
    x = rng.standard_normal((kw["n_samples"], d))
    logits = kw["separation"] * x @ rng.standard_normal((d, k)) / np.sqrt(d)
    logits += np.arange(k) * np.log(kw["balance"])  # log prior_k = k * log(balance) + const
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (rng.random((len(x), 1)) > np.cumsum(p, axis=1)).sum(axis=1)  # inverse-CDF sampling
    return x, np.minimum(y, k - 1)  # guard against cumsum rounding just below 1


@struct.dataclass
class LogisticTask:
    """A logistic-regression task. Sizes are static; data, l2 and init scale are leaves."""

    train_x: jax.Array  # (N_train, d) float32, standardised
    train_y: jax.Array  # (N_train,) int32 in [0, num_classes)
    test_x: jax.Array  # (N_test, d) float32
    test_y: jax.Array  # (N_test,) int32
    l2: jax.Array  # () float32 penalty on the weights
    init_scale: jax.Array  # () float32; 0 gives the classic all-zero start
    num_classes: int = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False)

    @property
    def outputs(self) -> int:
        """1 logit for binary problems, one per class otherwise."""
        return 1 if self.num_classes == 2 else self.num_classes

    def init(self, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
        """{"layer_0": {"w": (d, outputs), "b": (outputs,)}} float32."""
        return dense_init(key, (self.train_x.shape[1], self.outputs), self.init_scale)

    def logits(self, params: dict, x: jax.Array, taps: Taps | None = None) -> jax.Array:
        """(B, d) -> (B, outputs)."""
        return tap(taps, "layer_0", x, x @ params["layer_0"]["w"] + params["layer_0"]["b"])

    def loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32: mean cross-entropy + 0.5 * l2 * ||w||^2. `key` is unused."""
        return self.tapped_loss(params, key, batch, None)

    def tapped_loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array],
                    taps: Taps | None) -> jax.Array:
        """`loss` with its layer tapped (see `task_zoo.layer_stats`)."""
        del key
        logits = self.logits(params, batch["x"], taps)
        if self.outputs == 1:
            xent = optax.sigmoid_binary_cross_entropy(logits[:, 0], batch["y"].astype(jnp.float32))
        else:
            xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return xent.mean() + 0.5 * self.l2 * jnp.sum(params["layer_0"]["w"] ** 2)

    def accuracy(self, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 fraction of `batch` classified correctly."""
        logits = self.logits(params, batch["x"])
        pred = (logits[:, 0] > 0).astype(jnp.int32) if self.outputs == 1 else jnp.argmax(logits, -1)
        return jnp.mean(pred == batch["y"]).astype(jnp.float32)

    def full(self, split: str) -> dict[str, jax.Array]:
        """The whole of `split` as one batch: {"x": (N, d), "y": (N,)}."""
        return split_data(self, split)

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, d) float32, "y": (batch_size,) int32}, drawn with replacement."""
        return draw(self.full(split), key, self.batch_size)


class LogisticFamily:
    """Distribution over logistic regressions: data set, synthetic sizes, l2 and batch size
    uniform over their sets; separation and init scale log-uniform, balance uniform in ranges."""

    name = NAME
    description = "logistic regression on synthetic or scikit-learn tabular data, optional L2"

    def __init__(
        self,
        datasets: Sequence[str] = DATASETS,
        n_features: Sequence[int] = (4, 16, 64),
        n_samples: Sequence[int] = (256, 1024),
        n_classes: Sequence[int] = (2, 3, 5),
        separation: Sequence[float] = (0.5, 8.0),
        balance: Sequence[float] = (0.3, 1.0),
        l2s: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
        batch_sizes: Sequence[int] = (16, 32, 64, 128),
        init_scales: Sequence[float] = (0.1, 1.0),
    ):
        self.datasets = choices("datasets", datasets, DATASETS)
        self.n_features = choices("n_features", n_features)
        self.n_samples = choices("n_samples", n_samples)
        if min(self.n_samples) < 5:
            raise ValueError(f"n_samples must be >= 5 (a fifth is the test split), got {n_samples!r}")
        self.n_classes = choices("n_classes", n_classes)
        if min(self.n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes!r}")
        self.separation = positive_range("separation", separation)
        self.balance = positive_range("balance", balance)
        if self.balance[1] > 1:
            raise ValueError(f"balance must lie in (0, 1], got {balance!r}")
        self.l2s = tuple(float(v) for v in l2s)
        if not self.l2s or min(self.l2s) < 0:
            raise ValueError(f"l2s must be a non-empty set of numbers >= 0, got {l2s!r}")
        self.batch_sizes = choices("batch_sizes", batch_sizes)
        self.init_scales = positive_range("init_scales", init_scales)

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, 10)
        kw = {
            "dataset": pick(keys[0], self.datasets),
            "l2": pick(keys[1], self.l2s),
            "batch_size": pick(keys[2], self.batch_sizes),
            "init_scale": log_uniform(keys[3], *self.init_scales),
            "seed": seed(keys[4]),  # the synthetic data, or the real data's split
        }
        if kw["dataset"] == SYNTHETIC:
            kw["n_features"] = pick(keys[5], self.n_features)
            kw["n_samples"] = pick(keys[6], self.n_samples)
            kw["n_classes"] = pick(keys[7], self.n_classes)
            kw["separation"] = log_uniform(keys[8], *self.separation)
            kw["balance"] = float(
                jax.random.uniform(keys[9], (), minval=self.balance[0], maxval=self.balance[1])
            )
        return TaskSpec(NAME, kw)

    @staticmethod
    def _kwargs(spec: TaskSpec) -> dict:
        kw = spec_kwargs(
            spec,
            NAME,
            required={"dataset": str, "batch_size": int, "seed": int},
            optional={"l2": (float, 0.0), "init_scale": (float, 1.0), **SYNTHETIC_KWARGS},
        )
        if kw["dataset"] not in DATASETS:
            raise spec_error(spec, f"dataset must be one of {list(DATASETS)}")
        if kw["dataset"] != SYNTHETIC and set(SYNTHETIC_KWARGS) & set(spec.kwargs):
            raise spec_error(spec, f"{sorted(SYNTHETIC_KWARGS)} apply to dataset 'synthetic' only")
        if kw["batch_size"] < 1 or kw["n_features"] < 1 or kw["n_samples"] < 5 or kw["n_classes"] < 2:
            raise spec_error(spec, "need batch_size >= 1, n_features >= 1, n_samples >= 5, n_classes >= 2")
        if kw["l2"] < 0 or kw["init_scale"] < 0 or kw["separation"] < 0 or not 0 < kw["balance"] <= 1:
            raise spec_error(spec, "need l2, init_scale, separation >= 0 and 0 < balance <= 1")
        if kw["dataset"] != SYNTHETIC:
            kw["n_features"], kw["n_classes"] = REAL[kw["dataset"]]
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """`task_zoo.mlp.dense_cost` of one (d, outputs) layer; outputs = 1 for 2 classes."""
        kw = self._kwargs(spec)
        outputs = 1 if kw["n_classes"] == 2 else kw["n_classes"]
        return dense_cost((kw["n_features"], outputs), kw["batch_size"])

    def task_fn(self, spec: TaskSpec) -> LogisticTask:
        """Spec kwargs: dataset, batch_size, seed; optional l2 (0), init_scale (1) and, for
        dataset "synthetic" only, n_features (16), n_samples (512), n_classes (2),
        separation (2), balance (1)."""
        kw = self._kwargs(spec)
        if kw["dataset"] == SYNTHETIC:
            x, y = _synthetic(kw)  # already in a random order
        else:
            x, y = _real(kw["dataset"])
            order = np.random.default_rng(kw["seed"]).permutation(len(y))
            x, y = x[order], y[order]
        n_train = len(y) - len(y) // 5
        mean, std = x[:n_train].mean(axis=0), x[:n_train].std(axis=0)
        x = (x - mean) / np.where(std > 0, std, 1.0)  # constant columns stay finite
        return LogisticTask(
            train_x=jnp.asarray(x[:n_train], jnp.float32),
            train_y=jnp.asarray(y[:n_train], jnp.int32),
            test_x=jnp.asarray(x[n_train:], jnp.float32),
            test_y=jnp.asarray(y[n_train:], jnp.int32),
            l2=jnp.asarray(kw["l2"], jnp.float32),
            init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
            num_classes=kw["n_classes"],
            batch_size=kw["batch_size"],
        )
