"""A G.pt-style generative model of parameter updates (Peebles, Radosavovic, Brooks, Efros & Malik
2022, "Learning to learn with generative models of neural network checkpoints"), sized for a
CPU and trained on a dataset of training runs (metaopt.datasets).

G.pt is a diffusion transformer trained on 23M checkpoints: prompted with a network's
parameters, its loss and a target loss, it samples the parameters of a network that reaches the
target, in one step. Here the same conditional model is small: DDPM (Ho et al. 2020; a linear
noise schedule over T = 100 steps; ancestral sampling, its clean estimate clipped) over the update
Δ = θ_b - θ_a between two records a, b of one inner run (b later), its denoiser an MLP on
[noisy Δ, θ_a, log loss_a, log loss_b, an embedding of the diffusion step] added to a skip
(`denoise`), trained to predict the noise. Every coordinate of θ and Δ is standardised by the
dataset's statistics, so the model sees unit-scale inputs whatever the network (the diffusion
starts from unit noise, so Δ is centred too: the model generates the deviation from the
dataset's mean update). One model serves one architecture: every record must hold parameters of
the same paths and shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.datasets import Record

DIFFUSION_STEPS = 100
BETA_MAX = 0.2  # the noise schedule's last β
X0_CLIP = 5.0  # sampling clips its estimate of the clean (standardised) update to ±5 standard deviations
TIME_FEATURES = 32
MIN_STD = 1e-6  # a coordinate that never moves (a pruned weight) is not divided by 0


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Training examples: θ_a (N, D), Δ = θ_b - θ_a (N, D), log loss_a and log loss_b (N,);
    `paths` and `shapes` of the flattened parameters, in order."""

    theta: np.ndarray
    delta: np.ndarray
    log_loss: np.ndarray
    log_target: np.ndarray
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def flatten(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """One parameter set ({path: array}, as a record's) as a vector in this order."""
        return np.concatenate([np.asarray(params[p], np.float32).reshape(-1) for p in self.paths])

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        out, start = {}, 0
        for path, shape in zip(self.paths, self.shapes, strict=True):
            size = math.prod(shape)
            out[path] = np.asarray(vector[start:start + size]).reshape(shape)
            start += size
        return out


def pairs(records: Iterable[Record]) -> Pairs:
    """Every (a, b) of one run with b's step after a's. ValueError if the records hold
    parameters of more than one architecture, or no run has two records."""
    runs: dict[str, list[Record]] = {}
    layout = None
    for record in records:
        shapes = tuple(sorted((p, tuple(a.shape)) for p, a in record.params.items()))
        if layout is None:
            layout = shapes
        elif shapes != layout:
            raise ValueError(f"records of run {record.meta['run']} hold parameters {shapes}, others "
                             f"{layout}: a model of updates serves one architecture; export or filter "
                             "the records of one")
        runs.setdefault(record.meta["run"], []).append(record)
    if layout is None:
        raise ValueError("no records")
    paths = tuple(p for p, _ in layout)
    shapes = tuple(s for _, s in layout)
    empty = Pairs(np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0), np.zeros(0), paths, shapes)
    theta, delta, loss, target = [], [], [], []
    for run in runs.values():
        run.sort(key=lambda r: r.meta["step"])
        vectors = [empty.flatten(r.params) for r in run]
        for i, a in enumerate(run):
            for j in range(i + 1, len(run)):
                if run[j].meta["step"] > a.meta["step"]:
                    theta.append(vectors[i])
                    delta.append(vectors[j] - vectors[i])
                    loss.append(a.meta["loss"])
                    target.append(run[j].meta["loss"])
    if not theta:
        raise ValueError("no run has two records at different steps: record more often (record."
                         "every_truncations) or over longer runs")
    return Pairs(np.stack(theta), np.stack(delta), np.log(np.asarray(loss, np.float32)),
                 np.log(np.asarray(target, np.float32)), paths, shapes)


def noise_schedule(steps: int = DIFFUSION_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(β_t, ᾱ_t = Π_{s≤t} (1 - β_s)) for t = 1..steps: β linear from 1e-4 to BETA_MAX, so that
    ᾱ at the last step is ~exp(-steps · BETA_MAX / 2) (4.5e-5 at 100 steps): almost pure noise.
    Not the cosine schedule: over only 100 steps its last β is 0.999, and the first sampling step
    divides the denoiser's error by √(1 - β) = 0.03."""
    beta = np.linspace(1e-4, BETA_MAX, steps)
    return beta.astype(np.float32), np.cumprod(1 - beta).astype(np.float32)


def _time_features(t: jax.Array) -> jax.Array:
    """Sinusoidal features of the diffusion step t (batch,) → (batch, TIME_FEATURES)."""
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(TIME_FEATURES // 2) / (TIME_FEATURES // 2))
    angles = t[:, None].astype(jnp.float32) * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def init_denoiser(key: jax.Array, dim: int, hidden: int) -> dict[str, Any]:
    """The denoiser's weights: an MLP [x_t, θ, log losses, time] → ε̂, two hidden gelu layers."""
    sizes = [2 * dim + 2 + TIME_FEATURES, hidden, hidden, dim]
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, (n_in, n_out) in zip(keys, zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        layers.append({"w": jax.random.normal(k, (n_in, n_out)) / math.sqrt(n_in), "b": jnp.zeros(n_out)})
    layers[-1]["w"] = layers[-1]["w"] * 0.1  # starts near the skip alone
    return {"layers": layers}


def denoise(weights: dict[str, Any], x_t, theta, log_loss, log_target, t, alpha_bar) -> jax.Array:
    """The noise estimate: √(1 - ᾱ_t) x_t, the best one for standardised data that ignored its
    conditions, plus the MLP's correction. Without that skip the MLP would have to pass x_t
    through its hidden layers, narrower than the parameters: it cannot, and at the noisy steps,
    where the noise is nearly x_t itself, its estimate (and every sample) would stay noisy."""
    h = jnp.concatenate([x_t, theta, log_loss[:, None], log_target[:, None], _time_features(t)], axis=1)
    for layer in weights["layers"][:-1]:
        h = jax.nn.gelu(h @ layer["w"] + layer["b"])
    last = weights["layers"][-1]
    return jnp.sqrt(1 - alpha_bar[t])[:, None] * x_t + h @ last["w"] + last["b"]


@dataclasses.dataclass(frozen=True)
class UpdateModel:
    """A trained model of updates: its denoiser's weights and the standardisation of its data."""

    weights: dict[str, Any]
    theta_mean: np.ndarray
    theta_std: np.ndarray
    delta_mean: np.ndarray
    delta_std: np.ndarray
    loss_mean: float
    loss_std: float
    layout: Pairs  # its paths and shapes (the arrays emptied)

    def propose(self, params: dict[str, np.ndarray], loss: float, target: float, key: jax.Array,
                samples: int = 1) -> list[dict[str, np.ndarray]]:
        """`samples` parameter sets sampled for a network at `params` with training loss `loss`,
        prompted to reach `target`: θ + Δ, Δ drawn by ancestral DDPM sampling."""
        theta = self.layout.flatten(params)
        z = (theta - self.theta_mean) / self.theta_std
        standard = lambda v: (math.log(v) - self.loss_mean) / self.loss_std  # noqa: E731
        starts = jnp.asarray(np.tile(z, (samples, 1)))
        deltas = _sample(self.weights, starts, standard(loss), standard(target), key)
        return [self.layout.unflatten(theta + self.delta_mean + np.asarray(d) * self.delta_std)
                for d in deltas]


@jax.jit
def _sample(weights, theta, log_loss, log_target, key):
    """Ancestral DDPM sampling of standardised updates, one per row of `theta`. Each step predicts
    the clean update x̂₀ from the noise estimate, clips it to ±X0_CLIP standard deviations, and
    steps to the posterior mean given x̂₀ (Ho et al. 2020, eq. 7): an error of the noise estimate
    then cannot grow through the 1/√(1 - β) of each step (their product is 1/√ᾱ_T, ~150)."""
    beta, alpha_bar = (jnp.asarray(a) for a in noise_schedule())
    alpha_bar_prev = jnp.concatenate([jnp.ones(1), alpha_bar[:-1]])
    n = theta.shape[0]
    losses = jnp.full((n,), log_loss, jnp.float32), jnp.full((n,), log_target, jnp.float32)

    def step(x, inputs):
        t, k = inputs
        eps = denoise(weights, x, theta, *losses, jnp.full((n,), t), alpha_bar)
        x0 = jnp.clip((x - jnp.sqrt(1 - alpha_bar[t]) * eps) / jnp.sqrt(alpha_bar[t]), -X0_CLIP, X0_CLIP)
        mean = (jnp.sqrt(alpha_bar_prev[t]) * beta[t] * x0
                + jnp.sqrt(1 - beta[t]) * (1 - alpha_bar_prev[t]) * x) / (1 - alpha_bar[t])
        variance = beta[t] * (1 - alpha_bar_prev[t]) / (1 - alpha_bar[t])
        return mean + jnp.sqrt(variance) * jax.random.normal(k, x.shape), None

    first, rest = jax.random.split(key)
    times = jnp.arange(DIFFUSION_STEPS - 1, -1, -1)
    x, _ = jax.lax.scan(step, jax.random.normal(first, theta.shape),
                        (times, jax.random.split(rest, DIFFUSION_STEPS)))
    return x


def fit(data: Pairs, steps: int, key: jax.Array, hidden: int = 512, batch: int = 128,
        learning_rate: float = 1e-3) -> tuple[UpdateModel, np.ndarray]:
    """Train the denoiser for `steps` minibatches (Adam, cosine decay); (model, its loss per step:
    the mean squared error of the predicted noise, 1 for a model that predicts 0)."""
    theta_mean, theta_std = data.theta.mean(0), np.maximum(data.theta.std(0), MIN_STD)
    delta_mean, delta_std = data.delta.mean(0), np.maximum(data.delta.std(0), MIN_STD)
    logs = np.concatenate([data.log_loss, data.log_target])
    loss_mean, loss_std = float(logs.mean()), float(max(logs.std(), MIN_STD))
    theta = jnp.asarray((data.theta - theta_mean) / theta_std)
    delta = jnp.asarray((data.delta - delta_mean) / delta_std)
    log_loss = jnp.asarray((data.log_loss - loss_mean) / loss_std)
    log_target = jnp.asarray((data.log_target - loss_mean) / loss_std)
    init_key, key = jax.random.split(key)
    weights = init_denoiser(init_key, theta.shape[1], hidden)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    _, alpha_bar = noise_schedule()
    alpha_bar = jnp.asarray(alpha_bar)

    def loss_fn(w, k):
        k_idx, k_t, k_eps = jax.random.split(k, 3)
        idx = jax.random.randint(k_idx, (batch,), 0, theta.shape[0])
        t = jax.random.randint(k_t, (batch,), 0, DIFFUSION_STEPS)
        eps = jax.random.normal(k_eps, (batch, theta.shape[1]))
        a = alpha_bar[t][:, None]
        x_t = jnp.sqrt(a) * delta[idx] + jnp.sqrt(1 - a) * eps
        predicted = denoise(w, x_t, theta[idx], log_loss[idx], log_target[idx], t, alpha_bar)
        return jnp.mean(jnp.square(predicted - eps))

    @jax.jit
    def train_step(carry, k):
        w, opt_state = carry
        value, grads = jax.value_and_grad(loss_fn)(w, k)
        updates, opt_state = tx.update(grads, opt_state, w)
        return (optax.apply_updates(w, updates), opt_state), value

    keys = jax.random.split(key, steps)
    (weights, _), history = jax.lax.scan(train_step, (weights, tx.init(weights)), keys)
    layout = dataclasses.replace(data, theta=np.zeros((0, 0)), delta=np.zeros((0, 0)), log_loss=np.zeros(0),
                                 log_target=np.zeros(0))
    model = UpdateModel(weights, theta_mean, theta_std, delta_mean, delta_std, loss_mean, loss_std, layout)
    return model, np.asarray(history)
