"""Time one jitted `small_fc` update, and one of `nominal_mlp` in the newest reference recipe's
configuration (REFERENCE_RECIPE's hyperparameters), against one jitted `optax.adam` update.

For 10k, 100k and 1M float32 parameters (four 2-D tensors), reports per size: median ms per
step for both (after warm-up, `block_until_ready`, Adam and small_fc timed alternately so
background load hits both), their ratio, optimizer-state bytes per parameter, the learned
optimizer's estimated FLOPs per parameter (MLP matmuls + elementwise feature work), and the
"compute floor": the measured time of the bare MLP matmul chain alone (same θ, same
cache-sized chunks, features given as input) over Adam — what the update would cost if
computing features, normalising them and packing tensors were free. The implied matmul
rate (GFLOP/s) of that chain is reported too. This measures metaopt alone:
benchmarks/peers/run.py times google/learned_optimization's AdafacMLP and MLP optimizers on
the same sizes, alternately with metaopt's, in the same run.

    python benchmarks/lopt_step.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import optimizers
from metaopt.optimizers import small_fc

_ELEMENTWISE_FLOPS = 150  # features, accumulators, normalisation, output: rough count
REFERENCE_RECIPE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "nominal_mix_v9.yaml"


def reference_hparams() -> dict:
    """nominal_mlp's hyperparameters in the newest reference recipe."""
    from metaopt.jobspec import load_job_spec

    return dict(load_job_spec(REFERENCE_RECIPE).optimizer.hparams)


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


def bare_mlp(opt, theta, n: int):
    """(jitted fn, args): the small_fc MLP alone on n elements of precomputed features."""
    lay = small_fc._Layout([(n,)])  # the chunking small_fc itself uses for n elements
    shape = (lay.num_chunks, small_fc.NUM_FEATURES, lay.chunk)
    x = jax.random.normal(jax.random.key(2), shape)
    mlp = theta["mlp"]

    def f(mlp, x):
        out = jax.lax.map(lambda c: small_fc._mlp_apply(mlp, c, mlp["b0"]), x)
        return out[:, 0] * jnp.exp(out[:, 1])

    return jax.jit(f), (mlp, x)


def _median_time(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_size(n: int, repeats: int, nominal_hparams: dict) -> dict:
    params = make_params(n)
    n_real = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    opt = optimizers.make("small_fc")
    theta = opt.init(jax.random.key(1))
    nominal = optimizers.make("nominal_mlp", **nominal_hparams)
    txs = {"adam": optax.adam(1e-3), "small_fc": opt.as_optax(theta, 1000),
           "nominal_mlp": nominal.as_optax(nominal.init(jax.random.key(1)), 1000)}
    calls, states = {}, {}
    for k, tx in txs.items():
        states[k] = tx.init(params)
        calls[k] = (jax.jit(tx.update), (grads, states[k], params))
    calls["floor"] = bare_mlp(opt, theta, n_real)
    times = {k: [] for k in calls}
    for _ in range(repeats):  # alternate so transient load affects all alike
        for k, (f, a) in calls.items():
            times[k].append(_median_time(f, a, 3))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    mlp_flops = mlp_flops_per_param(opt)
    state_bytes = {
        k: sum(x.nbytes for x in jax.tree.leaves(s) if hasattr(x, "nbytes")) / n_real
        for k, s in states.items()
    }
    return {
        "n_params": n_real,
        "adam_ms": ms["adam"],
        "small_fc_ms": ms["small_fc"],
        "ratio": ms["small_fc"] / ms["adam"],
        "nominal_mlp_ms": ms["nominal_mlp"],
        "nominal_mlp_ratio": ms["nominal_mlp"] / ms["adam"],
        "nominal_mlp_state_bytes_per_param": state_bytes["nominal_mlp"],
        "adam_state_bytes_per_param": state_bytes["adam"],
        "small_fc_state_bytes_per_param": state_bytes["small_fc"],
        "small_fc_flops_per_param": mlp_flops + _ELEMENTWISE_FLOPS,
        "floor_ms": ms["floor"],
        "floor_ratio": ms["floor"] / ms["adam"],
        "mlp_gflops": mlp_flops * n_real / ms["floor"] / 1e6,
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    labels = [f"{r['n_params']:,}" for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - 0.2, [r["ratio"] for r in rows], 0.4, label="small_fc / adam (measured)")
    ax.bar(x + 0.2, [r["floor_ratio"] for r in rows], 0.4, label="bare MLP matmuls / adam (floor)")
    ax.plot(x, [_TARGET_RATIO[r["size"]] for r in rows], "g:s", label="target")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("time per update relative to optax.adam")
    ax.set_title("jitted update time, float32, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_TARGET_RATIO = {10_000: 4.0, 100_000: 10.0, 1_000_000: 50.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (< 1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--out", help="directory for lopt_step.json and lopt_step.png")
    args = ap.parse_args()
    repeats = 5 if args.quick else 20
    hparams = reference_hparams()
    rows = []
    for n in (10_000, 100_000, 1_000_000):
        r = bench_size(n, repeats, hparams)
        r["size"] = n
        r["target_ratio"] = _TARGET_RATIO[n]
        rows.append(r)
    head = f"{'params':>10} {'adam ms':>8} {'lopt ms':>8} {'ratio':>6} {'floor':>6} "
    head += f"{'B/param adam':>12} {'B/param lopt':>12} {'FLOP/param':>10} {'MLP GFLOP/s':>11}"
    head += f" {'nominal ms':>10} {'ratio':>6}"
    print(head)
    for r in rows:
        print(
            f"{r['n_params']:>10,} {r['adam_ms']:>8.3f} {r['small_fc_ms']:>8.3f} "
            f"{r['ratio']:>6.1f} {r['floor_ratio']:>6.1f} "
            f"{r['adam_state_bytes_per_param']:>12.1f} "
            f"{r['small_fc_state_bytes_per_param']:>12.1f} {r['small_fc_flops_per_param']:>10} "
            f"{r['mlp_gflops']:>11.0f} {r['nominal_mlp_ms']:>10.3f} {r['nominal_mlp_ratio']:>6.1f}"
        )
    result = {"sizes": rows, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
              "nominal_mlp_hparams": hparams}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lopt_step.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot(rows, os.path.join(args.out, "lopt_step.png"))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
