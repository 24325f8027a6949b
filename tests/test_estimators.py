"""PES and truncated ES against a closed-form Gaussian-smoothed meta-gradient.

Inner problem: f(x) = a·x²/2 in one dimension, from x₀, trained by gradient descent with a
learned step size θ. Each truncation j (of K steps) runs at θ + ε_j, ε_j ~ N(0, σ²) drawn
afresh per truncation, so x after step s of truncation j is

    x = x₀ · Π_{i<j} μ_i^K · μ_j^s,   μ_i = 1 − a(θ + ε_i),

and the expected loss factorises into Gaussian moments E[μ^n] (μ ~ N(1 − aθ, (aσ)²)).
PES estimates d/dθ E[mean loss of truncation j] without bias; truncated ES ignores the
dependence through the earlier truncations and is biased for j > 1.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import optimizers, task_zoo
from metaopt.jobspec import EstimatorSpec, load_job_spec
from metaopt.workers.estimators import make_estimator
from metaopt.workers.objective import LearnedOptimizerTraining

A, X0, THETA, SIGMA, K, J = 1.0, 1.0, 0.1, 0.05, 5, 3
RUNS, PARTICLES = 40, 2000  # 40 independent means of 2000 antithetic pairs each


@flax.struct.dataclass
class ScalarQuadratic:
    """f(x) = a·x²/2 from a fixed x₀; deterministic (empty batches)."""

    a: jax.Array

    def init(self, key):
        return {"x": jnp.full((1,), X0, jnp.float32)}

    def loss(self, params, key, batch):
        return 0.5 * self.a * jnp.sum(params["x"] ** 2)

    def batch(self, key, split):
        return ()


def quadratic_training(horizon: int) -> LearnedOptimizerTraining:
    """The meta-objective: FakeLearnedStepSize training ScalarQuadratic."""
    task = ScalarQuadratic(a=jnp.asarray(A, jnp.float32))
    return LearnedOptimizerTraining(task, FakeLearnedStepSize(), horizon)


@dataclasses.dataclass(frozen=True)
class FakeLearnedStepSize:
    """A fake learned optimizer for this test only: θ = {"lr": scalar}, update = −lr·g."""

    name: str = "fake_learned_step_size"
    hparams: tuple = ()

    def init(self, key):
        return {"lr": jnp.asarray(THETA, jnp.float32)}

    def as_optax(self, theta, num_steps):
        def update(grads, state, params=None, **extra):
            return jax.tree.map(lambda g: -theta["lr"] * g, grads), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def gaussian_moment(n: int, mean, std):
    """E[μⁿ] for μ ~ N(mean, std²)."""
    return sum(
        math.comb(n, k) * mean ** (n - k) * std**k * math.prod(range(k - 1, 0, -2))
        for k in range(0, n + 1, 2)
    )


def smoothed_truncation_loss(theta, j: int, horizon: int):
    """E over ε of the mean loss of truncation j (1-based), as a function of θ.

    The inner run resets every `horizon` steps (to x₀); the loss at step t depends on the
    updates u since its run's start, each made at θ + ε of the truncation that holds u.
    """
    mean, std = 1 - A * theta, A * SIGMA
    total = 0.0
    for t in range((j - 1) * K, j * K):
        start = (t // horizon) * horizon
        updates_per_truncation = collections.Counter(u // K for u in range(start, t))
        expected = 0.5 * A * X0**2
        for n in updates_per_truncation.values():
            expected = expected * gaussian_moment(2 * n, mean, std)
        total = total + expected
    return total / K


def run_estimates(kind: str, horizon: int, truncations: int) -> np.ndarray:
    """[RUNS, truncations] estimates: each run is fresh particles unrolled truncation by truncation."""
    estimator = make_estimator(
        kind, num_particles=PARTICLES, truncation_length=K,
        inner_horizon=horizon, sigma=SIGMA, stagger=False, loss_normalization="none",
    )
    task = quadratic_training(horizon)
    theta = FakeLearnedStepSize().init(None)
    out = np.zeros((RUNS, truncations))
    for run in range(RUNS):
        key = jax.random.key(run)
        state = estimator.init(jax.random.fold_in(key, 1000), theta, task)
        for j in range(truncations):
            state, grad, _ = estimator.estimate(jax.random.fold_in(key, j), theta, state, task)
            out[run, j] = float(grad[0])
    return out


def truth(horizon: int, truncations: int) -> np.ndarray:
    grad = jax.grad(smoothed_truncation_loss)
    return np.array([grad(THETA, j, horizon) for j in range(1, truncations + 1)])


# (horizon, truncations): no reset in 3 truncations; resets at steps 7 (inside truncation 2)
# and 14 (the last step of truncation 3) in 4.
@pytest.mark.parametrize("horizon, truncations", [(K * J, J), (7, 4)])
def test_pes_matches_closed_form_smoothed_gradient(horizon, truncations):
    expected = truth(horizon, truncations)
    estimates = run_estimates("pes", horizon, truncations)
    mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / math.sqrt(RUNS)
    # Within 4 standard errors and 3% of the truth, in every truncation.
    assert np.all(np.abs(mean - expected) < 4 * stderr), (mean, expected, stderr)
    assert np.all(np.abs(mean - expected) < 0.03 * np.abs(expected)), (mean, expected)


def test_truncated_es_is_biased_after_the_first_truncation():
    expected = truth(K * J, J)
    estimates = run_estimates("truncated_es", K * J, J)
    mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / math.sqrt(RUNS)
    # First truncation: nothing came before, so truncated ES is unbiased there too.
    assert abs(mean[0] - expected[0]) < 4 * stderr[0]
    # Later: it misses how θ shaped the starting state, a bias of many standard errors.
    assert np.all(np.abs(mean[1:] - expected[1:]) > 20 * stderr[1:]), (mean, expected, stderr)
    assert np.all(np.abs(mean[1:] - expected[1:]) > 0.3 * np.abs(expected[1:]))


# Influence balancing (Tallec & Ollivier 2017; the PES paper's §5.1): a linear system whose
# state s (23 numbers, from all ones) moves by s ← A·s + θ·b, A = ½(I + shift) and b = +1 on
# the first 10 entries, −1 on the other 13; the loss watches s₀ only, L = ½(s₀ − 1)². Raising θ
# pushes s₀ up at once but, through the shift, pulls it down later: over a run the negative
# influences win, which a truncation that treats its starting state as given never sees. No
# optimizer and no task: a meta-objective of its own.
IB_N, IB_POSITIVE, IB_THETA = 23, 10, 0.5
IB_A = 0.5 * (np.eye(IB_N) + np.eye(IB_N, k=1))
IB_B = np.array([1.0] * IB_POSITIVE + [-1.0] * (IB_N - IB_POSITIVE))


@flax.struct.dataclass
class InfluenceBalancing:
    def init_theta(self, key):
        return {"theta": jnp.asarray(IB_THETA, jnp.float32)}

    def init_state(self, key, theta):
        return jnp.ones((IB_N,), jnp.float32)

    def step(self, theta, s, key):
        loss = 0.5 * (s[0] - 1.0) ** 2
        return jnp.asarray(IB_A, jnp.float32) @ s + theta["theta"] * jnp.asarray(IB_B, jnp.float32), loss


def influence_truth(horizon: int, k: int) -> tuple[float, float]:
    """d/dθ of the run's total of truncation-mean losses, in float64: through the whole run
    (what PES estimates), and with each truncation's starting state held fixed (truncated ES).
    s is linear in θ and L quadratic in s, so Gaussian smoothing leaves the gradient as it is."""
    s, ds = np.ones(IB_N), np.zeros(IB_N)  # ds/dθ since the run began
    full = truncated = 0.0
    for t in range(horizon):
        if t % k == 0:
            ds_truncation = np.zeros(IB_N)  # ds/dθ since the truncation began
        full += (s[0] - 1.0) * ds[0] / k
        truncated += (s[0] - 1.0) * ds_truncation[0] / k
        s, ds, ds_truncation = IB_A @ s + IB_THETA * IB_B, IB_A @ ds + IB_B, IB_A @ ds_truncation + IB_B
    return full, truncated


def test_pes_gets_influence_balancing_right_where_truncated_es_gets_its_sign_wrong():
    """One run of 200 steps in 20 truncations of 10, 32 independent repeats of 512 pairs each:
    the estimates summed over the run, against the closed forms. PES: within 4 standard errors
    of the true gradient (+595). Truncated ES: within 4 standard errors of the gradient with
    each truncation's start held fixed (−193), the opposite sign of the truth."""
    horizon, k, repeats = 200, 10, 32
    full, truncated = influence_truth(horizon, k)
    assert full > 0 > truncated
    objective = InfluenceBalancing()
    theta = objective.init_theta(None)
    for kind, expected in (("pes", full), ("truncated_es", truncated)):
        estimator = make_estimator(kind, num_particles=512, truncation_length=k, sigma=1e-3,
                                   inner_horizon=horizon, stagger=False, loss_normalization="none")
        totals = []
        for repeat in range(repeats):
            key = jax.random.key(repeat)
            state, total = estimator.init(jax.random.fold_in(key, 1000), theta, objective), 0.0
            for j in range(horizon // k):
                state, grad, _ = estimator.estimate(jax.random.fold_in(key, j), theta, state, objective)
                total += float(grad[0])
            totals.append(total)
        mean, stderr = np.mean(totals), np.std(totals, ddof=1) / math.sqrt(repeats)
        assert abs(mean - expected) < 4 * stderr, (kind, mean, expected, stderr)
        assert stderr < 0.1 * abs(expected), (kind, stderr)  # tight enough to tell the signs apart


def test_pes_accumulator_sums_perturbations_and_restarts_at_a_reset():
    """ξ is ε₁ + ε₂ without a reset, and exactly ε₂ when the pair resets in truncation 2."""
    theta = FakeLearnedStepSize().init(None)

    def accumulators(horizon: int, keys: list[int]) -> tuple[np.ndarray, int]:
        estimator = make_estimator(
            "pes", num_particles=4, truncation_length=K, inner_horizon=horizon, sigma=SIGMA, stagger=False,
        )
        task = quadratic_training(horizon)
        state, resets = estimator.init(jax.random.key(0), theta, task), 0
        for k in keys:
            state, _, metrics = estimator.estimate(jax.random.key(k), theta, state, task)
            resets += int(metrics["resets"])
        return np.asarray(state.accumulator["lr"]), resets

    eps_1, _ = accumulators(horizon=10 * K, keys=[1])  # ξ after one truncation is its ε
    eps_2, _ = accumulators(horizon=10 * K, keys=[2])
    summed, resets = accumulators(horizon=10 * K, keys=[1, 2])
    assert resets == 0
    np.testing.assert_allclose(summed, eps_1 + eps_2, rtol=1e-6)
    restarted, resets = accumulators(horizon=K, keys=[1, 2])  # resets at truncation 2's first step
    assert resets == 4
    np.testing.assert_array_equal(restarted, eps_2)


def test_initial_loss_normalisation_rescales_each_inner_run():
    """With "initial", losses are divided by the inner run's first loss (here a·x₀²/2)."""
    task = quadratic_training(K * J)
    theta = FakeLearnedStepSize().init(None)
    grads = {}
    for mode in ("none", "initial"):
        estimator = make_estimator(
            "pes", num_particles=16, truncation_length=K,
            inner_horizon=K * J, sigma=SIGMA, stagger=False, loss_normalization=mode,
        )
        state = estimator.init(jax.random.key(0), theta, task)
        for j in range(J):
            state, grad, _ = estimator.estimate(jax.random.key(j + 1), theta, state, task)
        grads[mode] = float(grad[0])
    assert grads["initial"] == pytest.approx(grads["none"] / (0.5 * A * X0**2), rel=1e-5)


def test_log_normalisation_is_the_log_of_the_capped_initial_ratio():
    """"log": log(min(loss / initial, cap)), floored at min_loss_ratio; NaN and inf count as
    the cap, as with "initial", so a diverged particle is a large finite meta-loss."""
    loss = jnp.asarray([2.0, 0.5, 1e-12, 100.0, np.nan, np.inf], jnp.float32)
    initial = jnp.full((6,), 4.0, jnp.float32)
    ratio = make_estimator("pes", loss_normalization="initial")
    log = make_estimator("pes", loss_normalization="log", min_loss_ratio=1e-3)
    expected_ratio = np.array([0.5, 0.125, 2.5e-13, 10.0, 10.0, 10.0])
    np.testing.assert_allclose(ratio._meta_loss(loss, initial), expected_ratio, rtol=1e-6)
    expected_log = np.log(np.maximum(expected_ratio, 1e-3))
    np.testing.assert_allclose(log._meta_loss(loss, initial), expected_log, rtol=1e-6)


def test_config_rejects_a_truncation_longer_than_the_horizon():
    """The estimators' settings are the job spec's EstimatorSpec: its checks, in one place."""
    with pytest.raises(ValueError, match=r"truncation_length \(50\) must not exceed inner_horizon \(20\)"):
        make_estimator("pes", truncation_length=50, inner_horizon=20)
    with pytest.raises(ValueError, match="min_loss_ratio .* must be below max_loss_ratio"):
        make_estimator("tbptt", min_loss_ratio=20.0)
    assert make_estimator("full_es").config == EstimatorSpec(kind="full_es")


# The reference recipe's optimizer and estimator (examples/nominal_mix_v7.yaml) on one task of
# each of its families, as its mix sampled them; the estimates the estimators gave before they
# took a meta-objective (commit ba714fd, where a task and the optimizer went in directly) are in
# tests/data/estimates_before_objectives.npz, written with these keys.
BEFORE = np.load(pathlib.Path(__file__).parent / "data" / "estimates_before_objectives.npz")
REFERENCE_TASKS = {
    "quadratic": task_zoo.TaskSpec("quadratic", {
        "dim": 32, "log10_condition": 2.0254006385803223, "noise": 0.10299897193908691, "seed": 429855279}),
    "mlp": task_zoo.TaskSpec("mlp", {
        "width": 112, "depth": 1, "activation": "tanh", "batch_size": 64, "seed": 11605385,
        "init_scale": 0.7022292017936707, "dataset": "digits", "augment": {
            "param_scale": 2.5638256680022393, "grad_noise": 0.0, "tensor_scale": [0.5, 2.0],
            "element_scale": [0.8, 1.25], "scale_seed": 787125437}}),
}


@pytest.mark.parametrize(("task", "kind", "horizon", "truncations"), [
    ("quadratic", "pes", 1000, 3), ("quadratic", "pes", 30, 3), ("mlp", "pes", 1000, 3),
    pytest.param("mlp", "pes", 30, 3, marks=pytest.mark.slow),  # 7 s; the reset is quadratic-30's
    ("quadratic", "truncated_es", 30, 3), ("quadratic", "tbptt", 30, 3), ("quadratic", "full_es", 30, 1),
])
def test_estimates_on_the_objective_interface_are_those_of_before_it(task, kind, horizon, truncations):
    """Same keys, same numbers (to float32 rounding): a learned optimizer training a task is one
    meta-objective, with nothing lost. Horizon 30 puts a reset inside the second truncation."""
    recipe = load_job_spec(pathlib.Path(__file__).parent.parent / "examples" / "nominal_mix_v7.yaml")
    optimizer = optimizers.make(recipe.optimizer.name, **recipe.optimizer.hparams)
    theta = optimizer.init(jax.random.key(0))
    objective = LearnedOptimizerTraining(task_zoo.task(REFERENCE_TASKS[task]), optimizer, horizon)
    settings = {**recipe.estimator.model_dump(exclude={"kind"}), "inner_horizon": horizon}
    estimator = make_estimator(kind, **settings)
    state = estimator.init(jax.random.key(1), theta, objective)
    for j in range(truncations):
        state, grad, metrics = estimator.estimate(jax.random.key(10 + j), theta, state, objective)
        before = BEFORE[f"{task}/{kind}/{horizon}/{j}"]
        np.testing.assert_allclose(grad, before, rtol=1e-5, atol=1e-6 * np.max(np.abs(before)))
        mean_loss = BEFORE[f"{task}/{kind}/{horizon}/{j}/mean_loss"]
        np.testing.assert_allclose(metrics["mean_loss"], mean_loss, rtol=1e-6)


LEARNED = [name for name in optimizers.names() if optimizers.make(name).learned]


@pytest.mark.parametrize("name", LEARNED)
def test_every_learned_optimizer_can_be_meta_trained_with_pes(name):
    """One PES truncation per registered learned optimizer on a small quadratic: a finite,
    non-zero estimate of θ's size (the contract the workers rely on)."""
    optimizer = optimizers.make(name)
    theta = optimizer.init(jax.random.key(0))
    spec = task_zoo.TaskSpec("quadratic", {"dim": 4, "log10_condition": 1.0, "noise": 0.1, "seed": 0})
    task = LearnedOptimizerTraining(task_zoo.task(spec), optimizer, 6)
    estimator = make_estimator("pes", num_particles=2, truncation_length=3, inner_horizon=6)
    state = estimator.init(jax.random.key(1), theta, task)
    for k in range(2):
        state, grad, metrics = estimator.estimate(jax.random.key(2 + k), theta, state, task)
    size = sum(x.size for x in jax.tree.leaves(theta))
    assert grad.shape == (size,) and np.all(np.isfinite(grad)) and np.any(grad != 0)
    assert np.isfinite(float(metrics["mean_loss"]))


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from metaopt import task_zoo
from metaopt import optimizers
from metaopt.workers.estimators import make_estimator
from metaopt.workers.objective import LearnedOptimizerTraining

assert len(jax.devices()) == 2, jax.devices()
lopt = optimizers.make("small_fc", hidden=8, hidden_layers=1)
task = LearnedOptimizerTraining(task_zoo.task(task_zoo.TaskSpec(
    "mlp", {"width": 8, "depth": 1, "activation": "relu", "batch_size": 16, "seed": 0})), lopt, 10)
theta = lopt.init(jax.random.key(0))
grads = {}
for devices in (jax.devices(), jax.devices()[:1]):
    est = make_estimator("pes", devices=devices, num_particles=2, truncation_length=5, inner_horizon=10)
    state = est.init(jax.random.key(1), theta, task)
    out = []
    for i in range(3):  # a reset happens in the third truncation
        state, grad, _ = est.estimate(jax.random.key(2 + i), theta, state, task)
        out.append(np.asarray(grad))
    grads[len(devices)] = np.stack(out)
    params = jax.tree.leaves(state.inner)[0]
    assert len(params.sharding.device_set) == len(devices), params.sharding
np.testing.assert_allclose(grads[2], grads[1], rtol=1e-4, atol=1e-6 * np.abs(grads[1]).max())
print("ok", np.abs(grads[1]).max())
"""


@pytest.mark.slow  # 26 s; the worker_throughput benchmark runs the same split
def test_halves_split_across_two_cpu_devices_give_the_same_estimates():
    """A worker with JAX_NUM_CPU_DEVICES=2 runs half of the particle halves on each device
    (one per core); its estimates match one device's to float rounding, resets included.
    (A subprocess: the device count is fixed when jax starts.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2"}
    done = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
