"""What a job can meta-learn besides an optimizer: name → factory, as `metaopt.optimizers` has.

A learnable is what θ parameterises, of some `kind` ("schedule", ...). It has

    name, hparams, kind                          make(name, **hparams) rebuilds it
    init_theta(key) -> θ                          meta-training's starting point
    objective(task, num_steps) -> MetaObjective   what θ is meta-trained on, for one task
                                                  (workers/objective.py's interface)
    as_<kind>(θ, ...)                             its use once trained, e.g. `as_schedule`

A job names one in `meta_objective: {name, hparams}` (a built-in name, or a plugin's import path
`module:Attribute`); `metaopt.load(ref)` rebuilds it from an artifact whose manifest says its
kind, and offers its `as_<kind>` methods. A learnable may declare what it needs of a task in
`requires` (e.g. "logits": `task.logits(params, x)`), checked before a job starts.
Built in: `adam_schedule` (schedule.py), `learned_loss` (loss.py) and `in_context_learner`
(in_context.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metaopt import plugins
from metaopt.learnables.in_context import InContextLearner
from metaopt.learnables.loss import LearnedLoss
from metaopt.learnables.schedule import AdamSchedule

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, **hparams: Any):
    """The learnable `name` (built-in, or a plugin's import path) with these hyperparameters."""
    if plugins.is_import_path(name):
        factory = plugins.load_factory(name, "meta-objective")
    elif name in _REGISTRY:
        factory = _REGISTRY[name]
    else:
        raise ValueError(f"unknown meta-objective {name!r}; built-in: {names()}, or a plugin's "
                         "import path (module:Attribute)")
    accepted = ([f.name for f in dataclasses.fields(factory) if f.init] if dataclasses.is_dataclass(factory)
                else None)
    unknown = sorted(set(hparams) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for meta-objective {name!r}; "
                         f"accepted: {accepted}")
    learnable = factory(**hparams)
    if plugins.is_import_path(name):  # what an artifact records of it rebuilds it
        learnable = plugins.Named(name, learnable, hparams)
    missing = [a for a in ("kind", "init_theta", "objective") if not hasattr(learnable, a)]
    if missing:
        raise plugins.PluginError(f"meta-objective {name!r} has no {missing}: a learnable needs kind, "
                                  "init_theta(key) and objective(task, num_steps)")
    return learnable


def check(learnable, task, num_steps: int) -> None:
    """Run a learnable as meta-training will, on `task`: θ, its objective, a fresh state and one
    step under jit with θ an argument; a PluginError names the step that fails, or a loss that is
    not a finite scalar."""
    key, step = jax.random.key(0), "init_theta(key)"
    try:
        theta = learnable.init_theta(key)
        step = "objective(task, num_steps) on a task of the job's first family"
        objective = learnable.objective(task, num_steps)
        step = "init_state(key, theta) and step(theta, state, key) under jax.jit"
        _, loss = jax.jit(lambda th: objective.step(th, objective.init_state(key, th), key))(theta)
    except Exception as err:  # noqa: BLE001 - the user's code: say where it broke
        raise plugins.PluginError(f"meta-objective {learnable.name!r}: {step} failed: "
                                  f"{type(err).__name__}: {err}") from None
    if jnp.shape(loss) != () or not bool(jnp.isfinite(loss)):
        raise plugins.PluginError(f"meta-objective {learnable.name!r}: step must return a finite scalar "
                                  f"loss, got {loss!r}")


register(AdamSchedule.name, AdamSchedule)
register(LearnedLoss.name, LearnedLoss)
register(InContextLearner.name, InContextLearner)
