"""A meta-learned Adam schedule against random search for the best constant and cosine ones.

Meta-trains examples/adam_schedule.yaml (Adam's log learning rate at 8 knots, PES over whole
1,000-step runs of MLPs on 8x8 digits) with `metaopt train` for `--minutes`, and counts the inner
training steps its accepted estimates took. Random search then gets the same number of inner
steps for each of two families of schedules: a constant rate (log-uniform in 1e-5..1e-1) and a
cosine decay with linear warm-up (peak log-uniform in 1e-5..1e-1, warm-up uniform in 0..20% of
the run); each trial trains 4 tasks of the job's own family for a whole run, and the best is the
trial with the lowest mean log final training loss.

With --weight-decay it meta-trains examples/adamw_schedule.yaml instead (AdamW, its decoupled
weight decay learned on the same knots, on a held-out meta-loss: each step's loss on a test batch
after it), and each random-search trial also draws a constant weight decay (log-uniform in
1e-4..1) and is scored on those held-out losses. Last, on tasks none of them trained on — 8
more of the family (other seeds) and 4 of a shifted one (width 128, depth 3) — Adam runs under
each schedule for a run, and the figure is the final test loss (held-out data; a diverged run
counts as infinitely bad). Ratios learned / baseline below 1 are wins for the learned schedule.

    python benchmarks/schedule_search.py [--minutes M] [--weight-decay] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import registry, task_zoo
from metaopt.jobspec import load_job_spec
from metaopt.learnables import AdamSchedule
from metaopt.run_report import read_metrics
from metaopt.train import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEARCH_TASKS = 4  # tasks of the job's family each search trial trains
SHIFTED = {"widths": [128], "depths": [3], "activations": ["relu", "tanh"], "batch_sizes": [64]}


def meta_train(example: str, minutes: float, quick: bool, out: str,
               overrides: dict | None = None) -> tuple[dict, object, object]:
    """(facts of the run, its spec, the published artifact) of examples/EXAMPLE.yaml meta-trained
    for `minutes` as `metaopt train` does it (quick: 8 outer steps on 100-step runs), with the
    spec's dotted-path `overrides` (e.g. {"meta_objective.hparams.num_tasks": 16})."""
    spec = load_job_spec(ROOT / "examples" / f"{example}.yaml")
    changes = {"stop.max_minutes": minutes, "stop.max_outer_steps": 8 if quick else 1_000_000}
    if quick:
        horizon = min(100, spec.estimator.inner_horizon)
        changes |= {"estimator.inner_horizon": horizon,
                    "estimator.truncation_length": min(20, spec.estimator.truncation_length)}
    spec = spec.with_overrides(**(changes | (overrides or {})))
    result = train(spec, out=out, job_id=example.replace("_", "-"), progress=False)
    inner_steps = sum(r["inner_steps"] for r in read_metrics(pathlib.Path(result.run_dir) / "metrics.jsonl"))
    facts = {"outer_steps": result.outer_steps, "inner_steps": inner_steps, "minutes": result.wall_s / 60,
             "horizon": spec.estimator.inner_horizon, "meta_loss_first": result.meta_loss_first,
             "meta_loss_last": result.meta_loss_last}
    return facts, spec, registry.load(result.artifact, result.registry)


def run(task, tx, key, steps: int, held_out: bool = False):
    """(losses [steps], final test loss) of `tx` training `task`: each step's training loss, or
    with `held_out` its loss on a test batch after the step (as the meta-objective has them)."""
    params = task.init(jax.random.fold_in(key, 0))

    def body(carry, t):
        params, state = carry
        batch_key, loss_key = jax.random.split(jax.random.fold_in(key, t + 1))
        loss, grads = jax.value_and_grad(task.loss)(params, loss_key, task.batch(batch_key, "train"))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if held_out:
            loss = task.loss(params, loss_key, task.batch(batch_key, "test"))
        return (params, state), loss

    (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    return losses, task.loss(params, key, task.batch(key, "test"))


def constant(hp, steps):
    return lambda count: hp["lr"]


def cosine(hp, steps):
    def schedule(count):
        warm = jnp.maximum(hp["warmup"] * steps, 1.0)
        return hp["lr"] * jnp.minimum(1.0, (count + 1) / warm) * 0.5 * (1 + jnp.cos(jnp.pi * count / steps))

    return schedule


def sample(kind: str, key, n: int, weight_decay: bool) -> dict:
    lr_key, warm_key, wd_key = jax.random.split(key, 3)
    hp = {"lr": jnp.exp(jax.random.uniform(lr_key, (n,), minval=math.log(1e-5), maxval=math.log(1e-1)))}
    if kind == "cosine":
        hp["warmup"] = jax.random.uniform(warm_key, (n,), minval=0.0, maxval=0.2)
    if weight_decay:
        hp["wd"] = jnp.exp(jax.random.uniform(wd_key, (n,), minval=math.log(1e-4), maxval=0.0))
    return hp


def optimizer(hp: dict, schedule) -> optax.GradientTransformation:
    """Adam under `schedule`, or AdamW with the trial's constant weight decay if it has one."""
    return optax.adamw(schedule, weight_decay=hp["wd"]) if "wd" in hp else optax.adam(schedule)


def search(kind: str, tasks: list, budget: int, steps: int, key, weight_decay: bool) -> dict:
    """Random search with `budget` inner steps: trials of every search task for a whole run."""
    trials = max(1, budget // (len(tasks) * steps))
    hps = sample(kind, key, trials, weight_decay)
    make = {"constant": constant, "cosine": cosine}[kind]

    @jax.jit
    def score(task, hps, key):  # log of the mean of the last 20 losses (held out with wd), per trial
        trial = lambda hp: run(task, optimizer(hp, make(hp, steps)), key, steps, weight_decay)[0]  # noqa: E731
        losses = jax.vmap(trial)(hps)
        return jnp.log(jnp.mean(losses[:, -20:], axis=1))

    scores = np.mean([np.asarray(score(t, hps, jax.random.key(i))) for i, t in enumerate(tasks)], axis=0)
    scores = np.where(np.isfinite(scores), scores, np.inf)
    best = int(np.argmin(scores))
    return {"trials": trials, "inner_steps": trials * len(tasks) * steps,
            "best": {k: float(v[best]) for k, v in hps.items()}, "best_score": float(scores[best])}


def evaluate(optimizers: dict, tasks: list[tuple[str, object]], steps: int) -> list[dict]:
    rows = []
    for name, task in tasks:
        row = {"task": name}
        for label, tx in optimizers.items():
            _, test = jax.jit(lambda t, tx=tx: run(t, tx, jax.random.key(7), steps))(task)
            row[label] = float(test) if np.isfinite(float(test)) else math.inf
        rows.append(row)
    return rows


def measure(minutes: float, quick: bool, weight_decay: bool = False) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        facts, spec, trained = meta_train("adamw_schedule" if weight_decay else "adam_schedule", minutes,
                                          quick, out)
    facts["learned_lr"] = np.exp(np.asarray(trained.theta["log_lr"])).tolist()
    if weight_decay:
        facts["learned_wd"] = np.exp(np.asarray(trained.theta["log_wd"])).tolist()
    steps = facts["horizon"]
    family = task_zoo.family(spec.tasks[0].family, **spec.tasks[0].kwargs)
    search_tasks = [task_zoo.task(family.sample(jax.random.key(i))) for i in range(SEARCH_TASKS)]
    found = {kind: search(kind, search_tasks, facts["inner_steps"], steps, jax.random.key(k), weight_decay)
             for k, kind in enumerate(("constant", "cosine"))}
    held_out = [(f"family-{i}", family.sample(jax.random.key(1000 + i))) for i in range(2 if quick else 8)]
    shifted = task_zoo.family("mlp", **SHIFTED)
    held_out += [(f"shifted-{i}", shifted.sample(jax.random.key(2000 + i))) for i in range(1 if quick else 4)]
    start = AdamSchedule(**spec.meta_objective.hparams)
    best = {kind: found[kind]["best"] for kind in found}
    optimizers = {"learned": trained.as_optax(num_steps=steps),
                  "constant": optimizer(best["constant"], constant(best["constant"], steps)),
                  "cosine": optimizer(best["cosine"], cosine(best["cosine"], steps)),
                  "start": start.as_optax(start.init_theta(None), steps)}
    rows = evaluate(optimizers, [(n, task_zoo.task(s)) for n, s in held_out], steps)
    summary = {}
    for baseline in ("constant", "cosine", "start"):
        ratios = [r["learned"] / r[baseline] for r in rows]
        summary[baseline] = {"median_ratio": statistics.median(ratios),
                             "wins": sum(r < 1 for r in ratios), "tasks": len(ratios)}
    return {"meta_training": facts, "search": found, "held_out": rows, "learned_vs": summary,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="meta-training time (default 15)")
    parser.add_argument("--weight-decay", action="store_true",
                        help="AdamW: learn (and search) the weight decay too, on held-out losses")
    parser.add_argument("--quick", action="store_true", help="8 outer steps on 100-step runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path,
                        help="write schedule_search.json (schedule_search_weight_decay.json) here")
    args = parser.parse_args()
    result = measure(args.minutes, args.quick, args.weight_decay)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "schedule_search_weight_decay.json" if args.weight_decay else "schedule_search.json"
        (args.out / name).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
        return
    facts = result["meta_training"]
    print(f"meta-training: {facts['outer_steps']} outer steps, {facts['inner_steps']:,} inner steps "
          f"in {facts['minutes']:.1f} min; learned rates {np.round(facts['learned_lr'], 5).tolist()}"
          + (f", weight decays {np.round(facts['learned_wd'], 5).tolist()}" if "learned_wd" in facts else ""))
    for kind, found in result["search"].items():
        print(f"random search, {kind}: {found['trials']} trials, best {found['best']}")
    for baseline, s in result["learned_vs"].items():
        print(f"learned vs {baseline}: median ratio {s['median_ratio']:.3f}, wins {s['wins']}/{s['tasks']}")


if __name__ == "__main__":
    main()
