"""Compare PES, truncated ES, full-run ES and TBPTT meta-gradient estimators.

Two problems:

* ``closed_form``: the scalar quadratic of tests/test_estimators.py (f = a·x²/2 from x₀, plain
  gradient descent with a learned step size θ). The reference is the exact gradient of the
  unsmoothed whole-run meta-loss L(θ) = (1/H) Σ_t a·x₀²(1 − aθ)^{2t}/2 (σ → 0), the quantity
  meta-training wants; each ES method also carries its own O(σ²) smoothing bias against it.
* ``quadratic``: a task_zoo quadratic (dim 8, noisy gradients) trained by ``small_fc``. The
  reference is a high-sample average of *exact* per-episode whole-run gradients (jax.grad
  through all H inner steps from fresh inits, i.e. TBPTT with K = H and no stagger): unbiased
  for the unsmoothed whole-run objective, its standard error is reported.

Same budget of inner steps for every estimator: one estimate costs B forward inner steps
(both halves of an antithetic pair count): full ES B/(2H) pairs of whole runs, PES and
truncated ES one truncation of K steps with B/(2K) pairs, TBPTT one truncation with B/K
particles (plus its backward pass, not counted). Truncated methods run staggered and are
burned in for one horizon of truncations before estimates are recorded, so particles sit at
uniform positions in their inner runs. Reported per estimator: bias (mean − reference, with
its standard error over independent chains), variance of one estimate, and MSE, as
norms over θ; then a short meta-training (outer Adam, one estimate per outer step, the same
number of outer steps and so inner steps for all) with the whole-run meta-loss of θ evaluated
on fixed held-out episodes.

    python benchmarks/estimators.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from metaopt import optimizers, task_zoo  # noqa: E402
from metaopt.workers.estimators import ESTIMATORS, make_estimator  # noqa: E402
from metaopt.workers.objective import LearnedOptimizerTraining  # noqa: E402
from tests.test_estimators import X0, A, FakeLearnedStepSize, ScalarQuadratic  # noqa: E402


def closed_form_loss(theta, horizon):
    """Whole-run meta-loss of the scalar problem ("none" normalisation), unsmoothed."""
    mu = 1 - A * theta["lr"]
    return sum(0.5 * A * X0**2 * mu ** (2 * t) for t in range(horizon)) / horizon


def make_problem(name, cfg):
    """(the meta-objective: an optimizer training the problem's task, θ₀, normalisation, σ, lr)."""
    if name == "closed_form":
        task = ScalarQuadratic(a=jnp.asarray(A, jnp.float32))
        objective = LearnedOptimizerTraining(task, FakeLearnedStepSize(), cfg["horizon"])
        return objective, FakeLearnedStepSize().init(None), "none", cfg["sigma_cf"], cfg["lr_cf"]
    optimizer = optimizers.make("small_fc")
    spec = task_zoo.TaskSpec("quadratic", {"dim": 8, "log10_condition": 1.0, "noise": 0.1, "seed": 0})
    return (LearnedOptimizerTraining(task_zoo.task(spec), optimizer, cfg["horizon"]),
            optimizer.init(jax.random.key(0)), "initial", cfg["sigma_real"], cfg["lr_real"])


def build(kind, cfg, sigma, norm):
    H, K, B = cfg["horizon"], cfg["truncation"], cfg["budget"]
    particles = {"full_es": B // (2 * H), "pes": B // (2 * K), "truncated_es": B // (2 * K),
                 "tbptt": B // K}[kind]
    return make_estimator(
        kind, num_particles=particles, truncation_length=K, inner_horizon=H,
        sigma=sigma, stagger=True, loss_normalization=norm,
    )


def reference_gradient(name, task, theta, cfg, norm):
    """(flat reference gradient, its standard error per coordinate or 0)."""
    if name == "closed_form":
        return np.asarray(ravel_pytree(jax.grad(closed_form_loss)(theta, cfg["horizon"]))[0]), 0.0
    H, n = cfg["horizon"], cfg["ref_particles"]
    exact = make_estimator(
        "tbptt", num_particles=n, truncation_length=H, inner_horizon=H, stagger=False,
        loss_normalization=norm,
    )
    grads = []
    for r in range(cfg["ref_batches"]):
        key = jax.random.key(10_000 + r)
        state = exact.init(jax.random.fold_in(key, 0), theta, task)
        grads.append(np.asarray(exact.estimate(jax.random.fold_in(key, 1), theta, state, task)[1]))
    grads = np.array(grads)
    return grads.mean(0), grads.std(0, ddof=1) / math.sqrt(len(grads))


def bias_variance(kind, estimator, task, theta, ref, cfg):
    """Independent chains; truncated methods burn in one horizon of truncations first."""
    burn = 0 if kind == "full_es" else cfg["horizon"] // cfg["truncation"]
    chains = []
    for c in range(cfg["chains"]):
        key = jax.random.key(c)
        state = estimator.init(jax.random.fold_in(key, 0), theta, task)
        est = []
        for i in range(burn + cfg["per_chain"]):
            state, g, _ = estimator.estimate(jax.random.fold_in(key, i + 1), theta, state, task)
            if i >= burn:
                est.append(np.asarray(g))
        chains.append(est)
    chains = np.array(chains)  # [chains, per_chain, |θ|]
    flat = chains.reshape(-1, chains.shape[-1])
    mean = flat.mean(0)
    chain_means = chains.mean(1)
    bias = mean - ref
    bias_se = chain_means.std(0, ddof=1) / math.sqrt(len(chain_means))
    variance = float(np.sum(flat.var(0, ddof=1)))  # total variance of one estimate
    ref_norm = float(np.linalg.norm(ref))
    return {
        "bias_norm": float(np.linalg.norm(bias)),
        "bias_stderr_norm": float(np.linalg.norm(bias_se)),
        "relative_bias": float(np.linalg.norm(bias)) / ref_norm,
        "cosine_mean_vs_reference": float(mean @ ref / (np.linalg.norm(mean) * ref_norm + 1e-30)),
        "variance": variance,
        "relative_std": math.sqrt(variance) / ref_norm,
        "mse": float(np.linalg.norm(bias) ** 2 + variance),
        "estimates": int(flat.shape[0]),
    }


def meta_train(kind, estimator, task, theta0, cfg, lr, evaluate):
    tx = optax.adam(lr)
    theta, opt_state = theta0, tx.init(theta0)
    _, unravel = ravel_pytree(theta0)

    @jax.jit
    def outer_step(theta, opt_state, g):
        updates, opt_state = tx.update(unravel(jnp.nan_to_num(g)), opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    state = estimator.init(jax.random.key(7), theta, task)
    curve = [(0, evaluate(theta))]
    for step in range(1, cfg["meta_steps"] + 1):
        state, g, _ = estimator.estimate(jax.random.key(100_000 + step), theta, state, task)
        theta, opt_state = outer_step(theta, opt_state, g)
        if step % cfg["eval_every"] == 0 or step == cfg["meta_steps"]:
            curve.append((step, evaluate(theta)))
    return curve


def make_evaluator(task, cfg, norm):
    """Mean whole-run meta-loss at θ on fixed episodes (unperturbed runs)."""
    runner = make_estimator("full_es", num_particles=1, truncation_length=cfg["horizon"],
                            inner_horizon=cfg["horizon"], loss_normalization=norm)
    keys = jax.random.split(jax.random.key(999), cfg["eval_episodes"])

    @jax.jit
    def loss(theta):
        thetas = jax.tree.map(lambda t: jnp.broadcast_to(t, (len(keys), *t.shape)), theta)
        return jnp.mean(runner.run_losses(thetas, keys, task))

    return lambda theta: float(loss(theta))


def run(cfg):
    results = {"config": cfg, "problems": {}}
    for name in ("closed_form", "quadratic"):
        t0 = time.time()
        task, theta, norm, sigma, lr = make_problem(name, cfg)
        ref, ref_se = reference_gradient(name, task, theta, cfg, norm)
        evaluate = make_evaluator(task, cfg, norm)
        print(f"[{name}] reference and evaluator: {time.time() - t0:.1f} s", file=sys.stderr)
        problem = {
            "reference": ("exact gradient of the unsmoothed whole-run loss" if name == "closed_form"
                          else f"mean of {cfg['ref_batches'] * cfg['ref_particles']} exact per-episode "
                               "whole-run gradients (backprop through all H steps)"),
            "reference_norm": float(np.linalg.norm(ref)),
            "reference_stderr_norm": float(np.linalg.norm(ref_se)),
            "theta_size": int(ref.size), "sigma": sigma, "outer_adam_lr": lr,
            "estimators": {},
        }
        for kind in ESTIMATORS:
            estimator = build(kind, cfg, sigma, norm)
            stats = bias_variance(kind, estimator, task, theta, ref, cfg)
            stats["particles"] = estimator.config.num_particles
            stats["meta_loss_curve"] = meta_train(kind, estimator, task, theta, cfg, lr, evaluate)
            problem["estimators"][kind] = stats
            print(f"[{name}] {kind:13s} bias {stats['bias_norm']:.4g} (±{stats['bias_stderr_norm']:.2g}) "
                  f"rel.bias {stats['relative_bias']:.3f} rel.std {stats['relative_std']:.3f} "
                  f"meta-loss {stats['meta_loss_curve'][0][1]:.4g} -> {stats['meta_loss_curve'][-1][1]:.4g} "
                  f"({time.time() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        problem["seconds"] = time.time() - t0
        results["problems"][name] = problem
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["problems"])
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 4 * len(names)))
    for row, name in zip(axes, names, strict=True):
        ests = results["problems"][name]["estimators"]
        kinds = list(ests)
        x = np.arange(len(kinds))
        row[0].bar(x, [ests[k]["relative_bias"] for k in kinds],
                   yerr=[ests[k]["bias_stderr_norm"] / results["problems"][name]["reference_norm"]
                         for k in kinds])
        row[0].set_title(f"{name}: |bias| / |reference|")
        row[1].bar(x, [ests[k]["relative_std"] for k in kinds])
        row[1].set_yscale("log")
        row[1].set_title(f"{name}: std of one estimate / |reference|")
        for ax in row[:2]:
            ax.set_xticks(x, kinds)
        for k in kinds:
            steps, losses = zip(*ests[k]["meta_loss_curve"], strict=True)
            row[2].plot(steps, losses, label=k, marker=".")
        row[2].set_title(f"{name}: whole-run meta-loss (held-out episodes)")
        row[2].set_xlabel(f"outer step ({results['config']['budget']} inner steps each)")
        row[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 1 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--out", help="directory for estimators.json and estimators.png")
    args = parser.parse_args()
    cfg = {"horizon": 20, "truncation": 5, "budget": 80 if args.quick else 320,
           "chains": 3 if args.quick else 16, "per_chain": 5 if args.quick else 16,
           "ref_particles": 64, "ref_batches": 2 if args.quick else 16,
           "meta_steps": 15 if args.quick else 150, "eval_every": 5 if args.quick else 10,
           "eval_episodes": 32, "sigma_cf": 0.01, "sigma_real": 0.01, "lr_cf": 0.03, "lr_real": 3e-3}
    results = run(cfg)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "estimators.json"), "w") as f:
            json.dump(results, f, indent=1)
        plot(results, os.path.join(args.out, "estimators.png"))
    if args.json:
        print(json.dumps(results))
    else:
        for name, problem in results["problems"].items():
            print(f"{name}: reference |g| = {problem['reference_norm']:.4g} ({problem['reference']})")
            for kind, s in problem["estimators"].items():
                curve = s["meta_loss_curve"]
                print(f"  {kind:13s} P={s['particles']:3d} rel.bias {s['relative_bias']:.3f} "
                      f"(±{s['bias_stderr_norm'] / problem['reference_norm']:.3f}) "
                      f"rel.std {s['relative_std']:.3f} cos {s['cosine_mean_vs_reference']:.3f} "
                      f"meta-loss {curve[0][1]:.4g} -> {curve[-1][1]:.4g}")


if __name__ == "__main__":
    main()
