"""Evaluate an optimizer on a suite of tasks against tuned hand-designed baselines.

    suite = load_suite("smoke")                      # metaopt/suites/smoke.yaml, or a path
    result = evaluate("quickstart:3", suite, registry="runs/registry")
    write_report(result, "runs/eval/quickstart-smoke")

Protocol, per task of the suite:

* every baseline (a hand-designed optimizer) is tuned by `metaopt.tuning.random_search` over its
  `search_space` with `suite.trials` trials, on the suite's `tuning_seed` (initial parameters
  and minibatches of the tuning runs); the tuning seed is never an evaluation seed;
* REF (the evaluated optimizer) and each tuned baseline then train the task from the same
  initial parameters with the same minibatches on every evaluation seed (one jitted `lax.scan`
  per run, seeds vmapped); the training loss (the minibatch loss at each step's parameters,
  before its update) is recorded every step, the held-out ("test" split) loss at `test_points`
  evenly spaced steps and after the last step (averaged over a few test batches).

Metrics (per optimizer, averaged over seeds): `final_train_loss`, the mean training loss over the
last 10% of the steps; `final_test_loss`, the held-out loss after the last step; `auc`, the mean
training loss over the run divided by the initial loss (1.0: no progress, lower is better).
The *best baseline* of a task is the one with the lowest final training loss; its final training
loss is the task's *target*. `steps_to_reach` is the first step at which the trailing mean (over
the same 10% window) of the seed-averaged training curve is at or below the target (None if never),
and REF's `speedup` = the best baseline's steps-to-reach / REF's (None if REF never reaches it).
Each task also records `elapsed_s`: wall seconds of tuning (scales with trials) and of training
(scales with seeds), compiles included, to size a full evaluation from a small one.

Aggregates, over ALL tasks of the suite (none is ever dropped): `wins` and `win_rate` (tasks
where REF's final training loss is below the target), `geomean_final_loss_ratio` and
`geomean_test_loss_ratio` (geometric means of REF / best baseline), `mean_auc` (per optimizer),
and `geomean_speedup` over the `reached_tasks` tasks where REF reaches the target (only ever
shown together with that count: a speedup over 2 of 6 tasks says nothing of the other 4).

Diverged runs. A seed whose losses hold a NaN or ±inf has *diverged*; a run (an optimizer on a
task) with a diverged seed has a non-finite mean loss (written as null in the JSON) and loses
the task. Its ratio has no measured value, so the aggregates charge it a stated one,
`DIVERGED_RATIO_CAP` (1e3): a task where REF diverged on any seed counts with a final-loss and a
test-loss ratio of DIVERGED_RATIO_CAP, and with an AUC of DIVERGED_RATIO_CAP (a run whose mean
loss were a thousand times its initial loss); a task where only the best baseline diverged
counts 1 / DIVERGED_RATIO_CAP. Measured ratios are used as they are, also above the cap (the
cap never makes a measured loss look better). Where a loss is <= 0 a ratio is undefined; the
task then counts 1, the cap or its inverse as REF's loss is equal, above or below the
baseline's. The per-task `final_loss_ratio` and `test_loss_ratio` are these charged values
(`capped` says a task holds a charge rather than a measurement); `format_table` lists the
diverged seeds of REF and of the best baseline for every task.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import sys
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from metaopt import datasets, inner, storage, task_zoo

SUITES_DIR = pathlib.Path(__file__).resolve().parent / "suites"
TEST_BATCHES = 2  # held-out loss = mean over this many test batches
LOSS_KEY = 0x5EC0  # folded into an inner run's key: the key of the losses a dataset records with it
# Ratio (REF / best baseline) and AUC charged to the aggregates for a diverged run (docstring).
DIVERGED_RATIO_CAP = 1e3

__all__ = [
    "DIVERGED_RATIO_CAP",
    "EvalInputError",
    "OptimizerRef",
    "RunRecording",
    "Suite",
    "SuiteTask",
    "evaluate",
    "format_table",
    "headline",
    "load_suite",
    "steps_to_reach",
    "suite_names",
    "write_report",
]


class EvalInputError(ValueError):
    """Bad input to an evaluation: unknown suite, invalid suite file, bad optimizer reference."""


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    name: str
    spec: task_zoo.TaskSpec
    steps: int


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[SuiteTask, ...]
    seeds: tuple[int, ...]
    tuning_seed: int
    baselines: tuple[str, ...] = ("adam",)
    trials: int = 8
    test_points: int = 10
    path: str = ""


def suite_names() -> list[str]:
    """Names of the suites shipped in metaopt/suites/."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


_SUITE_KEYS = {"name", "description", "tasks", "seeds", "tuning_seed", "baselines", "trials", "test_points"}
_TASK_KEYS = {"name", "spec", "steps"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_suite(name_or_path: str | pathlib.Path) -> Suite:
    """A shipped suite by name (`suite_names()`), or a suite YAML file by path.

    Raises EvalInputError listing every problem of an invalid file.
    """
    path = pathlib.Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = SUITES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise EvalInputError(f"unknown suite {str(name_or_path)!r}; shipped suites: {suite_names()} "
                                 "(or pass the path of a suite YAML file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise EvalInputError(f"cannot read suite file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise EvalInputError(f"suite file {path} is not valid YAML: {e}") from e
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise EvalInputError(f"suite file {path}: expected a mapping at the top level, "
                             f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        errors.append(f"unknown key(s) {unknown}; accepted: {sorted(_SUITE_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        errors.append(f"name must be a non-empty string, got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        errors.append(f"description must be a string, got {description!r}")
    seeds = raw.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(_is_int(s) and s >= 0 for s in seeds)):
        errors.append(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
        seeds = []
    elif len(set(seeds)) != len(seeds):
        errors.append(f"seeds must be distinct, got {seeds!r}")
    tuning_seed = raw.get("tuning_seed", 1000)
    if not (_is_int(tuning_seed) and tuning_seed >= 0):
        errors.append(f"tuning_seed must be a non-negative int, got {tuning_seed!r}")
    elif tuning_seed in seeds:
        errors.append(f"tuning_seed {tuning_seed} is also an evaluation seed: tune on a separate seed")
    baselines = raw.get("baselines", ["adam"])
    try:
        baselines = check_baselines(baselines)
    except EvalInputError as e:
        errors.append(str(e))
    trials = raw.get("trials", 8)
    if not (_is_int(trials) and trials >= 1):
        errors.append(f"trials must be an int >= 1, got {trials!r}")
    test_points = raw.get("test_points", 10)
    if not (_is_int(test_points) and test_points >= 1):
        errors.append(f"test_points must be an int >= 1, got {test_points!r}")
    tasks: list[SuiteTask] = []
    raw_tasks = raw.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        errors.append("tasks must be a non-empty list of {name, spec: {name, kwargs}, steps}")
        raw_tasks = []
    for i, t in enumerate(raw_tasks):
        where = f"tasks[{i}]"
        if not isinstance(t, dict):
            errors.append(f"{where} must be a mapping, got {t!r}")
            continue
        bad = sorted(set(t) - _TASK_KEYS)
        if bad:
            errors.append(f"{where}: unknown key(s) {bad}; accepted: {sorted(_TASK_KEYS)}")
        steps = t.get("steps")
        if not (_is_int(steps) and steps >= 10):
            errors.append(f"{where}: steps must be an int >= 10, got {steps!r}")
        try:
            spec = task_zoo.TaskSpec.from_json(json.dumps(t.get("spec")))
            task_zoo.cost(spec)  # validates the family and its kwargs without building data
        except KeyError as e:
            errors.append(f"{where}: invalid spec: missing kwarg {e}")
            continue
        except (ValueError, TypeError) as e:
            errors.append(f"{where}: invalid spec: {e}")
            continue
        tname = t.get("name", f"{spec.name}_{i}")
        if not isinstance(tname, str) or not tname or "/" in tname:
            errors.append(f"{where}: name must be a non-empty string without '/', got {tname!r}")
            continue
        if any(x.name == tname for x in tasks):
            errors.append(f"{where}: duplicate task name {tname!r}")
        tasks.append(SuiteTask(tname, spec, steps if _is_int(steps) else 0))
    if errors:
        raise EvalInputError(f"invalid suite file {path}:\n  " + "\n  ".join(errors))
    return Suite(name, description, tuple(tasks), tuple(seeds), tuning_seed, tuple(baselines), trials,
                 test_points, str(path))


def check_baselines(baselines: Any) -> list[str]:
    """The baseline names, checked: hand-designed optimizers with a search space."""
    from metaopt import optimizers

    if isinstance(baselines, str):
        baselines = [b.strip() for b in baselines.split(",") if b.strip()]
    if not isinstance(baselines, list | tuple) or not baselines:
        raise EvalInputError(f"baselines must be a non-empty list of optimizer names, got {baselines!r}")
    tunable = [n for n in optimizers.names() if getattr(optimizers.make(n), "search_space", None)]
    bad = [b for b in baselines if b not in tunable]
    if bad:
        raise EvalInputError(f"baseline(s) {bad} cannot be tuned; baselines must be one of {tunable}")
    if len(set(baselines)) != len(baselines):
        raise EvalInputError(f"duplicate baselines in {list(baselines)}")
    return list(baselines)


# --------------------------------------------------------------------------- REF resolution


@dataclasses.dataclass
class OptimizerRef:
    """What `evaluate` trains with: `resolve_ref`'s answer, or one built by the caller for a θ it
    holds (a checkpoint's, in metaopt.inrun_eval)."""

    ref: str
    kind: str  # "hand-designed" | "builtin-learned" | "registry" | "checkpoint"
    optimizer_name: str
    hparams: dict[str, Any]
    theta: Any
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunRecording:
    """Where `evaluate` records its inner runs as a dataset of training runs (docs/datasets.md):
    each seed's parameters at the suite's test points and at the end, with `run_losses` there."""

    writer: datasets.ShardWriter
    theta_version: int = -1  # the evaluated θ's version where known (a checkpoint's outer step)
    baselines: bool = True  # the tuned baselines' runs too, not only REF's

    @classmethod
    def into(cls, uri: str, per_shard: int = 64) -> RunRecording:
        """A recording into the dataset at `uri`; its shards are named eval-XXXXXXXX-NNNNN, a random
        prefix per recording, so that evaluations writing to one dataset never overwrite each other."""
        return cls(datasets.ShardWriter(uri, f"eval-{uuid.uuid4().hex[:8]}", per_shard))


def resolve_ref(ref: str, registry: str | None = None) -> OptimizerRef:
    """REF: a registered optimizer name (hand-designed, default hyperparameters; a learned one at
    its init θ) or, with `registry`, a registry reference NAME[:VERSION]. A name that is both
    is looked up in the registry when one is given."""
    from metaopt import optimizers
    from metaopt import registry as reg

    if not isinstance(ref, str) or not ref:
        raise EvalInputError(f"REF must be a non-empty string, got {ref!r}")
    builtin = ref in optimizers.names()
    if registry is not None:
        try:
            name, _ = reg.parse_ref(ref)
            in_registry = bool(reg.list_versions(registry, name))
        except ValueError as e:
            if not builtin:
                raise EvalInputError(str(e)) from e
            in_registry = False
        if in_registry or not builtin:
            try:
                trained = reg.load(ref, registry)
            except LookupError as e:
                raise EvalInputError(str(e)) from e
            if trained.kind != "optimizer":  # evaluation trains tasks with an optimizer's update
                raise EvalInputError(f"{trained.ref} holds a {trained.kind} ({trained.optimizer_name}), "
                                     "not an optimizer: `metaopt eval` evaluates optimizers")
            theta = jax.tree.map(jnp.asarray, trained.theta)
            return OptimizerRef(trained.ref, "registry", trained.optimizer_name, dict(trained.hparams), theta,
                        {"registry": registry})
    if builtin:
        opt = optimizers.make(ref)
        if opt.learned:
            theta = jax.tree.map(jnp.asarray, opt.init(jax.random.key(0)))
            return OptimizerRef(ref, "builtin-learned", ref, dict(opt.hparams), theta,
                                {"theta": "init(key(0))"})
        return OptimizerRef(ref, "hand-designed", ref, dict(opt.hparams), {}, {})
    try:
        reg.parse_ref(ref)
    except ValueError as e:
        raise EvalInputError(
            f"{ref!r} is neither a registered optimizer ({optimizers.names()}) nor a registry ref: {e}"
        ) from e
    raise EvalInputError(
        f"{ref!r} is not a registered optimizer name ({optimizers.names()}); for a trained optimizer "
        "from a registry, pass the registry (--registry URI)"
    )


# --------------------------------------------------------------------------- training


def _split_hparams(hparams: dict[str, Any], traced: bool = True) -> tuple[tuple, dict[str, float]]:
    """(static hparams as a hashable tuple, float hparams to pass traced; none if not `traced`). A
    nested value (Lookahead's inner optimizer) is kept as JSON, which `_program` reads back."""
    floats = {k: float(v) for k, v in hparams.items() if traced and isinstance(v, float)}
    static = tuple(sorted((k, _frozen(v)) for k, v in hparams.items() if k not in floats))
    return static, floats


def _frozen(value: Any) -> Any:
    return _JSONValue(json.dumps(value, sort_keys=True)) if isinstance(value, dict | list) else value


class _JSONValue(str):
    """A nested hyperparameter, hashable as its JSON text."""


def held_out_loss(task, params, key: jax.Array) -> jax.Array:
    """The task's loss at `params` on held-out data: the mean over TEST_BATCHES test batches."""
    keys = jax.random.split(key, TEST_BATCHES)
    values = [task.loss(params, k, task.batch(jax.random.fold_in(k, 1), task_zoo.TEST)) for k in keys]
    return jnp.mean(jnp.stack(values)).astype(jnp.float32)


def run_losses(task, params, run_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(training loss, held-out loss) of `params`, as a dataset of training runs records them
    (docs/datasets.md): on one training batch and the held-out batches drawn from `run_key`
    folded with LOSS_KEY, so that every record of one inner run is measured on the same data."""
    batch_key, loss_key, held_key = jax.random.split(jax.random.fold_in(run_key, LOSS_KEY), 3)
    loss = task.loss(params, loss_key, task.batch(batch_key, task_zoo.TRAIN)).astype(jnp.float32)
    return loss, held_out_loss(task, params, held_key)


@functools.cache
def _program(optimizer_name: str, static: tuple, steps: int, test_every: int, record: bool = False):
    """Jitted (task, theta, floats, seed_keys) -> (train (S, steps), test (S, steps), final_test (S,)),
    and with `record` a 4th output: (params, loss, held-out loss) of each seed's run, each with a
    leading (S, P) for the P recorded steps (`recorded_steps`), losses by `run_losses`.

    Cached: tasks of the same shape, and tuned hyperparameters, reuse one compiled program."""
    from metaopt import optimizers

    points = len(recorded_steps(steps, test_every))

    def one(task, theta, floats, key):
        fixed = {k: json.loads(v) if isinstance(v, _JSONValue) else v for k, v in static}
        opt = optimizers.make(optimizer_name, **fixed, **floats)
        tx = opt.as_optax(theta, steps)
        k_init, k_steps, k_final = jax.random.split(key, 3)

        def body(carry, xs):
            (carry, snaps), (i, k) = carry, xs
            k_batch, k_loss, k_test = jax.random.split(k, 3)
            now = inner.current(task, carry)
            at_point = i % test_every == 0
            t = jax.lax.cond(at_point, lambda: held_out_loss(now, carry[0], k_test),
                             lambda: jnp.full((), jnp.nan, jnp.float32))
            if record:
                snaps = _snapshot(snaps, -(-i // test_every), now, carry[0], key, at_point)
            carry, value = inner.step(task, opt, tx, carry, (k_batch, k_loss), i, steps)
            return (carry, snaps), (value.astype(jnp.float32), t)

        keys = jax.random.split(k_steps, steps)
        carry = inner.init(task, tx, task.init(k_init))
        snaps = None
        if record:  # slot ceil(i / test_every) holds step i's parameters; the last slot the final ones
            snaps = (jax.tree.map(lambda x: jnp.zeros((points, *x.shape), x.dtype), carry[0]),
                     jnp.zeros(points, jnp.float32), jnp.zeros(points, jnp.float32))
        (carry, snaps), (train, test) = jax.lax.scan(body, (carry, snaps), (jnp.arange(steps), keys))
        final = inner.current(task, carry)
        out = (train, test, held_out_loss(final, carry[0], k_final))
        if record:
            out += (_snapshot(snaps, points - 1, final, carry[0], key, True),)
        return out

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))


def recorded_steps(steps: int, test_every: int) -> list[int]:
    """The steps at which a recorded evaluation run keeps its parameters: its test points and
    the end of the run."""
    return [*range(0, steps, test_every), steps]


def _snapshot(snaps, slot, task, params, run_key, measure):
    """`snaps` with `params` in `slot`, and their `run_losses` there when `measure` (written at
    every step, so that the parameters cost no conditional copy; measured at the points only)."""
    stack, loss, held = snaps
    stack = jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, slot, 0), stack, params)
    loss, held = jax.lax.cond(measure, lambda: tuple(
        v.at[slot].set(m) for v, m in zip((loss, held), run_losses(task, params, run_key), strict=True)),
        lambda: (loss, held))
    return stack, loss, held


def _train(task, optimizer_name: str, hparams: dict[str, Any], theta: Any, steps: int,
           seed_keys: jax.Array, test_every: int, record: bool = False):
    """Train `task` with make(optimizer_name, **hparams) at θ on every seed key (see _program)."""
    static, floats = _split_hparams(hparams)
    try:
        out = _program(optimizer_name, static, steps, test_every, record)(task, theta, floats, seed_keys)
    except jax.errors.ConcretizationTypeError:  # the optimizer needs concrete float hparams
        out = _program(optimizer_name, _split_hparams(hparams, traced=False)[0], steps, test_every, record)(
            task, theta, {}, seed_keys)
    curves = tuple(np.asarray(x, np.float64) for x in out[:3])
    return curves + (jax.device_get(out[3]),) if record else curves


def steps_to_reach(curve: Any, target: float, window: int = 1) -> int | None:
    """First step count t (1-based) at which the trailing mean of curve[t-window:t] is <= target;
    None if never (or if the target is not finite)."""
    c = np.asarray([np.nan if v is None else v for v in curve], np.float64)
    window = max(1, int(window))
    if c.size < window or target is None or not np.isfinite(target):
        return None
    # trailing[j] = mean(c[j : j + window]); a window holding a NaN is NaN and never counts
    trailing = np.lib.stride_tricks.sliding_window_view(c, window).mean(axis=1)
    hits = np.flatnonzero(np.isfinite(trailing) & (trailing <= target))
    return int(hits[0]) + window if hits.size else None


def _summarise(train: np.ndarray, test: np.ndarray, final_test: np.ndarray, window: int) -> dict:
    finite = np.all(np.isfinite(train), axis=1) & np.isfinite(final_test)
    per_seed = []
    for s in range(train.shape[0]):
        if not finite[s]:
            per_seed.append({"final_train_loss": math.inf, "final_test_loss": math.inf, "auc": math.inf})
            continue
        per_seed.append({
            "final_train_loss": float(np.mean(train[s, -window:])),
            "final_test_loss": float(final_test[s]),
            "auc": float(np.mean(train[s]) / train[s, 0]) if train[s, 0] > 0 else math.nan,
        })
    keys = ("final_train_loss", "final_test_loss", "auc")
    mean = {k: float(np.mean([p[k] for p in per_seed])) for k in keys}
    points = np.flatnonzero(~np.all(np.isnan(test), axis=0))
    return {
        **mean,
        "diverged_seeds": int(np.sum(~finite)),
        "per_seed": per_seed,
        "curve": np.mean(train, axis=0).tolist(),
        "test_curve": {"steps": [*points.tolist(), train.shape[1]],
                       "loss": [*np.mean(test[:, points], axis=0).tolist(), float(np.mean(final_test))]},
    }


def _tuned_baseline(cache_dir: pathlib.Path | None, key: dict[str, Any], tune) -> dict[str, Any]:
    """{"best_hparams", "best_loss", "trials"} of one baseline on one task: read from
    `cache_dir` when it holds this exact key (tuning is deterministic in it), else `tune()`d and
    written there. A run's in-run evaluations tune once (DESIGN.md: no module-level caches)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"{digest}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["tuned"]
    result = tune()
    tuned = {"best_hparams": result.best_hparams, "best_loss": _clean(result.best_loss),
             "trials": _clean(result.trials)}
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "tuned": tuned}))
        tmp.replace(path)  # atomic: a reader sees the whole file or none
    return tuned


def evaluate(
    optimizer_ref: str | OptimizerRef,
    suite: Suite | str,
    registry: str | None = None,
    seeds: list[int] | None = None,
    baselines: list[str] | None = None,
    trials: int | None = None,
    progress: bool = True,
    baseline_cache: str | pathlib.Path | None = None,
    record: RunRecording | None = None,
) -> dict[str, Any]:
    """Evaluate `optimizer_ref` (a reference for `resolve_ref`, or an OptimizerRef) on `suite`
    against tuned baselines (module docstring).

    `baseline_cache`: a folder where tuned baselines are kept and reused (keyed by baseline,
    task, steps, trials and tuning seed); None tunes afresh. `record`: also keep the runs'
    parameters as a dataset of training runs (RunRecording); its writer is flushed at the end."""
    from tqdm import tqdm

    from metaopt import optimizers
    from metaopt.tuning import random_search

    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    ref = optimizer_ref if isinstance(optimizer_ref, OptimizerRef) else resolve_ref(optimizer_ref, registry)
    seeds = list(suite.seeds if seeds is None else seeds)
    if not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise EvalInputError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    if suite.tuning_seed in seeds:
        raise EvalInputError(f"seed {suite.tuning_seed} is the suite's tuning seed; evaluate on other seeds")
    baselines = check_baselines(list(suite.baselines) if baselines is None else baselines)
    trials = suite.trials if trials is None else trials
    if not (_is_int(trials) and trials >= 1):
        raise EvalInputError(f"trials must be an int >= 1, got {trials!r}")

    cache_dir = None if baseline_cache is None else pathlib.Path(baseline_cache)
    started = time.time()
    seed_keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
    seed_keys = jax.random.wrap_key_data(seed_keys)
    tasks_out = []
    bar = tqdm(suite.tasks, desc=f"eval {ref.ref} on {suite.name}", unit="task", file=sys.stderr,
               disable=not progress)
    for index, st in enumerate(bar):
        bar.set_postfix_str(st.name)
        task = task_zoo.task(st.spec)
        window = max(1, st.steps // 10)
        test_every = max(1, st.steps // suite.test_points)
        tune_key = jax.random.fold_in(jax.random.key(suite.tuning_seed), index)
        base_out = {}
        task_started, tuning_s = time.time(), 0.0
        refusal = inner.check(task, optimizers.make(ref.optimizer_name, **ref.hparams), ref.theta, st.steps)
        if refusal:
            raise EvalInputError(f"{ref.ref} cannot train task {st.name!r} of {suite.name}: {refusal}")
        for b_index, b in enumerate(baselines):
            refusal = inner.check(task, optimizers.make(b), {}, st.steps)
            if refusal:  # a baseline that cannot train the task (K-FAC on a transformer) sits it out
                base_out[b] = {"refused": refusal}
                continue
            cache_key = {"baseline": b, "spec": st.spec.to_json(), "steps": st.steps, "trials": trials,
                         "tuning_seed": suite.tuning_seed, "index": index, "baseline_index": b_index}
            tuning_started = time.time()
            tuned = _tuned_baseline(cache_dir, cache_key, functools.partial(
                random_search, jax.random.fold_in(tune_key, b_index), b, task, num_steps=st.steps,
                trials=trials, seed_key=jax.random.fold_in(tune_key, 10_000)))
            tuning_s += time.time() - tuning_started
            hparams = tuned["best_hparams"] or optimizers.make(b).hparams
            keep = record is not None and record.baselines
            runs = _train(task, b, hparams, {}, st.steps, seed_keys, test_every, record=keep)
            if keep:
                _record_runs(record, f"eval/{b}/{suite.name}/{st.name}", st, b, hparams, seeds, runs[3],
                             recorded_steps(st.steps, test_every))
            summary = _summarise(*runs[:3], window)
            base_out[b] = {
                "hparams": hparams,
                "tuning": {"trials": tuned["trials"], "best_loss": tuned["best_loss"],
                           "all_diverged": tuned["best_hparams"] is None},
                **summary,
            }
        curves = _train(task, ref.optimizer_name, ref.hparams, ref.theta, st.steps, seed_keys, test_every,
                        record=record is not None)
        if record is not None:
            _record_runs(record, f"eval/{ref.ref}/{suite.name}/{st.name}", st, ref.optimizer_name,
                         ref.hparams, seeds, curves[3], recorded_steps(st.steps, test_every))
        ref_out = _summarise(*curves[:3], window)
        ran = [b for b in baselines if "refused" not in base_out[b]]
        if not ran:
            raise EvalInputError(f"no baseline of {baselines} can train task {st.name!r} of {suite.name}")
        best = min(ran, key=lambda b: base_out[b]["final_train_loss"])
        target = base_out[best]["final_train_loss"]
        base_steps = steps_to_reach(base_out[best]["curve"], target, window)
        ref_steps = steps_to_reach(ref_out["curve"], target, window)
        for b in ran:
            base_out[b]["steps_to_reach"] = steps_to_reach(base_out[b]["curve"], target, window)
        ref_out["steps_to_reach"] = ref_steps
        ref_out["speedup"] = base_steps / ref_steps if ref_steps and base_steps else None
        tasks_out.append({
            "name": st.name,
            "spec": {"name": st.spec.name, "kwargs": dict(st.spec.kwargs)},
            "steps": st.steps,
            "best_baseline": best,
            "target_loss": target,
            "final_loss_ratio": _charged_ratio(ref_out["final_train_loss"], target),
            "test_loss_ratio": _charged_ratio(ref_out["final_test_loss"], base_out[best]["final_test_loss"]),
            "capped": bool(ref_out["diverged_seeds"] or base_out[best]["diverged_seeds"]),
            "win": bool(ref_out["final_train_loss"] < target),
            "ref": ref_out,
            "baselines": base_out,
            # wall seconds, compiles included: tuning scales with trials, training with seeds
            "elapsed_s": {"tuning": round(tuning_s, 2),
                          "training": round(time.time() - task_started - tuning_s, 2)},
        })
        # No program of this task serves the next one (other shapes). Kept, each would hold ~160 memory
        # maps: a long suite ran out of vm.max_map_count (65,530) and LLVM aborted the process.
        _program.cache_clear()
    bar.close()
    if record is not None:
        record.writer.flush()
    result = {
        "ref": ref.ref,
        "ref_kind": ref.kind,
        "ref_optimizer": ref.optimizer_name,
        "ref_hparams": ref.hparams,
        "ref_info": ref.info,
        "suite": suite.name,
        "suite_description": suite.description,
        "suite_path": suite.path,
        "seeds": seeds,
        "tuning_seed": suite.tuning_seed,
        "baselines": baselines,
        "trials": trials,
        "tasks": tasks_out,
        "aggregate": _aggregate(tasks_out, baselines),
        "elapsed_s": round(time.time() - started, 2),
    }
    return _clean(result)


def _record_runs(record: RunRecording, run: str, st: SuiteTask, optimizer_name: str,
                 hparams: dict[str, Any], seeds: list[int], snapshots, steps: list[int]) -> None:
    """Give `record`'s writer one record per seed and recorded step of one optimizer's runs on one
    task (`snapshots`: _program's 4th output, on the host)."""
    params, loss, held_out = snapshots
    flat = storage.flatten_tree(params)
    for s, seed in enumerate(seeds):
        for p, step in enumerate(steps):
            meta = {"run": f"{run}/seed-{seed}", "step": step, "horizon": st.steps,
                    "loss": float(loss[s, p]), "held_out_loss": float(held_out[s, p]),
                    "task": {"name": st.spec.name, "kwargs": dict(st.spec.kwargs)},
                    "optimizer": {"name": optimizer_name, "hparams": dict(hparams)},
                    "theta_version": record.theta_version, "worker": "eval"}
            record.writer.add(datasets.Record(meta, {k: np.asarray(v[s, p]) for k, v in flat.items()}))


def _charged_ratio(ref_loss: float, base_loss: float) -> float:
    """REF's loss / the best baseline's as it counts in the aggregates (module docstring,
    "Diverged runs"): the cap if REF's loss is not finite (a diverged seed), its inverse if only
    the baseline's is, the measured ratio otherwise. Always a positive finite number."""
    if not math.isfinite(ref_loss):
        return DIVERGED_RATIO_CAP
    if not math.isfinite(base_loss):
        return 1.0 / DIVERGED_RATIO_CAP
    if ref_loss > 0 and base_loss > 0:
        return ref_loss / base_loss
    if ref_loss == base_loss:
        return 1.0
    return DIVERGED_RATIO_CAP if ref_loss > base_loss else 1.0 / DIVERGED_RATIO_CAP


def _charged_auc(run: dict[str, Any]) -> float:
    """A run's AUC as it counts in `mean_auc`: the cap if a seed diverged (or the AUC is undefined)."""
    auc = run["auc"]
    return auc if run["diverged_seeds"] == 0 and math.isfinite(auc) else DIVERGED_RATIO_CAP


def _geomean(xs: list[float]) -> float | None:
    """Geometric mean of positive finite numbers; None for none. Anything else is a bug upstream:
    the aggregates charge diverged tasks instead of dropping them."""
    if any(not (math.isfinite(x) and x > 0) for x in xs):
        raise ValueError(f"geometric mean of {xs}: every value must be positive and finite")
    return float(math.exp(sum(map(math.log, xs)) / len(xs))) if xs else None


def _aggregate(tasks: list[dict], baselines: list[str]) -> dict[str, Any]:
    n = len(tasks)
    reached = [t["ref"]["speedup"] for t in tasks if t["ref"]["speedup"] is not None]
    wins = sum(t["win"] for t in tasks)
    ran = {b: [t["baselines"][b] for t in tasks if "refused" not in t["baselines"][b]] for b in baselines}
    runs = {"ref": [t["ref"] for t in tasks], **ran}
    return {
        "num_tasks": n,
        "wins": wins,
        "win_rate": wins / n,
        "geomean_final_loss_ratio": _geomean([t["final_loss_ratio"] for t in tasks]),
        "geomean_test_loss_ratio": _geomean([t["test_loss_ratio"] for t in tasks]),
        "diverged_ratio_cap": DIVERGED_RATIO_CAP,
        "capped_tasks": sum(t["capped"] for t in tasks),
        "reached_tasks": len(reached),
        "reached_fraction": len(reached) / n,
        "geomean_speedup": _geomean(reached),
        "mean_auc": {k: float(np.mean([_charged_auc(r) for r in rs])) if rs else None
                     for k, rs in runs.items()},
        "diverged_runs": {k: sum(r["diverged_seeds"] for r in rs) for k, rs in runs.items()},
    }


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------- report


def write_report(result: dict[str, Any], out_dir: str | pathlib.Path) -> dict[str, str]:
    """Write result.json, one loss-curve PNG per task (tasks/NAME.png) and summary.png into
    `out_dir`; return {what: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    written = {"json": str(out / "result.json")}
    (out / "result.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    for t in result["tasks"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        runs = [(f"{result['ref']} (REF)", t["ref"])]
        runs += [(f"{b} (tuned)", t["baselines"][b]) for b in result["baselines"]
                 if "refused" not in t["baselines"][b]]
        positive = True
        for i, (label, run) in enumerate(runs):
            color = f"C{i}"
            curve = np.array([np.nan if v is None else v for v in run["curve"]], np.float64)
            ax.plot(np.arange(curve.size), curve, color=color, lw=1, label=f"{label} train")
            tc = run["test_curve"]
            test = np.array([np.nan if v is None else v for v in tc["loss"]], np.float64)
            ax.plot(tc["steps"], test, "o--", color=color, ms=3, lw=0.8, label=f"{label} held-out")
            vals = np.concatenate([curve, test])
            positive &= bool(np.all(vals[np.isfinite(vals)] > 0))
        if t["target_loss"] is not None:
            ax.axhline(t["target_loss"], color="gray", lw=0.6, ls=":", label="best baseline final")
        ax.set(xlabel="step", ylabel="loss (mean over seeds)", title=f"{result['suite']} / {t['name']}")
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "tasks" / f"{t['name']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[f"task:{t['name']}"] = str(path)

    names = [t["name"] for t in result["tasks"]]
    ratios = [t["final_loss_ratio"] for t in result["tasks"]]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(names) + 2), 4.5))
    colors = ["C2" if t["win"] else "C3" for t in result["tasks"]]
    bars = ax.bar(range(len(names)), ratios, color=colors)
    for bar, t in zip(bars, result["tasks"], strict=True):
        if t["capped"]:  # a charge, not a measurement: say so on the bar
            bar.set_hatch("//")
            who, run = ("REF", t["ref"]) if t["ref"]["diverged_seeds"] else (
                t["best_baseline"], t["baselines"][t["best_baseline"]])
            ax.annotate(f"{who} diverged {run['diverged_seeds']}/{len(result['seeds'])}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")  # charged ratios are positive by construction
    ax.set_ylabel("final train loss: REF / best tuned baseline", fontsize=9)
    lead, capped, speed = _headline_parts(result)  # headline(result), on two lines
    ax.set_title(f"{result['ref']} on {result['suite']}: {lead}\n{capped + '; ' if capped else ''}{speed}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)
    written["summary"] = str(out / "summary.png")
    return written


def _headline_parts(result: dict[str, Any]) -> tuple[str, str, str]:
    """(wins and final-loss ratio over all tasks, the note on capped tasks or "", the speedup
    with the share of tasks it is computed over)."""
    a = result["aggregate"]
    n, ratio, sp = a["num_tasks"], a["geomean_final_loss_ratio"], a["geomean_speedup"]
    lead = f"wins {a['wins']}/{n}, geomean final-loss ratio {ratio:.3g}x over all {n} tasks"
    capped = ""
    if a["capped_tasks"]:
        capped = f"({a['capped_tasks']} with diverged seeds, counted at the {a['diverged_ratio_cap']:g} cap)"
    speed = (f"geomean speedup {sp:.2f}x over {a['reached_tasks']}/{n} tasks" if sp is not None
             else f"target reached on 0/{n} tasks")
    return lead, capped, speed


def headline(result: dict[str, Any]) -> str:
    """One line that leads with wins and the final-loss ratio over all tasks; the speedup comes
    only with the share of tasks it is computed over (module docstring, "Aggregates")."""
    lead, capped, speed = _headline_parts(result)
    return f"{lead}{' ' + capped if capped else ''}; {speed}"


def format_table(result: dict[str, Any]) -> str:
    """A short plain-text table of the per-task results and the aggregate: REF's and the best
    baseline's diverged seeds per task, then the headline."""

    def f(x, spec=".4g"):
        return "-" if x is None else format(x, spec)

    n_seeds = len(result["seeds"])
    rows = [("task", "best baseline", "REF final", "base final", "ratio", "REF test", "REF auc", "speedup",
             "REF diverged", "base diverged")]
    for t in result["tasks"]:
        b = t["baselines"][t["best_baseline"]]
        sp = t["ref"]["speedup"]
        ratio = f(t["final_loss_ratio"], ".3g") + (" (cap)" if t["capped"] else "")
        rows.append((
            t["name"], t["best_baseline"], f(t["ref"]["final_train_loss"]), f(b["final_train_loss"]),
            ratio, f(t["ref"]["final_test_loss"]), f(t["ref"]["auc"], ".3f"),
            "never" if sp is None else f"{sp:.2f}x",
            f"{t['ref']['diverged_seeds']}/{n_seeds}", f"{b['diverged_seeds']}/{n_seeds}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    a = result["aggregate"]
    diverged = ", ".join(f"{'REF' if k == 'ref' else k} {v}" for k, v in a["diverged_runs"].items())
    lines.append(f"{result['ref']} on {result['suite']}: {headline(result)}; "
                 f"diverged runs (task x seed): {diverged}")
    return "\n".join(lines)
