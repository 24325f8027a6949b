"""Trace one run of `nominal_mlp` variants on one task of a suite: the training loss along the run,
every tensor's hypergradient rate log α_T and, with `rate_estimate`, Prodigy's estimated rate d_t,
to see *why* a design choice helps or hurts
(benchmarks/design_screen.py says *whether*). Untrained (θ₀, so the anchor alone); a variant
{"adam": LR} runs optax.adam at that constant rate beside them.

    python benchmarks/rate_trace.py SUITE TASK '{"name": {hparams}}' [--steps N] [--seed S]
        [--per-tensor] [--json]

Prints, per variant, the loss (a 21-step mean) at 11 points of the run and the mean of the last
50 steps, log α_T's mean/min/max over tensors at 5 points, and d_t at the 11 points; with
--per-tensor, each tensor's log α_T at a fifth, half and the end of the run. With --json the
last line is {"suite", "task", "steps", "seed", "variants": {name: {"hparams", "loss_points",
"final_loss", "log_rates": {tensor: [at a fifth, half, end]}, "estimate_points": [d_t at the 11
points, or empty]}}}.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import evaluation, optimizers, task_zoo

FINAL_WINDOW = 50  # steps averaged for the final loss
POINT_WINDOW = 21  # steps averaged around each of the 11 loss points


def trace(task, hparams: dict, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss per step, (steps, tensors) log α_T per step, zero columns when the variant has none;
    d_t per step, zeros without `rate_estimate`)."""
    if "adam" in hparams:
        tx = optax.adam(hparams["adam"])
    else:
        opt = optimizers.make("nominal_mlp", **hparams)
        tx = opt.as_optax(opt.init(jax.random.key(0)), steps)

    def run(key):
        k_init, k_steps = jax.random.split(key)
        params = task.init(k_init)

        def body(carry, k):
            p, state = carry
            k_batch, k_loss = jax.random.split(k)
            loss, grads = jax.value_and_grad(task.loss)(p, k_loss, task.batch(k_batch, task_zoo.TRAIN))
            updates, state = tx.update(grads, state, p, loss=loss)
            rates = getattr(state, "log_rate", ())
            rates = jnp.stack(rates) if rates else jnp.zeros(len(jax.tree.leaves(p)))
            estimate = getattr(state, "estimate", ())
            d = estimate.d if estimate else jnp.float32(0.0)
            return (optax.apply_updates(p, updates), state), (loss, rates, d)

        _, out = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(k_steps, steps))
        return out

    loss, rates, d = jax.jit(run)(jax.random.key(seed))
    return np.asarray(loss), np.asarray(rates), np.asarray(d)


def summary(task, hparams: dict, steps: int, seed: int) -> tuple[dict, np.ndarray]:
    """(the variant's JSON record, its log α_T per step and tensor)."""
    loss, rates, d = trace(task, hparams, steps, seed)
    points = [int(i) for i in np.linspace(0, steps - 1, 11)]
    names = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_leaves_with_path(task.init(jax.random.key(0)))]
    at = [steps // 5, steps // 2, steps - 1]
    return {"hparams": hparams,
            "loss_points": [float(np.mean(loss[max(0, i - POINT_WINDOW + 1):i + 1])) for i in points],
            "final_loss": float(np.mean(loss[-FINAL_WINDOW:])),
            "log_rates": {name: [float(rates[i, j]) for i in at] for j, name in enumerate(names)},
            "estimate_points": [float(d[i]) for i in points] if hparams.get("rate_estimate", 0) > 0 else []
            }, rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", help="a suite name or a suite YAML file")
    ap.add_argument("task", help="the name of one of the suite's tasks")
    ap.add_argument("variants", help='JSON: {"name": {nominal_mlp hparams} or {"adam": LR}, ...}')
    ap.add_argument("--steps", type=int, default=None, help="default: the task's own budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-tensor", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        variants = json.loads(args.variants)
    except json.JSONDecodeError as e:
        raise SystemExit(f"the variants are not JSON ({e}); write "
                         f"'{{\"v7\": {{\"warmup\": 0.2}}}}'") from None
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise SystemExit("the variants must be a JSON object of named hyperparameter objects: "
                         '{"name": {...}}')
    suite = evaluation.load_suite(args.suite)
    by_name = {t.name: t for t in suite.tasks}
    if args.task not in by_name:
        raise SystemExit(f"no task {args.task!r} in {suite.name}; it has {sorted(by_name)}")
    steps = args.steps or by_name[args.task].steps
    if steps < 10:
        raise SystemExit(f"--steps needs at least 10, got {steps}")
    task = task_zoo.task(by_name[args.task].spec)
    out = sys.stderr if args.json else sys.stdout
    report = {}
    for name, hparams in variants.items():
        row, rates = summary(task, hparams, steps, args.seed)
        report[name] = row
        losses = " ".join(f"{x:.3g}" for x in row["loss_points"])
        print(f"{name} loss {losses} | last {FINAL_WINDOW}: {row['final_loss']:.4g}", file=out)
        if hparams.get("rate_adaptation", 0) > 0:
            cells = " ".join(f"{rates[i].mean():+.1f}/{rates[i].min():+.1f}/{rates[i].max():+.1f}"
                             for i in np.linspace(0, steps - 1, 11).astype(int)[1::2])
            print(f"{name} log α_T mean/min/max {cells}", file=out)
            if args.per_tensor:
                for tensor, values in row["log_rates"].items():
                    print(f"   {tensor:48s} " + " ".join(f"{v:+.2f}" for v in values), file=out)
        if row["estimate_points"]:
            points = " ".join(f"{x:.3g}" for x in row["estimate_points"])
            print(f"{name} estimated rate d_t {points}", file=out)
        out.flush()
    if args.json:
        print(json.dumps({"suite": suite.name, "task": args.task, "steps": steps, "seed": args.seed,
                          "variants": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
