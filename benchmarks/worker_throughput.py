"""A PES worker's inner-training throughput vs plain optax training of the same task.

For each task, in one process and one run:
  - `adam_steps_per_s`: plain training with optax Adam, one model, K steps per jitted scan;
  - `lopt_steps_per_s`: the same with the learned optimizer (small_fc at its initial θ);
  - `pes_inner_steps_per_s`: the PES estimator's truncations (P antithetic pairs, both halves
    counted), i.e. what a worker computes per second, excluding the network.
Ratios are against Adam. Writes worker_throughput.json (and a PNG with --out).

    python benchmarks/worker_throughput.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import task_zoo
from metaopt import optimizers
from workers.estimators import make_estimator

TASKS = [
    task_zoo.TaskSpec("quadratic", {"dim": 16, "log10_condition": 2.0, "noise": 0.1, "seed": 0}),
    task_zoo.TaskSpec("mlp", {"width": 32, "depth": 1, "activation": "relu", "batch_size": 64, "seed": 0}),
    task_zoo.TaskSpec("mlp", {"width": 64, "depth": 2, "activation": "relu", "batch_size": 128, "seed": 0}),
]


def _time(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which must block) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_training_steps_per_s(task, tx, steps: int, repeats: int) -> float:
    @jax.jit
    def train(key):
        params = task.init(key)

        def body(carry, k):
            params, state = carry
            b_key, l_key = jax.random.split(k)
            loss, grads = jax.value_and_grad(task.loss)(params, l_key, task.batch(b_key, "train"))
            updates, state = tx.update(grads, state, params, loss=loss)
            return (optax.apply_updates(params, updates), state), loss

        _, losses = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(key, steps))
        return losses

    seconds = _time(lambda: train(jax.random.key(0)).block_until_ready(), repeats)
    return steps / seconds


def pes_steps_per_s(task, lopt, particles: int, steps: int, repeats: int) -> float:
    estimator = make_estimator("pes", lopt, num_particles=particles, truncation_length=steps,
                               inner_horizon=10 * steps)
    theta = lopt.init(jax.random.key(0))
    state = [estimator.init(jax.random.key(1), theta, task)]
    key = [jax.random.key(2)]

    def one():
        key[0], sub = jax.random.split(key[0])
        state[0], grad, _ = estimator.estimate(sub, theta, state[0], task)
        grad.block_until_ready()

    return 2 * particles * steps / _time(one, repeats)


def run(quick: bool) -> dict:
    steps, particles, repeats = (20, 8, 3) if quick else (50, 8, 7)
    lopt = optimizers.make("small_fc")
    theta = lopt.init(jax.random.key(0))
    rows = []
    for spec in TASKS[:2] if quick else TASKS:
        task = task_zoo.task(spec)
        n_params = sum(x.size for x in jax.tree.leaves(task.init(jax.random.key(0))))
        adam_tx = optax.with_extra_args_support(optax.adam(1e-3))
        lopt_tx = lopt.as_optax(jax.tree.map(jnp.asarray, theta), 1000)
        adam = plain_training_steps_per_s(task, adam_tx, steps, repeats)
        learned = plain_training_steps_per_s(task, lopt_tx, steps, repeats)
        pes = pes_steps_per_s(task, lopt, particles, steps, repeats)
        rows.append({
            "task": spec.to_json(), "parameters": int(n_params), "particles": particles,
            "truncation_length": steps, "adam_steps_per_s": adam, "lopt_steps_per_s": learned,
            "pes_inner_steps_per_s": pes, "lopt_vs_adam": learned / adam, "pes_vs_adam": pes / adam,
        })
    return {"benchmark": "worker_throughput", "device": str(jax.devices()[0]), "quick": quick, "rows": rows}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{json.loads(r['task'])['name']}\n{r['parameters']} params" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for i, (key, name) in enumerate([("adam_steps_per_s", "Adam, 1 model"),
                                     ("lopt_steps_per_s", "small_fc, 1 model"),
                                     ("pes_inner_steps_per_s", "PES worker (all particles)")]):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [r[key] for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set(ylabel="inner steps per second", yscale="log", title="Worker throughput (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write worker_throughput.json and .png here")
    args = parser.parse_args()
    result = run(args.quick)
    for r in result["rows"]:
        print(f"{r['task']}: adam {r['adam_steps_per_s']:.0f}/s, small_fc {r['lopt_steps_per_s']:.0f}/s "
              f"({r['lopt_vs_adam']:.2f}x), PES {r['pes_inner_steps_per_s']:.0f}/s ({r['pes_vs_adam']:.2f}x)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "worker_throughput.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "worker_throughput.png")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
