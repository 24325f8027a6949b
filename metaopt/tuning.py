"""Random-search hyperparameter tuning of any registered optimizer on a task_zoo task.

Random search is the honest baseline for tuning (Bergstra & Bengio, "Random Search for
Hyper-Parameter Optimization", JMLR 2012; Li & Talwalkar, "Random Search and Reproducibility
for Neural Architecture Search", UAI 2019): hand-designed baselines compared against learned
optimizers should get a tuning budget, and this is the simplest one that is hard to fool.

    result = random_search(jax.random.key(0), "sgd", task, num_steps=200, trials=20)
    result.best_hparams      # make("sgd", **result.best_hparams) rebuilds the winner
    result.trials            # [{"hparams", "final_loss", "diverged"}, ...] in sampling order

Protocol, per trial: sample the hyperparameters of the search space, build the optimizer,
train the task from the same initial parameters with the same minibatches for every trial
(both drawn from `seed_key`: common random numbers make trials comparable) with a plain optax
loop (a jitted `lax.scan`), and score it by the FINAL LOSS: the mean over the last
`average_last` steps (default: the last 10%) of the loss of the chosen split ("train": the
minibatch loss at each step's params before its update; "test": a fresh test batch at the same
params). A trial whose losses contain a NaN or ±inf is DIVERGED: its final_loss is +inf (so it
is never selected) and it is recorded like every other trial. The best trial is the one with
the lowest final loss (the earliest among ties); if every trial diverged, best_hparams is None
and best_loss is +inf. The result is a deterministic function of (key, seed_key) and the
arguments.

Search spaces: `{hparam: ("log_uniform", low, high) | ("uniform", low, high) |
("choice", [values...])}`; the default is the optimizer class's `search_space` attribute (see
hand_designed.py). Float
hyperparameters are passed to the optimizer as traced values, so all trials that share the
same "choice" values run as one compiled `lax.map`; an optimizer that needs concrete values
(a Python check on a float hyperparameter) falls back to one compilation per trial.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metaopt import inner, optimizers, task_zoo


@dataclasses.dataclass
class TuningResult:
    """best_hparams: full hparams of the best trial (None if all diverged); best_loss: its final
    loss; trials: one dict per trial {"hparams", "final_loss", "diverged"} in sampling order."""

    best_hparams: dict[str, Any] | None
    best_loss: float
    trials: list[dict[str, Any]]


def search_space_for(optimizer_name: str) -> dict[str, tuple]:
    """The default search space of a registered optimizer (ValueError if it has none)."""
    space = getattr(optimizers.make(optimizer_name), "search_space", None)
    if not space:
        raise ValueError(f"optimizer {optimizer_name!r} has no default search space; pass search_space=")
    return dict(space)


def _sample(key: jax.Array, space: dict[str, tuple]) -> dict[str, Any]:
    """One point of `space`, as Python values; floats rounded to float32 (what is trained)."""
    out = {}
    for i, name in enumerate(sorted(space)):  # sorted: the sample does not depend on dict order
        kind, *args = space[name]
        k = jax.random.fold_in(key, i)
        if kind == "choice":
            (values,) = args
            out[name] = values[int(jax.random.randint(k, (), 0, len(values)))]
            continue
        lo, hi = (float(a) for a in args)
        if not lo <= hi:
            raise ValueError(f"search space {name!r}: need low <= high, got {space[name]!r}")
        u = float(jax.random.uniform(k, (), jnp.float32))
        if kind == "log_uniform":
            if lo <= 0:
                raise ValueError(f"search space {name!r}: log_uniform needs low > 0, got {space[name]!r}")
            value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        elif kind == "uniform":
            value = lo + u * (hi - lo)
        else:
            raise ValueError(f"search space {name!r}: unknown kind {kind!r}")
        out[name] = float(np.float32(value))
    return out


def _losses(task, seed_key, name, fixed, floats, theta, num_steps, split):
    """(num_steps,) losses of one training run; `floats` may hold traced hyperparameters."""
    opt = optimizers.make(name, **fixed, **floats)
    tx = opt.as_optax(theta, num_steps)
    k_init, k_steps = jax.random.split(seed_key)

    def body(carry, xs):
        i, k = xs
        k_batch, k_loss, k_test = jax.random.split(k, 3)
        held_out = None
        if split == task_zoo.TEST:  # the parameters' held-out loss, before this step's update
            now = inner.current(task, carry)
            held_out = now.loss(carry[0], k_loss, now.batch(k_test, task_zoo.TEST))
        carry, value = inner.step(task, opt, tx, carry, (k_batch, k_loss), i, num_steps)
        return carry, value if held_out is None else held_out

    keys = jax.random.split(k_steps, num_steps)
    return jax.lax.scan(body, inner.init(task, tx, task.init(k_init)), (jnp.arange(num_steps), keys))[1]


def random_search(
    key: jax.Array,
    optimizer_name: str,
    task: Any,
    num_steps: int,
    trials: int,
    search_space: dict[str, tuple] | None = None,
    seed_key: jax.Array | None = None,
    *,
    hparams: dict[str, Any] | None = None,
    theta: Any = None,
    split: str = task_zoo.TRAIN,
    average_last: int | None = None,
) -> TuningResult:
    """Random search over `search_space` (see module docstring for the protocol).

    key: samples the hyperparameters (trial i uses fold_in(key, i)); task: a task_zoo Task or
    TaskSpec; seed_key: initial params and minibatches, shared by all trials (default: derived
    from `key`); hparams: fixed hyperparameters that are not searched; theta: meta-parameters
    for a learned optimizer (default: its init(seed_key)); split, average_last: the final-loss
    window (module docstring).
    """
    if num_steps < 1 or trials < 1:
        raise ValueError(f"need num_steps >= 1 and trials >= 1, got {num_steps}, {trials}")
    if split not in task_zoo.SPLITS:
        raise ValueError(f"split must be one of {task_zoo.SPLITS}, got {split!r}")
    if isinstance(task, task_zoo.TaskSpec):
        task = task_zoo.task(task)
    space = search_space_for(optimizer_name) if search_space is None else dict(search_space)
    seed_key = jax.random.fold_in(key, 2**31 - 1) if seed_key is None else seed_key
    fixed = dict(hparams or {})
    if theta is None:
        theta = optimizers.make(optimizer_name, **fixed).init(seed_key)
    refusal = inner.check(task, optimizers.make(optimizer_name, **fixed), theta, num_steps)
    if refusal:
        raise ValueError(refusal)
    window = max(1, num_steps // 10) if average_last is None else min(max(1, average_last), num_steps)

    samples = [_sample(jax.random.fold_in(key, i), space) for i in range(trials)]
    clash = sorted(set(fixed) & set(space))
    if clash:
        raise ValueError(f"hyperparameters {clash} are both fixed (hparams=) and searched")
    # Built before training so that a bad name fails fast; recorded as each trial's hparams.
    full = [optimizers.make(optimizer_name, **fixed, **s).hparams for s in samples]
    float_names = sorted(n for n in space if space[n][0] != "choice")
    # Trials that agree on every non-float (static) value share one compiled program.
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(repr(s[n]) for n in sorted(space) if n not in float_names), []).append(i)

    def program(static: dict[str, Any], concrete: dict[str, float] | None = None):
        def run(t, th, floats):
            return _losses(t, seed_key, optimizer_name, {**fixed, **static}, floats, th, num_steps, split)

        if concrete is None:  # floats traced: one program for the whole group
            return jax.jit(lambda t, th, floats: jax.lax.map(lambda f: run(t, th, f), floats))
        return jax.jit(lambda t, th: run(t, th, concrete))  # floats baked in

    losses: list[np.ndarray] = [np.empty(0)] * trials
    for idx in groups.values():
        static = {n: v for n, v in samples[idx[0]].items() if n not in float_names}
        if not float_names:  # nothing continuous: every trial of the group is the same run
            rows = [np.asarray(program(static, {})(task, theta))] * len(idx)
        else:
            stacked = {n: jnp.asarray([samples[i][n] for i in idx], jnp.float32) for n in float_names}
            try:
                rows = list(np.asarray(program(static)(task, theta, stacked)))
            except jax.errors.ConcretizationTypeError:  # the optimizer needs concrete floats
                concrete = [{n: samples[i][n] for n in float_names} for i in idx]
                rows = [np.asarray(program(static, c)(task, theta)) for c in concrete]
        for row, i in zip(rows, idx, strict=True):
            losses[i] = row

    records = []
    for hp, row in zip(full, losses, strict=True):
        diverged = not bool(np.all(np.isfinite(row)))
        final = math.inf if diverged else float(np.mean(row[-window:]))
        records.append({"hparams": hp, "final_loss": final, "diverged": diverged})
    best = min(range(trials), key=lambda i: records[i]["final_loss"])
    if records[best]["diverged"]:
        return TuningResult(None, math.inf, records)
    return TuningResult(records[best]["hparams"], records[best]["final_loss"], records)
