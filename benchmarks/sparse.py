"""Sparse training (task_zoo/sparse.py): accuracy at 80%, 90% and 95% sparsity against the dense
network, and the truly sparse (BCOO) storage's memory and step time as ratios to the masked one.

Accuracy: for each family (an MLP and a CNN on 8x8 digits), the dense network (sparsity 0, every
weight present, no rewiring) and each sparsity with RigL and without it (the initial random
topology throughout), Adam's learning rate tuned by random search on a tuning seed apart from the
evaluation seeds; then held-out accuracy (the whole test split) and final training loss, mean ± std
over the seeds. A diverged seed counts as accuracy 0.

Storage: one jitted training step (loss, gradient, Adam update) of a wide sparse MLP at several
sparsities, masked and BCOO alternately in the same run; step time (median of repeats) and the
compiled program's memory (XLA's buffer assignment: arguments, outputs and temporaries, which
hold the masked weight's dense matrix and gradient, or the BCOO product's per-weight terms) as
ratios BCOO / masked.

    python benchmarks/sparse.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaopt import inner, optimizers, task_zoo  # noqa: E402
from metaopt.tuning import random_search  # noqa: E402

SPARSITIES = (0.8, 0.9, 0.95)
FAMILIES = {
    "sparse_mlp": {"width": 256, "depth": 2, "activation": "relu", "batch_size": 64, "seed": 7},
    "sparse_cnn": {"channels": 32, "depth": 2, "activation": "relu", "batch_size": 64, "seed": 7},
}
TUNING_SEED = 1000


def spec(family: str, sparsity: float, rigl: bool, **extra) -> task_zoo.TaskSpec:
    kwargs = {**FAMILIES[family], "sparsity": sparsity, **extra}
    if not rigl:
        kwargs["rewire_every"] = 0
    return task_zoo.TaskSpec(family, kwargs)


def train_and_test(task, learning_rate: float, steps: int, seeds: list[int]) -> dict:
    """Adam at `learning_rate` on every seed: held-out accuracy after the last step, final train
    loss (mean of the last 10% of steps)."""
    opt = optimizers.make("adam", learning_rate=learning_rate)
    tx = opt.as_optax({}, steps)

    def one(key):
        k_init, k_steps = jax.random.split(key)

        def body(carry, xs):
            i, k = xs
            return inner.step(task, opt, tx, carry, tuple(jax.random.split(k)), i, steps)

        keys = jax.random.split(k_steps, steps)
        carry, losses = jax.lax.scan(body, inner.init(task, tx, task.init(k_init)), (jnp.arange(steps), keys))
        final = inner.current(task, carry)
        return final.accuracy(carry[0], final.full(task_zoo.TEST)), losses

    acc, losses = jax.jit(jax.vmap(one))(jnp.stack([jax.random.key(s) for s in seeds]))
    acc, losses = np.asarray(acc, np.float64), np.asarray(losses, np.float64)
    finite = np.all(np.isfinite(losses), axis=1)
    acc = np.where(finite, acc, 0.0)  # a diverged run is a loss, not a missing value
    final = losses[:, -max(1, steps // 10):].mean(axis=1)
    return {"accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
            "final_train_loss": float(np.mean(final)), "diverged_seeds": int((~finite).sum())}


def accuracy_rows(steps: int, trials: int, seeds: list[int], families: list[str]) -> list[dict]:
    rows = []
    configs = [(f, 0.0, False) for f in families]
    configs += [(f, s, rigl) for f in families for s in SPARSITIES for rigl in (True, False)]
    for family, sparsity, rigl in configs:
        started = time.time()
        task = task_zoo.task(spec(family, sparsity, rigl))
        tuned = random_search(jax.random.key(TUNING_SEED), "adam", task, steps, trials,
                              seed_key=jax.random.key(TUNING_SEED + 1))
        lr = tuned.best_hparams["learning_rate"]
        row = {"family": family, "sparsity": sparsity, "rigl": rigl and sparsity > 0,
               "weights": int(sum(task.topology[n].size for n, _, _ in task.layers)),
               "dense_weights": int(sum(i * o for _, i, o in task.layers)), "learning_rate": lr,
               **train_and_test(task, lr, steps, seeds)}
        row["seconds"] = round(time.time() - started, 1)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def storage_rows(width: int, sparsities: tuple[float, ...], repeats: int) -> list[dict]:
    rows = []
    base = {"width": width, "depth": 2, "activation": "relu", "batch_size": 128, "seed": 3}
    for sparsity in sparsities:
        steps, memory = {}, {}
        for storage in ("masked", "bcoo"):
            task = task_zoo.task(task_zoo.TaskSpec("sparse_mlp", {**base, "sparsity": sparsity,
                                                                  "storage": storage, "rewire_every": 0}))
            opt = optimizers.make("adam")
            tx = opt.as_optax({}, 100)
            carry = inner.init(task, tx, task.init(jax.random.key(0)))
            keys = (jax.random.key(1), jax.random.key(2))
            step = jax.jit(lambda c, k, task=task, tx=tx, opt=opt: inner.step(task, opt, tx, c, k, 0, 100))
            compiled = step.lower(carry, keys).compile()
            stats = compiled.memory_analysis()  # (its peak_memory_in_bytes leaves temporaries out on CPU)
            memory[storage] = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
            jax.block_until_ready(compiled(carry, keys))
            steps[storage] = (compiled, carry, keys)
        times = {"masked": [], "bcoo": []}
        for _ in range(repeats):  # alternately, so a transient load hits both
            for storage, (compiled, carry, keys) in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled(carry, keys))
                times[storage].append(time.perf_counter() - start)
        masked_s, bcoo_s = np.median(times["masked"]), np.median(times["bcoo"])
        weights = int(sum(task.topology[n].size for n, _, _ in task.layers))
        rows.append({"width": width, "sparsity": sparsity, "weights": weights,
                     "step_time_ratio": float(bcoo_s / masked_s),
                     "memory_ratio": memory["bcoo"] / memory["masked"], "bytes": memory})
    return rows


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in result["accuracy"]})
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(5 * (len(families) + 1), 4))
    for ax, family in zip(axes, families, strict=False):
        rows = [r for r in result["accuracy"] if r["family"] == family]
        dense = next(r for r in rows if r["sparsity"] == 0)
        ax.axhline(dense["accuracy"], color="black", lw=1,
                   label=f"dense ({dense['dense_weights']:,} weights)")
        for rigl, style in ((True, "o-"), (False, "s--")):
            pts = [r for r in rows if r["sparsity"] > 0 and r["rigl"] == rigl]
            ax.errorbar([100 * r["sparsity"] for r in pts], [r["accuracy"] for r in pts],
                        [r["accuracy_std"] for r in pts], fmt=style, capsize=3,
                        label="RigL" if rigl else "static topology")
        ax.set(xlabel="sparsity (%)", ylabel="held-out accuracy", title=f"{family}, Adam tuned per row")
        ax.legend(fontsize=8)
    ax = axes[-1]
    rows = result["storage"]
    x = [100 * r["sparsity"] for r in rows]
    ax.plot(x, [r["step_time_ratio"] for r in rows], "o-", label="step time")
    ax.plot(x, [r["memory_ratio"] for r in rows], "s-", label="memory (XLA buffers)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(xlabel="sparsity (%)", ylabel="BCOO / masked", yscale="log",
           title=f"sparse_mlp 2x{rows[0]['width']}: truly sparse vs masked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_std(row: dict) -> str:
    return f"{row['accuracy']:.3f} ± {row['accuracy_std']:.3f}"


def markdown(result: dict) -> str:
    """The two tables of docs/baselines.md: accuracy per family and sparsity, storage ratios."""
    lines = [f"Held-out accuracy, mean ± std over seeds {result['seeds']} ({result['steps']} steps of Adam, "
             f"its rate tuned per row on seed {result['tuning_seed']}):", "",
             "| family | sparsity | weights | RigL | static topology |", "| --- | --- | --- | --- | --- |"]
    rows = result["accuracy"]
    for r in rows:
        if r["sparsity"] == 0:
            lines.append(f"| {r['family']} | dense | {r['weights']:,} | {_mean_std(r)} | |")
        elif r["rigl"]:
            static = next(s for s in rows if s["family"] == r["family"] and s["sparsity"] == r["sparsity"]
                          and not s["rigl"])
            lines.append(f"| {r['family']} | {r['sparsity']:.0%} | {r['weights']:,} | {_mean_std(r)} | "
                         f"{_mean_std(static)} |")
    lines += ["", "Truly sparse (BCOO) storage as a ratio to masked, one training step of a 2-layer MLP of "
              f"width {result['storage'][0]['width']}, batch 128:", "",
              "| sparsity | weights | step time BCOO / masked | memory BCOO / masked "
              "| memory masked, BCOO (MB) |", "| --- | --- | --- | --- | --- |"]
    for r in result["storage"]:
        masked, bcoo = r["bytes"]["masked"] / 1e6, r["bytes"]["bcoo"] / 1e6
        lines.append(f"| {r['sparsity']:.0%} | {r['weights']:,} | {r['step_time_ratio']:.2f}× | "
                     f"{r['memory_ratio']:.2f}× | {masked:.1f}, {bcoo:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP, few steps and trials; a minute")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--out", type=pathlib.Path, help="write sparse.{json,md,png} here")
    args = parser.parse_args()
    if args.quick:
        steps, trials, seeds, families = 100, 2, [0], ["sparse_mlp"]
        width, sparsities, repeats = 256, (0.9,), 3
    else:
        steps, trials, seeds, families = 2000, 8, [0, 1, 2], list(FAMILIES)
        width, sparsities, repeats = 2048, (0.8, 0.9, 0.95, 0.99), 15
    result = {"benchmark": "sparse", "device": str(jax.devices()[0]), "quick": args.quick, "steps": steps,
              "trials": trials, "seeds": seeds, "tuning_seed": TUNING_SEED,
              "accuracy": accuracy_rows(steps, trials, seeds, families),
              "storage": storage_rows(width, sparsities, repeats)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sparse.json").write_text(json.dumps(result, indent=2))
        (args.out / "sparse.md").write_text(markdown(result))
        plot(result, args.out / "sparse.png")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
