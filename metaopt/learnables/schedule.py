"""`adam_schedule`: Adam's learning-rate schedule, meta-learned (the PES paper's §5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax


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
