"""What DMD features cost: one jitted `nominal_mlp` update in the newest reference recipe's
configuration, with `dmd_history` k (features from a dynamic mode decomposition of each tensor's
last k steps, `metaopt.optimizers.dmd`) and without, against one jitted `optax.adam` update.

For 10k, 100k and 1M float32 parameters (four 2-D tensors, as benchmarks/lopt_step.py), reports
the median ms per step of each, timed alternately so background load hits all alike, the ratio of
each to Adam, the DMD optimizer's over the one without, and optimizer-state bytes per parameter.
Then what meta-training pays: one PES truncation (the recipe's estimator: its particles, its
truncation length) on each MLP shape of the recipe's mix (widths 16, 48, 112; depths 1-3) and
its quadratics, with and without `dmd_history`, timed alternately; per shape the ratio, and the
ratio of the summed times (the mix samples its shapes alike).

    python benchmarks/dmd_step.py [--history 3 5 8] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run as a script: this checkout's

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks.lopt_step import REFERENCE_RECIPE, _median_time, make_params, reference_hparams  # noqa: E402
from metaopt import optimizers, task_zoo  # noqa: E402
from metaopt.jobspec import load_job_spec  # noqa: E402
from metaopt.workers.estimators import make_estimator  # noqa: E402
from metaopt.workers.objective import LearnedOptimizer  # noqa: E402


def bench_size(n: int, histories: list[int], repeats: int, hparams: dict) -> dict:
    params = make_params(n)
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    variants = {"adam": optax.adam(1e-3)}
    for k in [0, *histories]:
        opt = optimizers.make("nominal_mlp", **{**hparams, "dmd_history": k})
        variants[f"dmd_{k}" if k else "nominal_mlp"] = opt.as_optax(opt.init(jax.random.key(1)), 1000)
    calls, state_bytes = {}, {}
    n_real = sum(x.size for x in jax.tree.leaves(params))
    for name, tx in variants.items():
        state = tx.init(params)
        state_bytes[name] = sum(x.nbytes for x in jax.tree.leaves(state)) / n_real
        calls[name] = (jax.jit(tx.update), (grads, state, params))
    times = {name: [] for name in calls}
    for _ in range(repeats):  # alternate so transient load affects all alike
        for name, (f, a) in calls.items():
            times[name].append(_median_time(f, a, 3))
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    return {"n_params": n_real, "ms": ms, "state_bytes_per_param": state_bytes,
            "ratio_to_adam": {name: ms[name] / ms["adam"] for name in ms if name != "adam"},
            "dmd_over_without": {f"dmd_{k}": ms[f"dmd_{k}"] / ms["nominal_mlp"] for k in histories}}


def recipe_shapes(quick: bool) -> list[task_zoo.TaskSpec]:
    """One task of each MLP shape and quadratic dimension the newest recipe's mix draws."""
    mix = {t.family: t.kwargs for t in load_job_spec(REFERENCE_RECIPE).tasks}
    mlp, quad = mix["mlp"], mix["quadratic"]
    shapes = [task_zoo.TaskSpec("mlp", {"width": w, "depth": d, "activation": "relu",
                                        "batch_size": mlp["batch_sizes"][0], "seed": 1})
              for w in mlp["widths"] for d in mlp["depths"]]
    shapes += [task_zoo.TaskSpec("quadratic", {"dim": n, "log10_condition": 2.0, "noise": 0.1, "seed": 1})
               for n in quad["dims"]]
    return shapes[:: 4] if quick else shapes


def bench_truncations(history: int, repeats: int, hparams: dict, quick: bool) -> list[dict]:
    """ms per PES truncation of the recipe's estimator on each shape, without and with DMD."""
    estimator_spec = load_job_spec(REFERENCE_RECIPE).estimator.model_dump()
    rows = []
    for spec in recipe_shapes(quick):
        task = task_zoo.task(spec)
        calls = {}
        for name, k in (("without", 0), ("dmd", history)):
            opt = optimizers.make("nominal_mlp", **{**hparams, "dmd_history": k})
            objective = LearnedOptimizer(opt).objective(task, estimator_spec["inner_horizon"])
            estimator = make_estimator(**estimator_spec)
            theta = opt.init(jax.random.key(0))
            state = estimator.init(jax.random.key(1), theta, objective)

            def one(state=state, estimator=estimator, theta=theta, objective=objective):
                return estimator.estimate(jax.random.key(2), theta, jax.tree.map(lambda x: x.copy(), state),
                                          objective)[1]

            calls[name] = one
        times = {name: [] for name in calls}
        for _ in range(repeats):
            for name, f in calls.items():
                times[name].append(_median_time(f, (), 3))
        ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
        rows.append({"task": spec.to_json(), "ms": ms, "ratio": ms["dmd"] / ms["without"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, nargs="+", default=[3, 5, 8], help="the k values to time")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (< 1 min)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--out", help="directory for dmd_step.json")
    args = ap.parse_args()
    hparams = reference_hparams()
    sizes = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
    rows = [bench_size(n, args.history, 3 if args.quick else 15, hparams) for n in sizes]
    ks = args.history
    print(f"{'params':>10} {'adam ms':>8} {'nominal ms':>10} " + " ".join(f"{f'k={k} ms':>8}" for k in ks)
          + "  " + " ".join(f"{f'k={k}/without':>11}" for k in ks))
    for r in rows:
        ms = r["ms"]
        print(f"{r['n_params']:>10,} {ms['adam']:>8.3f} {ms['nominal_mlp']:>10.3f} "
              + " ".join(f"{ms[f'dmd_{k}']:>8.3f}" for k in args.history) + "  "
              + " ".join(f"{r['dmd_over_without'][f'dmd_{k}']:>11.2f}" for k in args.history))
    k = max(args.history) if 5 not in args.history else 5
    truncations = bench_truncations(k, 2 if args.quick else 7, hparams, args.quick)
    print(f"\nPES truncation of the recipe ({k} steps of history): ms without, with DMD, ratio")
    for r in truncations:
        print(f"{r['task']:<100} {r['ms']['without']:>8.2f} {r['ms']['dmd']:>8.2f} {r['ratio']:>6.2f}")
    total = sum(r["ms"]["dmd"] for r in truncations) / sum(r["ms"]["without"] for r in truncations)
    print(f"the mix's shapes together: {total:.2f}x")
    result = {"sizes": rows, "histories": args.history, "nominal_mlp_hparams": hparams,
              "truncation_history": k, "truncations": truncations, "truncation_ratio_of_sums": total,
              "backend": jax.default_backend(), "cpu_count": os.cpu_count()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "dmd_step.json"), "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
