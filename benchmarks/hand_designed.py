"""The `hand_designed` suite, ShrinkBench-style: every hand-designed optimizer of the zoo and a
reference optimizer on one fixed set of problems, with the same protocol, metrics and baselines
for all (Blalock et al. 2020 show how comparisons go wrong without them).

Per optimizer and task, from one `metaopt eval REF hand_designed` (each hand-designed optimizer
tuned by random search on the suite's tuning seed, then trained on its evaluation seeds): final
training loss and held-out loss (means over seeds; a diverged seed makes the run diverged, ranked
last). Measured here beside it: the time of one jitted training step (gradient, with the layer
statistics a curvature optimizer needs, and update) as a ratio to Adam's on the same task, timed
alternately in the same run (calls of 20 steps: the curvature optimizers' inversion interval), and
the optimizer state's bytes per parameter. Summary per optimizer:
tasks it can train, tasks it is best on, its mean rank over the tasks it trains, the median step
time ratio and state bytes. Writes hand_designed.json, hand_designed.md (the tables) and
hand_designed.png (ranks per task; rank against step time).

    python benchmarks/hand_designed.py [--ref reference@champion] [--registry examples/registry]
        [--baseline-cache DIR] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaopt import evaluation, inner, optimizers, task_zoo  # noqa: E402

REPEATS = 15  # timed rounds per task, every optimizer once per round
# Steps per timed call: one whole inversion interval of K-FAC, FOOF and MBF (20), so their costly
# steps count once in 20 as in training. A sparse task's rewiring (once in 100 steps) is not in it.
WINDOW = 20


def _runs(task_result: dict, ref: str) -> dict[str, dict]:
    """{optimizer: its run} of one task, the REF's under `ref`, refused baselines left out."""
    runs = {b: r for b, r in task_result["baselines"].items() if "refused" not in r}
    return {**runs, ref: task_result["ref"]}


def _loss(run: dict, key: str) -> float:
    value = run[key]
    return math.inf if value is None or run["diverged_seeds"] else value


def step_costs(task, who: dict[str, tuple], steps: int, repeats: int) -> dict[str, dict]:
    """{name: {"step_time_ratio", "state_bytes_per_param"}} for `who` = {name: (optimizer name,
    hparams, θ)}, each ratio to the "adam" entry's median step time, timed alternately."""
    params = task.init(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    keys = (jax.random.key(1), jax.random.key(2))
    programs, out = {}, {}
    for name, (opt_name, hparams, theta) in who.items():
        opt = optimizers.make(opt_name, **hparams)
        tx = opt.as_optax(theta, steps)
        carry = inner.init(task, tx, params)
        step = jax.jit(lambda c, k, opt=opt, tx=tx: jax.lax.scan(
            lambda c, i: inner.step(task, opt, tx, c, k, i, steps), c, jnp.arange(WINDOW))[0])
        jax.block_until_ready(step(carry, keys))
        programs[name] = (step, carry)
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry[1]))
        out[name] = {"state_bytes_per_param": state_bytes / n_params}
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (step, carry) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(step(carry, keys))
            times[name].append(time.perf_counter() - start)
    adam = statistics.median(times["adam"])
    for name in programs:
        out[name]["step_time_ratio"] = statistics.median(times[name]) / adam
    return out


def measure(ref: str, registry: str | None, suite, baseline_cache, repeats: int) -> dict:
    result = evaluation.evaluate(ref, suite, registry=registry, baseline_cache=baseline_cache)
    resolved = evaluation.resolve_ref(ref, registry)
    label = f"{ref} (REF)"
    tasks = []
    for st, t in zip(suite.tasks, result["tasks"], strict=True):
        runs = _runs(t, label)
        who = {b: (b, r["hparams"], {}) for b, r in t["baselines"].items() if "refused" not in r}
        who[label] = (resolved.optimizer_name, resolved.hparams, resolved.theta)
        costs = step_costs(task_zoo.task(st.spec), who, st.steps, repeats)
        order = sorted(runs, key=lambda n: _loss(runs[n], "final_train_loss"))
        tasks.append({
            "name": t["name"], "steps": t["steps"],
            "refused": {b: r["refused"] for b, r in t["baselines"].items() if "refused" in r},
            "optimizers": {n: {"final_train_loss": runs[n]["final_train_loss"],
                               "final_test_loss": runs[n]["final_test_loss"],
                               "diverged_seeds": runs[n]["diverged_seeds"],
                               "hparams": runs[n].get("hparams"), "rank": order.index(n) + 1, **costs[n]}
                           for n in runs},
        })
    names = [*result["baselines"], label]
    summary = {}
    for n in names:
        ran = [t["optimizers"][n] for t in tasks if n in t["optimizers"]]
        summary[n] = {
            "tasks": len(ran),
            "best_on": sum(r["rank"] == 1 for r in ran),
            "mean_rank": statistics.mean(r["rank"] for r in ran) if ran else None,
            "diverged_runs": sum(r["diverged_seeds"] > 0 for r in ran),
            "median_step_time_ratio": statistics.median(r["step_time_ratio"] for r in ran) if ran else None,
            "median_state_bytes_per_param": statistics.median(r["state_bytes_per_param"] for r in ran)
            if ran else None,
        }
    return {"benchmark": "hand_designed", "device": str(jax.devices()[0]), "ref": ref, "suite": suite.name,
            "seeds": result["seeds"], "tuning_seed": result["tuning_seed"], "trials": result["trials"],
            "optimizers": names, "tasks": tasks, "summary": summary, "eval_elapsed_s": result["elapsed_s"]}


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    names, tasks = result["optimizers"], result["tasks"]
    lines = [f"Suite `{result['suite']}`, seeds {result['seeds']}, random search of {result['trials']} "
             f"trials on seed {result['tuning_seed']}; REF = {result['ref']}.", "",
             "| optimizer | tasks trained | best on | mean rank | diverged runs | step time / Adam (median) "
             "| state bytes / param (median) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for n in sorted(names, key=lambda n: (result["summary"][n]["mean_rank"] or math.inf)):
        s = result["summary"][n]
        lines.append(f"| {n} | {s['tasks']}/{len(tasks)} | {s['best_on']} | {_fmt(s['mean_rank'], '.2f')} | "
                     f"{s['diverged_runs']} | {_fmt(s['median_step_time_ratio'], '.2f')}× | "
                     f"{_fmt(s['median_state_bytes_per_param'], '.3g')} |")
    for key, title in (("final_train_loss", "Final training loss"), ("final_test_loss", "Held-out loss")):
        lines += ["", f"{title} (mean over seeds; bold: the task's best; — : cannot train the task; "
                      "div: a seed diverged):", "",
                  "| optimizer | " + " | ".join(t["name"] for t in tasks) + " |",
                  "| --- |" + " --- |" * len(tasks)]
        for n in names:
            cells = []
            for t in tasks:
                run = t["optimizers"].get(n)
                if run is None:
                    cells.append("—")
                    continue
                best = min(_loss(r, key) for r in t["optimizers"].values())
                text = "div" if run["diverged_seeds"] else _fmt(run[key], ".4g")
                cells.append(f"**{text}**" if _loss(run, key) == best else text)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Step time / Adam's on each task (one jitted training step, median of alternate rounds):",
              "", "| optimizer | " + " | ".join(t["name"] for t in tasks) + " |",
              "| --- |" + " --- |" * len(tasks)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(t["optimizers"][n]["step_time_ratio"], ".2f") + "×"
                                              if n in t["optimizers"] else "—" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, tasks = result["optimizers"], result["tasks"]
    ranks = np.array([[t["optimizers"][n]["rank"] if n in t["optimizers"] else np.nan for t in tasks]
                      for n in names], float)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(16, 0.45 * len(names) + 3), width_ratios=(3, 2))
    image = ax.imshow(np.ma.masked_invalid(ranks), cmap="viridis_r", aspect="auto")
    ax.set_facecolor("0.85")  # grey: cannot train the task
    for i, j in zip(*np.where(np.isfinite(ranks)), strict=True):
        ax.text(j, i, int(ranks[i, j]), ha="center", va="center", fontsize=7,
                color="white" if ranks[i, j] < len(names) / 2 else "black")
    ax.set_xticks(range(len(tasks)), [t["name"] for t in tasks], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("rank by final training loss (1 = best; grey: cannot train the task)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    for i, n in enumerate(names):
        s = result["summary"][n]
        if s["mean_rank"] is None:
            continue
        ax2.scatter(s["median_step_time_ratio"], s["mean_rank"])
        ax2.annotate(f"{n} ({s['tasks']})", (s["median_step_time_ratio"], s["mean_rank"]), fontsize=7,
                     xytext=(3, 3 - 10 * (i % 2)), textcoords="offset points")  # alternate: ties stay legible
    ax2.set(xscale="log", xlabel="median step time / Adam's", ylabel="mean rank over the tasks it trains",
            title="quality against cost (in brackets: tasks trained)")
    ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_suite():
    """Two tasks of the suite (a dense and a sparse MLP) at 30 steps, three baselines, one seed."""
    suite = evaluation.load_suite("hand_designed")
    tasks = tuple(dataclasses.replace(t, steps=30) for t in suite.tasks
                  if t.name in ("mlp_2x192_swish", "sparse_mlp_2x256_90"))
    return dataclasses.replace(suite, tasks=tasks, seeds=(0,), baselines=("sgd", "adam", "kfac"), trials=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="reference@champion")
    parser.add_argument("--registry", default=str(ROOT / "examples" / "registry"))
    parser.add_argument("--baseline-cache", type=pathlib.Path, help="reuse tuned baselines kept here")
    parser.add_argument("--quick", action="store_true", help="2 tasks, 30 steps, 3 baselines; a minute")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--out", type=pathlib.Path, help="write hand_designed.{json,md,png} here")
    args = parser.parse_args()
    suite = quick_suite() if args.quick else evaluation.load_suite("hand_designed")
    result = measure(args.ref, args.registry, suite, args.baseline_cache, 3 if args.quick else REPEATS)
    result["quick"] = args.quick
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hand_designed.json").write_text(json.dumps(result, indent=1))
        (args.out / "hand_designed.md").write_text(markdown(result))
        plot(result, args.out / "hand_designed.png")
    else:
        print(markdown(result), file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
