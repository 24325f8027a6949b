"""Family ``least_squares``: linear regression on a design matrix of controlled condition number.

Data, made with numpy from the spec's seed (no download)::

    train_x = sqrt(n_train) * U diag(s) V^T      (n_train, n_features), U^T U = I, V orthogonal
    s_j     = 10 ** (-log10_condition * j / (n_features - 1)),  j = 0 .. n_features - 1
    test_x  = g diag(s) V^T,  g ~ N(0, I)         (n_test, n_features)
    y       = x @ w_star + noise * N(0, 1),  w_star ~ N(0, I)

so the condition number of the train design matrix, sigma_max / sigma_min, is exactly
10 ** log10_condition, and the test rows come from the population whose second moment
V diag(s**2) V^T equals the train rows' (1/n_train) X^T X. Unlike the axis-aligned ``quadratic``
family, the curvature is rotated by V (no per-coordinate rescaling removes it), its condition
number is the square of the matrix's, and the gradient noise comes from sampling rows.

Loss: mean squared error of the bias-free linear model, mean_i (x_i @ w - y_i)**2. Its minimum
over the full train split is at the least-squares solution, where the expected loss is the noise
floor noise**2 * (n_train - n_features) / n_train; at w_star it is noise**2 in expectation on
either split. Of `n_samples` rows a fifth (rounded down) are the test split.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from metaopt.task_zoo._layers import draw, split_data
from metaopt.task_zoo._spec import choices, log_uniform, pick, positive_range, seed, spec_error, spec_kwargs
from metaopt.task_zoo.base import TaskCost, TaskSpec
from metaopt.task_zoo.layer_stats import Taps, tap

NAME = "least_squares"
REQUIRED = {"n_features": int, "n_samples": int, "log10_condition": float, "noise": float,
            "batch_size": int, "seed": int}
OPTIONAL = {"init_scale": (float, 1.0)}


def split_sizes(n_samples: int) -> tuple[int, int]:
    """(n_train, n_test): a fifth of the rows, rounded down, are the test split."""
    return n_samples - n_samples // 5, n_samples // 5


def make_data(kw: dict) -> dict[str, np.ndarray]:
    """{"train_x", "train_y", "test_x", "test_y", "w_star"} float64, drawn deterministically from
    kw["seed"] as the module docstring says."""
    rng = np.random.default_rng(kw["seed"])
    d = kw["n_features"]
    n_train, n_test = split_sizes(kw["n_samples"])
    s = 10.0 ** (-kw["log10_condition"] * np.arange(d) / max(d - 1, 1))
    u, _ = np.linalg.qr(rng.standard_normal((n_train, d)))  # orthonormal columns
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a random rotation
    train_x = np.sqrt(n_train) * (u * s) @ v.T
    test_x = (rng.standard_normal((n_test, d)) * s) @ v.T
    w_star = rng.standard_normal(d)
    train_y = train_x @ w_star + kw["noise"] * rng.standard_normal(n_train)
    test_y = test_x @ w_star + kw["noise"] * rng.standard_normal(n_test)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "w_star": w_star}


@struct.dataclass
class LeastSquaresTask:
    """A linear regression. Sizes are static; data and init scale are leaves, so tasks of equal
    sizes share one compiled program whatever their spectrum, noise or seed."""

    train_x: jax.Array  # (n_train, n_features) float32
    train_y: jax.Array  # (n_train,) float32
    test_x: jax.Array  # (n_test, n_features) float32
    test_y: jax.Array  # (n_test,) float32
    w_star: jax.Array  # (n_features,) float32, the generating weights (for checks; the loss never reads it)
    init_scale: jax.Array  # () float32, std of the initial weights
    batch_size: int = struct.field(pytree_node=False)

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        """{"w": (n_features,) float32} drawn from N(0, init_scale**2), the scale of w_star."""
        return {"w": self.init_scale * jax.random.normal(key, self.w_star.shape, jnp.float32)}

    def loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """Scalar float32 mean squared error of x @ w against y. `key` is unused."""
        return self.tapped_loss(params, key, batch, None)

    def tapped_loss(self, params: dict, key: jax.Array, batch: dict[str, jax.Array],
                    taps: Taps | None) -> jax.Array:
        """`loss` with its one bias-free layer "w" tapped (see `task_zoo.layer_stats`)."""
        del key
        return jnp.mean((tap(taps, "w", batch["x"], batch["x"] @ params["w"]) - batch["y"]) ** 2)

    def full(self, split: str) -> dict[str, jax.Array]:
        """The whole of `split` as one batch: {"x": (N, n_features), "y": (N,)}."""
        return split_data(self, split)

    def batch(self, key: jax.Array, split: str) -> dict[str, jax.Array]:
        """{"x": (batch_size, n_features) float32, "y": (batch_size,) float32}, with replacement."""
        return draw(self.full(split), key, self.batch_size)


class LeastSquaresFamily:
    """Distribution over least-squares problems: sizes and batch size uniform over their sets,
    log10 condition number uniform, noise and init scale log-uniform in their ranges."""

    name = NAME
    description = "linear regression (mean squared error) on a design matrix of set condition number"

    def __init__(
        self,
        n_features: Sequence[int] = (8, 16, 32, 64),
        n_samples: Sequence[int] = (512, 1024),
        log10_condition: Sequence[float] = (1.0, 4.0),
        noise: Sequence[float] = (0.01, 0.3),
        batch_sizes: Sequence[int] = (16, 32, 64, 128),
        init_scales: Sequence[float] = (0.5, 2.0),
    ):
        self.n_features = choices("n_features", n_features)
        self.n_samples = choices("n_samples", n_samples)
        if split_sizes(min(self.n_samples))[0] < max(self.n_features):
            raise ValueError(f"every n_samples must leave at least max(n_features) = {max(self.n_features)} "
                             f"train rows (4/5 of the rows), got n_samples={n_samples!r}")
        self.log10_condition = positive_range("log10_condition", log10_condition, low=-1e-12)
        self.noise = positive_range("noise", noise)
        self.batch_sizes = choices("batch_sizes", batch_sizes)
        self.init_scales = positive_range("init_scales", init_scales)

    def sample(self, key: jax.Array) -> TaskSpec:
        """Host-side (not jittable): returns a spec of plain Python values."""
        keys = jax.random.split(key, len(REQUIRED) + len(OPTIONAL))
        lo, hi = self.log10_condition
        return TaskSpec(NAME, {
            "n_features": pick(keys[0], self.n_features),
            "n_samples": pick(keys[1], self.n_samples),
            "log10_condition": float(jax.random.uniform(keys[2], (), minval=lo, maxval=hi)),
            "noise": log_uniform(keys[3], *self.noise),
            "batch_size": pick(keys[4], self.batch_sizes),
            "seed": seed(keys[5]),  # draws U, V, w_star and the noise
            "init_scale": log_uniform(keys[6], *self.init_scales),
        })

    @staticmethod
    def _kwargs(spec: TaskSpec) -> dict:
        kw = spec_kwargs(spec, NAME, required=REQUIRED, optional=OPTIONAL)
        if min(kw["n_features"], kw["batch_size"]) < 1:
            raise spec_error(spec, "n_features and batch_size must be >= 1")
        n_train, n_test = split_sizes(kw["n_samples"])
        if n_train < kw["n_features"] or n_test < 1:
            raise spec_error(spec, f"n_samples must leave at least n_features={kw['n_features']} train rows "
                                   f"(4/5 of them) and one test row; raise n_samples")
        if kw["log10_condition"] < 0 or kw["noise"] < 0 or kw["init_scale"] < 0:
            raise spec_error(spec, "log10_condition, noise and init_scale must be >= 0")
        if kw["n_features"] == 1 and kw["log10_condition"] != 0:
            raise spec_error(spec, "one feature has one singular value: log10_condition must be 0")
        return kw

    def cost(self, spec: TaskSpec) -> TaskCost:
        """n_features parameters; a multiply-add per weight and row, x3 for forward and backward."""
        kw = self._kwargs(spec)
        d = kw["n_features"]
        return TaskCost(parameters=d, flops_per_step=3.0 * 2.0 * kw["batch_size"] * (d + 1))

    def task_fn(self, spec: TaskSpec) -> LeastSquaresTask:
        """Spec kwargs: n_features, n_samples, log10_condition, noise, batch_size, seed; optional
        init_scale (1)."""
        kw = self._kwargs(spec)
        data = {k: jnp.asarray(v, jnp.float32) for k, v in make_data(kw).items()}
        return LeastSquaresTask(**data, init_scale=jnp.asarray(kw["init_scale"], jnp.float32),
                                batch_size=kw["batch_size"])
