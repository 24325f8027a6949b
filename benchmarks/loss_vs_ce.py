"""A meta-learned classification loss against plain cross-entropy, on tasks it never saw.

Meta-trains examples/learned_loss.yaml (cross-entropy plus a learned per-class correction; the
meta-loss is the held-out cross-entropy of models trained on it with Adam, along whole 1,000-step
runs of MLPs on 8x8 digits) with `metaopt train` for `--minutes`. Then on 12 tasks none of it
trained on — 8 more of the family (other seeds) and 4 of a shifted one (width 128, depth 3) —
a model trains for a whole run with Adam (the same rate) on the learned loss and on cross-entropy,
from the same init and batches; the figures are each model's cross-entropy and accuracy on the
task's whole test split. Ratios learned / cross-entropy below 1 are wins for the learned loss.

    python benchmarks/loss_vs_ce.py [--minutes M] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: this checkout's benchmarks and metaopt

import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks.schedule_search import SHIFTED, meta_train  # noqa: E402
from metaopt import task_zoo  # noqa: E402
from metaopt.learnables import LearnedLoss  # noqa: E402


def train_and_test(task, loss, learning_rate: float, steps: int) -> dict:
    """Held-out cross-entropy and accuracy after `steps` Adam steps on `loss`."""
    tx = optax.adam(learning_rate)
    params = task.init(jax.random.key(0))

    def body(carry, key):
        params, state = carry
        batch = task.batch(key, "train")
        grads = jax.grad(lambda p: loss(task.logits(p, batch["x"]), batch["y"]))(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    keys = jax.random.split(jax.random.key(1), steps)
    (params, _), _ = jax.jit(lambda params: jax.lax.scan(body, (params, tx.init(params)), keys))(params)
    full = task.full("test")
    logits = task.logits(params, full["x"])
    ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, full["y"]).mean())
    return {"cross_entropy": ce if math.isfinite(ce) else math.inf,
            "accuracy": float((logits.argmax(-1) == full["y"]).mean())}


def measure(minutes: float, quick: bool) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        facts, spec, trained = meta_train("learned_loss", minutes, quick, out)
    steps, hparams = facts["horizon"], spec.meta_objective.hparams
    family = task_zoo.family(spec.tasks[0].family, **spec.tasks[0].kwargs)
    held_out = [(f"family-{i}", family.sample(jax.random.key(1000 + i))) for i in range(2 if quick else 8)]
    shifted = task_zoo.family("mlp", **SHIFTED)
    held_out += [(f"shifted-{i}", shifted.sample(jax.random.key(2000 + i))) for i in range(1 if quick else 4)]
    untrained = LearnedLoss(**hparams)
    losses = {"learned": trained.as_loss(),
              "cross_entropy": untrained.as_loss(untrained.init_theta(jax.random.key(0)))}
    rows = []
    for name, spec_i in held_out:
        task = task_zoo.task(spec_i)
        rows.append({"task": name, **{label: train_and_test(task, loss, hparams["learning_rate"], steps)
                                      for label, loss in losses.items()}})
    ratios = [r["learned"]["cross_entropy"] / r["cross_entropy"]["cross_entropy"] for r in rows]
    accuracy = [r["learned"]["accuracy"] - r["cross_entropy"]["accuracy"] for r in rows]
    return {"meta_training": facts, "held_out": rows,
            "learned_vs_cross_entropy": {"median_ratio": statistics.median(ratios), "tasks": len(rows),
                                         "wins": sum(r < 1 for r in ratios),
                                         "median_accuracy_gain": statistics.median(accuracy)},
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="meta-training time (default 15)")
    parser.add_argument("--quick", action="store_true", help="8 outer steps on 100-step runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write loss_vs_ce.json here")
    args = parser.parse_args()
    result = measure(args.minutes, args.quick)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loss_vs_ce.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
        return
    facts, s = result["meta_training"], result["learned_vs_cross_entropy"]
    print(f"meta-training: {facts['outer_steps']} outer steps, {facts['inner_steps']:,} inner steps in "
          f"{facts['minutes']:.1f} min")
    print(f"learned loss vs cross-entropy, held-out cross-entropy: median ratio {s['median_ratio']:.3f}, "
          f"wins {s['wins']}/{s['tasks']}; median accuracy gain {s['median_accuracy_gain']:+.4f}")


if __name__ == "__main__":
    main()
