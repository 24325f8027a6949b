"""A PES worker's inner-training throughput vs plain optax Adam training of the same task.

Task: the reference configuration, an MLP 64→32→10 (relu) on 8×8 digits, batch 128
(task_zoo TaskSpec("mlp", {"width": 32, "depth": 1, ...})); learned optimizer `small_fc` at its
initial θ (hidden width 32); PES with truncation length 10, for 1, 8 and 32 antithetic pairs
(8 is the reference). Inner steps count both halves of every pair (2 · pairs · 10 per
estimate). Measured:
  - `pes_inner_steps_per_s`, the headline: the machine's workers as `metaopt train` lays them
    out by default (`workers.cpus: 1`, `pin_cores: true`): one worker process per core, each
    pinned to the core it claimed (workers/cores.py), all running at once; their sum.
    `estimates_per_s` is their gradient estimates per second.
  - `pes_one_process_inner_steps_per_s`: one worker process given every core, which sees one
    jax device per core (as with `workers.cpus` = the core count) and splits its halves
    across them; `pes_one_device_inner_steps_per_s`: one process, one device, XLA's threads.
  - `adam_steps_per_s` / `lopt_steps_per_s`: plain training of one model with optax Adam /
    with the learned optimizer, a jitted scan of steps, as a user runs it (one device, XLA's
    own threads). These and the one-process figures are timed alternately in this process.
`pes_vs_adam` is the ratio of PES to Adam: the overhead of estimation per inner step.
This measures metaopt alone: benchmarks/peers/run.py measures google/learned_optimization's
TruncatedPES on the same work, alternately with this, in the same run.

    python benchmarks/worker_throughput.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from metaopt import optimizers, task_zoo
from metaopt.workers.cores import claim_cores
from metaopt.workers.estimators import make_estimator
from metaopt.workers.objective import LearnedOptimizerTraining

TASK = task_zoo.TaskSpec("mlp", {"width": 32, "depth": 1, "activation": "relu", "batch_size": 128, "seed": 0})
TRUNCATION_LENGTH = 10
REFERENCE_PARTICLES = 8


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each blocking `fn()`, after one warm-up call each, timed in turns so
    that all of them see the same machine load."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def plain_training(task, tx, steps: int):
    """A blocking callable running `steps` steps of plain training with `tx` (one jitted scan)."""

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

    return lambda: train(jax.random.key(0)).block_until_ready()


def reference_estimator(task, lopt, particles: int, devices=None):
    """The PES estimator of the reference configuration, its halves split across `devices`
    (default: all), and the meta-objective it estimates for: `lopt` training `task`."""
    estimator = make_estimator("pes", devices=devices, num_particles=particles,
                               truncation_length=TRUNCATION_LENGTH, inner_horizon=10 * TRUNCATION_LENGTH)
    return estimator, LearnedOptimizerTraining(task, lopt, estimator.config.inner_horizon)


def pes_truncation(task, lopt, particles: int, devices=None):
    """A blocking callable running one PES truncation (one gradient estimate) on `devices`
    (default: all)."""
    estimator, task = reference_estimator(task, lopt, particles, devices)
    theta = lopt.init(jax.random.key(0))
    state = [estimator.init(jax.random.key(1), theta, task)]
    key = [jax.random.key(2)]

    def one():
        key[0], sub = jax.random.split(key[0])
        state[0], grad, _ = estimator.estimate(sub, theta, state[0], task)
        grad.block_until_ready()

    return one


def pinned_workers(particles: int, seconds: float) -> float:
    """Inner steps/s of one pinned single-core worker process per core, running together."""
    with tempfile.TemporaryDirectory() as lock_dir:
        procs = [
            subprocess.Popen([sys.executable, __file__, "--lane", lock_dir, "--particles", str(particles),
                              "--seconds", str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
            for _ in range(os.cpu_count() or 1)
        ]
        for p in procs:  # each has claimed its core and compiled
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a worker lane failed to start; run it alone to see why")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        rates = [json.loads(p.communicate()[0])["inner_steps_per_s"] for p in procs]
    return sum(rates)


def lane(lock_dir: str, particles: int, seconds: float) -> None:
    """One pinned worker lane: claim a core, warm up, say "ready"; then for each "go" line run
    PES truncations for `seconds` and print its inner steps/s as JSON; exit at end of input
    (benchmarks/peers/run.py sends one "go" a round)."""
    claim = claim_cores(1, pathlib.Path(lock_dir))
    estimate = pes_truncation(task_zoo.task(TASK), optimizers.make("small_fc"), particles)
    for _ in range(3):
        estimate()
    print("ready", flush=True)
    for _ in sys.stdin:
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            estimate()
            done += 1
        rate = 2 * particles * TRUNCATION_LENGTH * done / (time.perf_counter() - start)
        print(json.dumps({"inner_steps_per_s": rate, "cores": claim.cores if claim else None}), flush=True)


def run(quick: bool) -> dict:
    quick_setting, full_setting = ((REFERENCE_PARTICLES,), 5, 100), ((1, 8, 32), 15, 200)
    particle_counts, repeats, plain_steps = quick_setting if quick else full_setting
    lane_seconds = 4.0 if quick else 15.0
    task = task_zoo.task(TASK)
    lopt = optimizers.make("small_fc")
    theta = lopt.init(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(task.init(jax.random.key(0))))
    adam = plain_training(task, optax.with_extra_args_support(optax.adam(1e-3)), plain_steps)
    learned = plain_training(task, lopt.as_optax(jax.tree.map(jnp.asarray, theta), 1000), plain_steps)
    rows = []
    for particles in particle_counts:
        seconds = interleaved({
            "adam": adam, "lopt": learned, "pes_one_process": pes_truncation(task, lopt, particles),
            "pes_one_device": pes_truncation(task, lopt, particles, jax.devices()[:1]),
        }, repeats)
        adam_rate, lopt_rate = plain_steps / seconds["adam"], plain_steps / seconds["lopt"]
        inner_steps = 2 * particles * TRUNCATION_LENGTH  # per estimate
        pes_rate = pinned_workers(particles, lane_seconds)
        rows.append({
            "particles": particles, "reference": particles == REFERENCE_PARTICLES,
            "adam_steps_per_s": adam_rate, "lopt_steps_per_s": lopt_rate,
            "pes_inner_steps_per_s": pes_rate, "estimates_per_s": pes_rate / inner_steps,
            "pes_one_process_inner_steps_per_s": inner_steps / seconds["pes_one_process"],
            "pes_one_device_inner_steps_per_s": inner_steps / seconds["pes_one_device"],
            "lopt_vs_adam": lopt_rate / adam_rate, "pes_vs_adam": pes_rate / adam_rate,
        })
    return {
        "benchmark": "worker_throughput", "device": str(jax.devices()[0]), "quick": quick,
        "cpu_devices": len(jax.devices("cpu")), "pinned_workers": os.cpu_count() or 1,
        "task": TASK.to_json(), "parameters": int(n_params), "optimizer": "small_fc",
        "truncation_length": TRUNCATION_LENGTH, "rows": rows,
    }


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [("adam_steps_per_s", "Adam, 1 model"), ("lopt_steps_per_s", "small_fc, 1 model"),
            ("pes_one_device_inner_steps_per_s", "PES, one process, one device"),
            ("pes_one_process_inner_steps_per_s", f"PES, one process, {result['cpu_devices']} devices"),
            ("pes_inner_steps_per_s", f"PES, {result['cpu_devices']} pinned 1-core workers")]
    width = 0.8 / len(bars)
    for i, (key, name) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(rows))], [r[key] for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), [f"{r['particles']} pairs" for r in rows])
    ax.set(ylabel="inner steps per second", yscale="log",
           title=f"Worker throughput, MLP 64→32→10 digits, K={result['truncation_length']} (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write worker_throughput.json and .png here")
    # Internal: one pinned worker lane of `pinned_workers`.
    parser.add_argument("--lane", metavar="LOCK_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--particles", type=int, default=REFERENCE_PARTICLES, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lane:
        return lane(args.lane, args.particles, args.seconds)
    # One jax CPU device per core, set before jax starts (as workers.actor.worker_env does
    # for a worker given every core).
    jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
    result = run(args.quick)
    for r in result["rows"]:
        print(f"{r['particles']:2d} pairs: adam {r['adam_steps_per_s']:.0f}/s, "
              f"small_fc {r['lopt_steps_per_s']:.0f}/s "
              f"({r['lopt_vs_adam']:.2f}x), PES {r['pes_inner_steps_per_s']:.0f} inner steps/s "
              f"({r['pes_vs_adam']:.2f}x; one process {r['pes_one_process_inner_steps_per_s']:.0f}, "
              f"one device {r['pes_one_device_inner_steps_per_s']:.0f}), "
              f"{r['estimates_per_s']:.1f} estimates/s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "worker_throughput.json").write_text(json.dumps(result, indent=2))
        if not args.quick:
            plot(result, args.out / "worker_throughput.png")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
