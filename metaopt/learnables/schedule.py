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
    runs of any length. Starts constant at `init_lr`.

    With `weight_decay` > 0 the optimizer is AdamW and its decoupled weight decay has a learned
    schedule too (θ's `log_wd`, the same knots), starting constant at `weight_decay`. Weight decay
    is for generalisation, so such a job should take its meta-loss `held_out`: each step's loss is
    then the task's loss on a batch of its test split after the step, not the training loss
    (which weight decay only raises)."""

    knots: int = 8
    init_lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # > 0: learn a weight-decay schedule too, from this constant
    held_out: bool = False  # the meta-loss: the training loss, or a held-out batch's after the step

    name = "adam_schedule"
    kind = "schedule"
    usage = "as_schedule(num_steps=1000)"  # of an artifact: what `metaopt train` prints
    description = "Adam with a learned learning-rate (and weight-decay) schedule (log values at knots)"

    def __post_init__(self):
        valid = isinstance(self.knots, int) and self.knots >= 2 and self.init_lr > 0
        if not (valid and self.weight_decay >= 0):
            raise ValueError(f"adam_schedule needs knots >= 2, init_lr > 0 and weight_decay >= 0, got "
                             f"knots={self.knots}, init_lr={self.init_lr}, weight_decay={self.weight_decay}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init_theta(self, key: jax.Array) -> dict[str, jax.Array]:
        del key  # a constant start
        theta = {"log_lr": jnp.full((self.knots,), jnp.log(self.init_lr), jnp.float32)}
        if self.weight_decay > 0:
            theta["log_wd"] = jnp.full((self.knots,), jnp.log(self.weight_decay), jnp.float32)
        return theta

    def _interpolated(self, log_values, num_steps: int) -> optax.Schedule:
        log_values, points = jnp.asarray(log_values, jnp.float32), jnp.linspace(0.0, 1.0, self.knots)

        def schedule(count):
            fraction = jnp.clip(jnp.asarray(count, jnp.float32) / max(num_steps - 1, 1), 0.0, 1.0)
            return jnp.exp(jnp.interp(fraction, points, log_values))

        return schedule

    def as_schedule(self, theta: dict, num_steps: int) -> optax.Schedule:
        """optax schedule: step count → learning rate, for `optax.adam(schedule)` over `num_steps`."""
        return self._interpolated(theta["log_lr"], num_steps)

    def as_weight_decay_schedule(self, theta: dict, num_steps: int) -> optax.Schedule:
        """optax schedule: step count → AdamW's decoupled weight decay (its coefficient λ: the
        step subtracts learning rate × λ × params)."""
        if "log_wd" not in theta:
            raise ValueError("this schedule learned no weight decay (weight_decay was 0): it is Adam's "
                             "learning rate alone, as_schedule(num_steps)")
        return self._interpolated(theta["log_wd"], num_steps)

    def as_optax(self, theta: dict, num_steps: int) -> optax.GradientTransformation:
        """Adam under this schedule (AdamW under both, with a weight-decay schedule): the optimizer
        the schedule was trained for."""
        if "log_wd" not in theta:
            return optax.adam(self.as_schedule(theta, num_steps), b1=self.b1, b2=self.b2, eps=self.eps)
        return optax.chain(optax.scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps),
                           _scheduled_weight_decay(self.as_weight_decay_schedule(theta, num_steps)),
                           optax.scale_by_learning_rate(self.as_schedule(theta, num_steps)))

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
        params = optax.apply_updates(params, updates)
        if self.schedule.held_out:  # the same keys, on the test split
            loss = self.task.loss(params, loss_key, self.task.batch(batch_key, "test"))
        return (params, opt_state), loss


def _scheduled_weight_decay(schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax.add_decayed_weights with a coefficient that follows `schedule` over the steps."""

    def update(updates, count, params):
        decay = schedule(count)
        return jax.tree.map(lambda u, p: u + decay * p, updates, params), optax.safe_increment(count)

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


# A pytree: the task's arrays are leaves, the schedule and the run's length settings.
jax.tree_util.register_dataclass(ScheduleTraining, data_fields=["task"],
                                 meta_fields=["schedule", "num_steps"])
