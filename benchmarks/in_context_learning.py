"""An in-context learner (GPICL) against logistic regression fitted to the same context, and what
the number of meta-training tasks does to it.

For each number of generated training tasks in the sweep (1 ... unbounded), meta-trains
examples/in_context_learner.yaml with `metaopt train` for `--steps` outer steps, the same for
every run (a Transformer; workers compute the meta-gradient by backprop and the learner
aggregates it). Then, on the digits' *test*
split, it classifies queries from k labelled examples in its context, nothing fitted:
- on meta-test tasks (ids >= 2**30: projections and label permutations no run trained on), the
  accuracy on 32 queries of each of 128 sequences, for each k; logistic regression fits the same k
  examples and predicts the same queries (its C picked per k from a grid on training-range tasks
  of the train split, never on meta-test tasks);
- on tasks of the run's own training range (memorised tasks, if any), the same accuracies; k = 0
  (no context) is above chance only for a learner that recognises a task it memorised.
A learner that generalises is as accurate on meta-test tasks as on its training tasks; one that
memorises is accurate on its training tasks only (Kirsch et al. 2022, figure 3).

    python benchmarks/in_context_learning.py [--steps N] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: this checkout's benchmarks and metaopt

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.schedule_search import meta_train  # noqa: E402
from metaopt import task_zoo  # noqa: E402
from metaopt.jobspec import load_job_spec  # noqa: E402
from metaopt.learnables.in_context import TEST_IDS, InContextLearner, standardised  # noqa: E402

SWEEP = (1, 16, 256, 4096, 0)  # numbers of training tasks; 0: unbounded
SIZES = (0, 1, 2, 4, 8, 16, 32, 64)  # context examples
QUERIES = 32  # per sequence
SEQUENCES = 128  # per evaluation
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def sequences(learner: InContextLearner, data: dict, ids, seed: int):
    """(x (S, 64 + QUERIES, F), y) of one sequence per task id, distinct examples of `data`."""
    keys = jax.random.split(jax.random.key(seed), len(ids))
    x, y = jax.vmap(lambda i, k: learner.sequence(data, i, k, max(SIZES) + QUERIES))(jnp.asarray(ids), keys)
    return np.asarray(x), np.asarray(y)


def learner_accuracy(predict, x, y) -> dict[int, float]:
    """Accuracy on the queries (the last QUERIES examples) from the first k examples, per k."""
    out = {}
    for k in SIZES:
        logits = jax.vmap(predict)(x[:, :k], y[:, :k], x[:, -QUERIES:])
        out[k] = float((np.asarray(logits).argmax(-1) == y[:, -QUERIES:]).mean())
    return out


def logistic_accuracy(x, y, k: int, c: float) -> float:
    """Logistic regression (C = c) fitted to each sequence's first k examples, on its queries."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    hits = []
    for xs, ys in zip(x, y, strict=True):
        if len(set(ys[:k])) < 2:  # one class seen: that class is the prediction
            hits.append(ys[-QUERIES:] == ys[0])
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=500).fit(xs[:k], ys[:k])
        hits.append(model.predict(xs[-QUERIES:]) == ys[-QUERIES:])
    return float(np.mean(hits))


def logistic_baseline(learner: InContextLearner, train: dict, meta_test: tuple, n: int) -> dict:
    """Per k >= 1: C picked on training-range tasks of the train split, accuracy on the meta-test
    sequences the learners are scored on."""
    pick_x, pick_y = sequences(learner, train, np.arange(n // 4) * 7919, seed=1)
    out = {}
    for k in SIZES[1:]:
        c = max(C_GRID, key=lambda c: logistic_accuracy(pick_x, pick_y, k, c))
        out[k] = {"C": c, "accuracy": logistic_accuracy(*meta_test, k, c)}
    return out


def measure(steps: int, quick: bool) -> dict:
    started = time.perf_counter()
    trained = {}  # every run first: Ray forks its processes, which is unsafe once JAX runs here
    for num_tasks in (1, 0) if quick else SWEEP:
        with tempfile.TemporaryDirectory() as out:
            trained[num_tasks] = meta_train("in_context_learner", 24 * 60, quick, out,
                                            {"meta_objective.hparams.num_tasks": num_tasks,
                                             "stop.max_outer_steps": 8 if quick else steps})
    n = 8 if quick else SEQUENCES
    spec = load_job_spec(ROOT / "examples" / "in_context_learner.yaml")
    learner = InContextLearner(**spec.meta_objective.hparams)  # its tasks' shape, as every run has it
    family = task_zoo.family(spec.tasks[0].family, **spec.tasks[0].kwargs)
    task = task_zoo.task(family.sample(jax.random.key(0)))
    train, test = standardised(task.full("train")), standardised(task.full("test"))  # no run saw test
    meta_test = sequences(learner, test, TEST_IDS + np.arange(n), 2)
    runs = []
    for num_tasks, (facts, _, artifact) in trained.items():
        seen = np.arange(n) % num_tasks if num_tasks else np.arange(n) * 7919
        predict = artifact.as_classifier()
        runs.append({"num_tasks": num_tasks or "unbounded", "meta_training": facts,
                     "meta_test": learner_accuracy(predict, *meta_test),
                     "training_tasks": learner_accuracy(predict, *sequences(learner, test, seen, 3))})
    return {"runs": runs, "logistic_regression": logistic_baseline(learner, train, meta_test, n),
            "sequences": n, "queries": QUERIES, "chance": 1 / learner.classes,
            "seconds": time.perf_counter() - started}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in result["runs"]:
        sizes = [int(k) for k in run["meta_test"]]
        left.plot(sizes[1:], list(run["meta_test"].values())[1:], marker="o",
                  label=f"learner, training tasks: {run['num_tasks']}")
    lr = result["logistic_regression"]
    left.plot([int(k) for k in lr], [v["accuracy"] for v in lr.values()], "k--", marker="s",
              label="logistic regression on the same context")
    left.axhline(result["chance"], color="grey", lw=0.8)
    left.set(xscale="log", xlabel="labelled examples in context", ylabel="accuracy on unseen tasks",
             title="meta-test tasks (digits test split)")
    left.legend(fontsize=8)
    labels = [str(r["num_tasks"]) for r in result["runs"]]
    full = str(max(SIZES))
    right.plot(labels, [r["training_tasks"][full] for r in result["runs"]], marker="o",
               label=f"training tasks, {full} in context")
    right.plot(labels, [r["meta_test"][full] for r in result["runs"]], marker="o",
               label=f"unseen tasks, {full} in context")
    right.plot(labels, [r["training_tasks"]["0"] for r in result["runs"]], marker="x",
               label="training tasks, no context (memorised)")
    right.axhline(result["chance"], color="grey", lw=0.8)
    right.set(xlabel="number of training tasks", ylabel="accuracy", ylim=(0, 1),
              title="memorising → generalising")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000, help="outer steps per run (default 6000)")
    parser.add_argument("--quick", action="store_true", help="two runs of 8 outer steps, 8 sequences")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write in_context_learning.json and .png here")
    args = parser.parse_args()
    result = json.loads(json.dumps(measure(args.steps, args.quick)))  # keys as the file has them
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "in_context_learning.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "in_context_learning.png")
    if args.json:
        print(json.dumps(result))
        return
    full = str(max(SIZES))
    for run in result["runs"]:
        facts = run["meta_training"]
        print(f"{run['num_tasks']} training tasks: {facts['outer_steps']} outer steps in "
              f"{facts['minutes']:.1f} "
              f"min; {full} in context: unseen {run['meta_test'][full]:.3f}, training tasks "
              f"{run['training_tasks'][full]:.3f}, no context {run['training_tasks']['0']:.3f}")
    print(f"logistic regression, {full} in context: {result['logistic_regression'][full]['accuracy']:.3f}")


if __name__ == "__main__":
    main()
