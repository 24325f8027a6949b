"""What a G.pt-style model of updates does (metaopt/update_model.py): trained on a dataset of
training runs, it is prompted with networks of the dataset's task from initialisations it never
saw and a target loss; the training loss it reaches in one update, against the loss Adam (its
rate tuned on another initialisation) reaches in n steps from the same starts.

    python benchmarks/update_model.py DATASET [--steps 3000] [--hidden 512] [--inits 8] [--samples 8]
        [--json] [--out DIR]

DATASET is an exported dataset or a job's recording (`metaopt dataset`), of one architecture.
The prompt's target is the median training loss of the dataset's runs at their last recorded
step. Losses are measured on the same 4 training batches for every optimizer; the held-out loss
(on 2 test batches) is reported beside. Reports, per initialisation and on average: the loss
at the start, after the model's update (mean over `--samples` draws, and the best draw), and
Adam's after n = 1, 2, 5, ... 1000 steps, with the fewest steps at which Adam's mean loss is at
or below the model's.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run as a script: this checkout's

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from metaopt import datasets, storage, task_zoo, update_model  # noqa: E402
from metaopt.evaluation import held_out_loss  # noqa: E402
from metaopt.task_zoo.base import TRAIN  # noqa: E402

ADAM_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
ADAM_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
EVAL_KEY = 10**6  # initialisations are drawn from here on: no worker's episode key folds to these


def train_loss(task, params, batches) -> jax.Array:
    """The mean training loss over `batches` (the same for every optimizer)."""
    return jnp.mean(jnp.stack([task.loss(params, jax.random.key(i), b) for i, b in enumerate(batches)]))


@jax.jit
def losses(task, params, batches):
    """(training loss over `batches`, held-out loss) at `params`."""
    return train_loss(task, params, batches), held_out_loss(task, params, jax.random.key(99))


@jax.jit
def adam_curve(task, params, rate, key, batches) -> jax.Array:
    """Adam's training loss after each n in ADAM_STEPS, on fresh minibatches from `key`: one scan
    of ADAM_STEPS[-1] steps at Adam(1) times `rate` (the same updates as Adam(rate)), so one
    compiled program serves every rate."""
    tx, marks = optax.adam(1.0), jnp.asarray(ADAM_STEPS)

    def body(carry, i):
        p, s = carry
        k = jax.random.fold_in(key, i)
        grads = jax.grad(task.loss)(p, jax.random.fold_in(k, 1), task.batch(k, TRAIN))
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, jax.tree.map(lambda u: rate * u, updates))
        loss = jax.lax.cond(jnp.any(marks == i + 1), lambda: train_loss(task, p, batches), lambda: jnp.nan)
        return (p, s), loss

    _, out = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(ADAM_STEPS[-1]))
    return out[marks - 1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--steps", type=int, default=3000, help="training minibatches of the model")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inits", type=int, default=8, help="unseen initialisations to prompt")
    ap.add_argument("--samples", type=int, default=8, help="draws of the model per initialisation")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    records = list(datasets.records(args.dataset))
    specs = collections.Counter(json.dumps(r.meta["task"], sort_keys=True) for r in records)
    spec = json.loads(specs.most_common(1)[0][0])
    task = task_zoo.task(task_zoo.TaskSpec(spec["name"], spec["kwargs"]))
    last = {}
    for r in records:
        if r.meta["step"] >= last.get(r.meta["run"], (-1, 0))[0]:
            last[r.meta["run"]] = (r.meta["step"], r.meta["loss"])
    target = statistics.median(loss for _, loss in last.values())
    data = update_model.pairs(records)
    model, history = update_model.fit(data, args.steps, jax.random.key(0), hidden=args.hidden)
    print(f"model: {len(records)} records, {data.theta.shape[0]} pairs, {data.theta.shape[1]} parameters; "
          f"noise loss {history[:50].mean():.3f} -> {history[-50:].mean():.3f}", file=sys.stderr)

    batches = [task.batch(jax.random.key(1000 + i), TRAIN) for i in range(4)]
    tune_init = task.init(jax.random.key(EVAL_KEY - 1))
    tuned = {lr: float(adam_curve(task, tune_init, lr, jax.random.key(5), batches)[-1]) for lr in ADAM_RATES}
    rate = min(tuned, key=tuned.get)
    rows = []
    for i in range(args.inits):
        params = task.init(jax.random.key(EVAL_KEY + i))
        start, start_held = (float(x) for x in losses(task, params, batches))
        flat = storage.flatten_tree(params)
        proposals = model.propose(flat, start, target, jax.random.key(i), samples=args.samples)
        reached = [[float(x) for x in losses(task, storage.unflatten_tree(p), batches)] for p in proposals]
        rows.append({"init": EVAL_KEY + i, "start": start, "start_held_out": start_held,
                     "model": statistics.mean(r[0] for r in reached),
                     "model_best": min(r[0] for r in reached),
                     "model_held_out": statistics.mean(r[1] for r in reached),
                     "adam": adam_curve(task, params, rate, jax.random.key(100 + i), batches).tolist()})
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    adam = [statistics.mean(r["adam"][j] for r in rows) for j in range(len(ADAM_STEPS))]
    model_loss = mean("model")
    matched = next((n for n, a in zip(ADAM_STEPS, adam, strict=True) if a <= model_loss), None)
    summary = {"dataset": args.dataset, "task": spec, "records": len(records),
               "pairs": int(data.theta.shape[0]), "parameters": int(data.theta.shape[1]),
               "model_steps": args.steps, "hidden": args.hidden,
               "noise_loss": [float(history[:50].mean()), float(history[-50:].mean())],
               "target": target, "adam_rate": rate, "adam_steps": list(ADAM_STEPS),
               "start": mean("start"), "model": model_loss, "model_best": mean("model_best"),
               "model_held_out": mean("model_held_out"), "adam": adam, "adam_steps_to_match": matched,
               "inits": rows}
    print(f"start {summary['start']:.4g}  one update of the model {model_loss:.4g} (best of {args.samples}: "
          f"{summary['model_best']:.4g}; target {target:.4g})  Adam at {rate}: "
          + ", ".join(f"{n}: {a:.4g}" for n, a in zip(ADAM_STEPS, adam, strict=True))
          + f"  -> Adam matches it in {matched} steps")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "update_model.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
