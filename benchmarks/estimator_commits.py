"""PES on this checkout against another commit's, on the reference configuration, interleaved.

A change to the estimators (such as the meta-objective interface, workers/objective.py) must not
cost speed. Each side runs in a process of its own, importing metaopt from its own tree (another
commit is checked out as a `git worktree`): the reference recipe's optimizer and estimator
(examples/nominal_mix_v7.yaml: nominal_mlp, 4 pairs, truncations of 20) on one MLP task of its
mix. After both have compiled, they take turns, one round at a time, each timing `--truncations`
PES truncations while the other waits: the machine's drift falls on both alike. Reported: each
side's median seconds per truncation and the ratio this/other, per round and overall.

    python benchmarks/estimator_commits.py [--against REV] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# One side: metaopt imported from the tree given as argv[1] (its pyproject's package-dir, as the
# editable install maps this checkout), then one line of seconds per round asked for on stdin.
SIDE = r"""
import importlib.util, pathlib, sys, time, tomllib
root = pathlib.Path(sys.argv[1])
dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
mapping = {"metaopt": root / "metaopt", **{name: root / d for name, d in dirs.items()}}

class Tree:  # instead of the editable install's finder, which maps this checkout
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in mapping:
            return importlib.util.spec_from_file_location(
                name, mapping[name] / "__init__.py", submodule_search_locations=[str(mapping[name])])

sys.meta_path[:] = [Tree] + [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
import jax
from metaopt import optimizers, task_zoo
from metaopt.jobspec import load_job_spec
from metaopt.workers.estimators import make_estimator

recipe = load_job_spec(root / "examples" / "nominal_mix_v7.yaml")
optimizer = optimizers.make(recipe.optimizer.name, **recipe.optimizer.hparams)
task = task_zoo.task(task_zoo.TaskSpec("mlp", {
    "width": 48, "depth": 2, "activation": "tanh", "batch_size": 64, "seed": 3, "dataset": "digits"}))
settings = recipe.estimator.model_dump()
try:  # after the meta-objective interface: the optimizer training the task is the objective
    from metaopt.workers.objective import LearnedOptimizerTraining
    estimator = make_estimator(**settings)
    target = LearnedOptimizerTraining(task, optimizer, settings["inner_horizon"])
except ImportError:  # before it: the optimizer goes to the estimator, the task to each call
    estimator = make_estimator(optimizer=optimizer, **settings)
    target = task
theta = optimizer.init(jax.random.key(0))
state = estimator.init(jax.random.key(1), theta, target)
key = jax.random.key(2)
for _ in range(2):  # compiles, and warms the caches
    key, sub = jax.random.split(key)
    state, grad, _ = estimator.estimate(sub, theta, state, target)
    grad.block_until_ready()
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    for _ in range(int(line)):
        key, sub = jax.random.split(key)
        state, grad, _ = estimator.estimate(sub, theta, state, target)
        grad.block_until_ready()
    print(time.perf_counter() - start, flush=True)
"""


def _start(tree: pathlib.Path) -> subprocess.Popen:
    side = subprocess.Popen([sys.executable, "-c", SIDE, str(tree)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=tree)
    if side.stdout.readline().strip() != "ready":
        side.kill()
        raise RuntimeError(f"the side at {tree} did not start (its error is above)")
    return side


def _round(side: subprocess.Popen, truncations: int) -> float:
    side.stdin.write(f"{truncations}\n")
    side.stdin.flush()
    return float(side.stdout.readline()) / truncations


def measure(against: str, rounds: int, truncations: int) -> dict:
    commit = subprocess.run(["git", "rev-parse", against], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="metaopt-worktree-") as scratch:
        other = pathlib.Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), commit], cwd=ROOT,
                       capture_output=True, check=True)
        try:
            sides = {"this": _start(ROOT), "other": _start(other)}
            times: dict[str, list[float]] = {"this": [], "other": []}
            for r in range(rounds):
                for name in (("this", "other") if r % 2 == 0 else ("other", "this")):
                    times[name].append(_round(sides[name], truncations))
            for side in sides.values():
                side.stdin.close()
                side.wait(timeout=60)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT,
                           capture_output=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"against": against, "against_commit": commit, "rounds": rounds,
            "truncations_per_round": truncations, "seconds_per_truncation": median,
            "per_round_ratio": [a / b for a, b in zip(times["this"], times["other"], strict=True)],
            "this_vs_other": median["this"] / median["other"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD~1", help="The commit to compare with (default HEAD~1).")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 truncations.")
    parser.add_argument("--json", action="store_true", help="Print the result as one JSON line.")
    parser.add_argument("--out", type=pathlib.Path, help="Write estimator_commits.json there.")
    args = parser.parse_args()
    rounds, truncations = (3, 2) if args.quick else (12, 20)
    result = measure(args.against, rounds, truncations)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "estimator_commits.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
    else:
        s = result["seconds_per_truncation"]
        print(f"PES truncation on the reference configuration: this checkout {s['this'] * 1e3:.1f} ms, "
              f"{result['against_commit'][:10]} {s['other'] * 1e3:.1f} ms; this/other "
              f"{result['this_vs_other']:.3f} (median of {rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
