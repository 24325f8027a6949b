"""Time one jitted `small_fc` update against one jitted `optax.adam` update.

For 10k, 100k and 1M float32 parameters (four 2-D tensors), reports per size: median ms per
step for both (after warm-up, `block_until_ready`, Adam and small_fc timed alternately so
background load hits both), their ratio, optimizer-state bytes per parameter, the learned
optimizer's estimated FLOPs per parameter (MLP matmuls + elementwise feature work) and the
"compute floor" ratio: those FLOPs at the machine's measured dense-matmul rate, over Adam.

    python benchmarks/lopt_step.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import optimizers
from metaopt.optimizers import small_fc

_ELEMENTWISE_FLOPS = 150  # features, accumulators, normalisation, output: rough count


def make_params(n: int) -> dict[str, jax.Array]:
    """Four 2-D float32 tensors of total size ≈ n (within 1%)."""
    rows = max(1, int(math.sqrt(n / 4)))
    cols = max(1, round(n / 4 / rows))
    key = jax.random.key(0)
    return {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (rows, cols)) for i in range(4)}


def mlp_flops_per_param(opt) -> int:
    f_in = small_fc.NUM_FEATURES
    sizes = [f_in] + [opt.hidden] * opt.hidden_layers + [2]
    return sum(2 * a * b + 2 * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def matmul_gflops(repeats: int) -> float:
    """Achieved GFLOP/s of a cache-friendly (8192, 32) @ (32, 32) float32 matmul chain."""
    x = jnp.ones((64, 8192, 32), jnp.float32)
    w = jnp.full((32, 32), 0.01, jnp.float32)
    f = jax.jit(lambda x: jax.lax.map(lambda c: jax.nn.relu(c @ w) @ w, x))
    return 2 * 2 * x.size * 32 / _median_time(f, (x,), repeats) / 1e9


def _median_time(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_size(n: int, repeats: int) -> dict:
    params = make_params(n)
    n_real = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    opt = optimizers.make("small_fc")
    txs = {"adam": optax.adam(1e-3), "small_fc": opt.as_optax(opt.init(jax.random.key(1)), 1000)}
    fns, states = {}, {}
    for k, tx in txs.items():
        states[k] = tx.init(params)
        fns[k] = jax.jit(tx.update)
        jax.block_until_ready(fns[k](grads, states[k], params))  # compile + warm-up
    times = {k: [] for k in txs}
    for _ in range(repeats):  # alternate so transient load affects both alike
        for k in txs:
            times[k].append(_median_time(fns[k], (grads, states[k], params), 3))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    state_bytes = {
        k: sum(x.nbytes for x in jax.tree.leaves(s) if hasattr(x, "nbytes")) / n_real
        for k, s in states.items()
    }
    return {"n_params": n_real, "adam_ms": ms["adam"], "small_fc_ms": ms["small_fc"],
            "ratio": ms["small_fc"] / ms["adam"],
            "adam_state_bytes_per_param": state_bytes["adam"],
            "small_fc_state_bytes_per_param": state_bytes["small_fc"],
            "small_fc_flops_per_param": mlp_flops_per_param(opt) + _ELEMENTWISE_FLOPS}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    labels = [f"{r['n_params']:,}" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - 0.2, [r["ratio"] for r in rows], 0.4, label="small_fc / adam (measured)")
    ax.bar(x + 0.2, [r["floor_ratio"] for r in rows], 0.4, label="compute floor / adam")
    ax.plot(x, [r["reference_ratio"] for r in rows], "k--o", label="learned_optimization (brief)")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("time per update relative to optax.adam")
    ax.set_title("jitted update time, float32, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_REFERENCE_RATIO = {10_000: 13.0, 100_000: 30.0, 1_000_000: 149.0}  # Adafactor-MLP, hidden 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (< 1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--out", help="directory for lopt_step.json and lopt_step.png")
    args = ap.parse_args()
    repeats = 5 if args.quick else 20
    gflops = matmul_gflops(3 if args.quick else 10)
    rows = []
    for n in (10_000, 100_000, 1_000_000):
        r = bench_size(n, repeats)
        r["floor_ms"] = r["small_fc_flops_per_param"] * r["n_params"] / gflops / 1e6
        r["floor_ratio"] = r["floor_ms"] / r["adam_ms"]
        r["reference_ratio"] = _REFERENCE_RATIO[n]
        rows.append(r)
    head = f"{'params':>10} {'adam ms':>8} {'lopt ms':>8} {'ratio':>6} {'floor':>6} "
    head += f"{'B/param adam':>12} {'B/param lopt':>12} {'FLOP/param':>10}"
    print(f"matmul rate: {gflops:.1f} GFLOP/s (floor = FLOPs at this rate)")
    print(head)
    for r in rows:
        print(f"{r['n_params']:>10,} {r['adam_ms']:>8.3f} {r['small_fc_ms']:>8.3f} "
              f"{r['ratio']:>6.1f} {r['floor_ratio']:>6.1f} "
              f"{r['adam_state_bytes_per_param']:>12.1f} "
              f"{r['small_fc_state_bytes_per_param']:>12.1f} {r['small_fc_flops_per_param']:>10}")
    result = {"matmul_gflops": gflops, "sizes": rows, "backend": jax.default_backend()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lopt_step.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot(rows, os.path.join(args.out, "lopt_step.png"))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
