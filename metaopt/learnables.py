"""What a job can meta-learn besides an optimizer: name → factory, as `metaopt.optimizers` has.

A learnable is what θ parameterises, of some `kind` ("schedule", ...). It has

    name, hparams, kind                          make(name, **hparams) rebuilds it
    init_theta(key) -> θ                          meta-training's starting point
    objective(task, num_steps) -> MetaObjective   what θ is meta-trained on, for one task
                                                  (workers/objective.py's interface)
    as_<kind>(θ, ...)                             its use once trained, e.g. `as_schedule`

A job names one in `meta_objective: {name, hparams}` (a built-in name, or a plugin's import path
`module:Attribute`); `metaopt.load(ref)` rebuilds it from an artifact whose manifest says its
kind, and offers its `as_<kind>` methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metaopt import plugins

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, **hparams: Any):
    """The learnable `name` (built-in, or a plugin's import path) with these hyperparameters."""
    if plugins.is_import_path(name):
        factory = plugins.load(name, "meta-objective")
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


@dataclasses.dataclass(frozen=True)
class AdamSchedule:
    """Adam's learning-rate schedule, learned (the PES paper's §5): θ is log(learning rate) at
    `knots` points spread evenly over the run, linearly interpolated in between, so one θ serves
    runs of any length. Starts constant at `init_lr`."""

    knots: int = 8
    init_lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    name = "adam_schedule"
    kind = "schedule"
    description = "Adam with a learned learning-rate schedule (log-rate at evenly spaced knots)"

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init_theta(self, key: jax.Array) -> dict[str, jax.Array]:
        del key  # a constant start
        return {"log_lr": jnp.full((self.knots,), jnp.log(self.init_lr), jnp.float32)}

    def as_schedule(self, theta: dict, num_steps: int) -> optax.Schedule:
        """optax schedule: step count → learning rate, for `optax.adam(schedule)` over `num_steps`."""
        log_lr = jnp.asarray(theta["log_lr"], jnp.float32)
        points = jnp.linspace(0.0, 1.0, self.knots)

        def schedule(count):
            fraction = jnp.clip(jnp.asarray(count, jnp.float32) / max(num_steps - 1, 1), 0.0, 1.0)
            return jnp.exp(jnp.interp(fraction, points, log_lr))

        return schedule

    def as_optax(self, theta: dict, num_steps: int) -> optax.GradientTransformation:
        """Adam under this schedule: the optimizer the schedule was trained for."""
        return optax.adam(self.as_schedule(theta, num_steps), b1=self.b1, b2=self.b2, eps=self.eps)

    def objective(self, task, num_steps: int):
        return ScheduleTraining(task, self, num_steps)


@dataclasses.dataclass(frozen=True)
class ScheduleTraining:
    """Adam under a schedule of θ training a task; the loss is the task's training loss."""

    task: Any
    schedule: AdamSchedule
    num_steps: int

    def init_state(self, key: jax.Array, theta):
        params = self.task.init(jax.random.fold_in(key, 0))
        return params, self.schedule.as_optax(theta, self.num_steps).init(params)

    def step(self, theta, state, key: jax.Array):
        params, opt_state = state
        batch_key, loss_key = jax.random.split(key)
        batch = self.task.batch(batch_key, "train")
        loss, grads = jax.value_and_grad(self.task.loss)(params, loss_key, batch)
        updates, opt_state = self.schedule.as_optax(theta, self.num_steps).update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss


# A pytree: the task's arrays are leaves, the schedule and the run's length settings.
jax.tree_util.register_dataclass(ScheduleTraining, data_fields=["task"],
                                 meta_fields=["schedule", "num_steps"])

register(AdamSchedule.name, AdamSchedule)
