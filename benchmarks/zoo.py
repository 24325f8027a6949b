"""Every optimizer against Adam, and every task family's inner-step time, in one run.

Optimizers: jitted update time and optimizer-state bytes per parameter at 10k, 100k and 1M
float32 parameters (four square-ish tensors), as ratios to `optax.adam` timed alternately in the
same run (so a transient load hits both). The curvature optimizers get random layer statistics of
128 examples and are timed over their inversion interval (`optimizer_rows`); collecting the
statistics costs the training step a little more (the layer inputs are kept, and a conv's patches
formed), which is not in these numbers. Task families: seconds per jitted inner training step (Adam) at the
median sampled size (the sampled spec whose estimated FLOPs are the median of 32 draws).

    python benchmarks/zoo.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
import optax

from metaopt import optimizers, task_zoo

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from lopt_step import make_params  # noqa: E402  (a sibling script, not a package)

STATS_BATCH = 128  # examples behind the layer statistics the curvature optimizers read


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_stats(params: dict, batch: int) -> dict:
    """Random statistics of a batch for each tensor of `make_params` (a bias-free dense layer)."""
    keys = jax.random.split(jax.random.key(3), 2 * len(params))
    return {name: {"a": jax.random.normal(keys[2 * i], (batch, 1, w.shape[0])),
                   "g": jax.random.normal(keys[2 * i + 1], (batch, 1, w.shape[1]))}
            for i, (name, w) in enumerate(params.items())}


def optimizer_rows(sizes: list[int], repeats: int) -> list[dict]:
    """K-FAC, FOOF and MBF read each layer's statistics (here of a batch of STATS_BATCH) and invert
    every `inverse_every` steps: they are timed on a step without an inversion and on one with it,
    and `ms_per_update` is their average over one interval."""
    rows = []
    for n in sizes:
        params = make_params(n)
        n_real = sum(x.size for x in jax.tree.leaves(params))
        grads = jax.tree.map(lambda x: 0.01 * x, params)
        extra = {"loss": 1.0}
        calls, state_bytes, every = {}, {}, {}
        txs = {"optax.adam": optax.with_extra_args_support(optax.adam(1e-3))}
        for name in optimizers.names():
            opt = optimizers.make(name)
            txs[name] = opt.as_optax(opt.init(jax.random.key(0)), 1000)
            if getattr(opt, "needs_layer_stats", False):
                every[name] = opt.inverse_every
        stats = layer_stats(params, STATS_BATCH)
        for name, tx in txs.items():
            state = tx.init(params)
            state_bytes[name] = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) / n_real
            kwargs = {**extra, "layer_stats": stats} if name in every else extra
            update = jax.jit(lambda g, s, p, tx=tx, kwargs=kwargs: tx.update(g, s, p, **kwargs))
            calls[name] = (update, (grads, state, params))  # step 0: K-FAC & co. invert
            if name in every:
                calls[name + ":plain"] = (update, (grads, update(grads, state, params)[1], params))
        times = {name: [] for name in calls}
        for _ in range(repeats):  # alternate, so transient load affects all alike
            for name, (fn, args) in calls.items():
                times[name].append(median_seconds(fn, args, 3))
        adam = statistics.median(times["optax.adam"])
        for name in optimizers.names():
            seconds = statistics.median(times[name])
            row = {"optimizer": name, "parameters": int(n_real)}
            if name in every:
                plain = statistics.median(times[name + ":plain"])
                row["ms_per_inversion_step"], row["ms_per_plain_step"] = 1e3 * seconds, 1e3 * plain
                seconds = (seconds + (every[name] - 1) * plain) / every[name]
            rows.append({**row, "ms_per_update": 1e3 * seconds, "ratio_to_adam": seconds / adam,
                         "state_bytes_per_parameter": state_bytes[name],
                         "adam_state_bytes_per_parameter": state_bytes["optax.adam"]})
    return rows


def median_spec(family) -> task_zoo.TaskSpec:
    specs = [family.sample(k) for k in jax.random.split(jax.random.key(0), 32)]
    flops = [task_zoo.cost(s).flops_per_step for s in specs]
    return specs[int(np.argsort(flops)[len(flops) // 2])]


def task_rows(repeats: int) -> list[dict]:
    rows = []
    tx = optax.adam(1e-3)
    for name in task_zoo.families():
        spec = median_spec(task_zoo.family(name))
        task = task_zoo.task(spec)

        @jax.jit
        def step(params, state, key, task=task):
            batch_key, loss_key = jax.random.split(key)
            grads = jax.grad(task.loss)(params, loss_key, task.batch(batch_key, task_zoo.TRAIN))
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params = task.init(jax.random.key(0))
        seconds = median_seconds(step, (params, tx.init(params), jax.random.key(1)), repeats)
        cost = task_zoo.cost(spec)
        rows.append({"family": name, "spec": spec.to_json(), "parameters": cost.parameters,
                     "estimated_flops_per_step": cost.flops_per_step, "seconds_per_step": seconds,
                     "achieved_gflops": cost.flops_per_step / seconds / 1e9})
    return rows


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["optimizers"]
    sizes = sorted({r["parameters"] for r in rows})
    names = sorted({r["optimizer"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(sizes)
    for i, n in enumerate(sizes):
        ratios = [next(r["ratio_to_adam"] for r in rows if r["optimizer"] == o and r["parameters"] == n)
                  for o in names]
        offsets = np.arange(len(names)) + (i - (len(sizes) - 1) / 2) * width
        ax.bar(offsets, ratios, width, label=f"{n:,} params")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="update time / optax.adam", yscale="log", title="Optimizer update cost (jit, float32, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k parameters only; a minute or so")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write zoo.json and zoo.png here")
    args = parser.parse_args()
    sizes, repeats = ([10_000], 3) if args.quick else ([10_000, 100_000, 1_000_000], 7)
    result = {"benchmark": "zoo", "device": str(jax.devices()[0]), "quick": args.quick,
              "optimizers": optimizer_rows(sizes, repeats), "tasks": task_rows(repeats)}
    for r in result["optimizers"]:
        print(f"{r['optimizer']:>12} {r['parameters']:>9,}: {r['ms_per_update']:8.3f} ms "
              f"({r['ratio_to_adam']:6.1f}x adam), {r['state_bytes_per_parameter']:5.1f} B/param")
    for r in result["tasks"]:
        print(f"{r['family']:>15}: {1e3 * r['seconds_per_step']:8.3f} ms/step, {r['parameters']:,} params, "
              f"{r['achieved_gflops']:.2f} GFLOP/s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "zoo.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "zoo.png")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
