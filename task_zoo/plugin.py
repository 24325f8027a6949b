"""Task families by import path (`my_tasks:RosenbrockFamily`), as the zoo's own.

A plugin family is any callable `factory(**kwargs)` returning an object with the TaskFamily
interface (`sample`, `task_fn`, `cost`; `name` and `description` optional). The zoo shows it
through `PluginFamily`, whose specs are named by the import path, so that `task_zoo.task(spec)`
in a worker, an evaluation or a log reader finds the plugin again wherever it is importable.
`check(path, kwargs)` runs the interface on one tiny sample before a job starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metaopt.plugins import PluginError
from metaopt.task_zoo.base import SPLITS, TRAIN, TaskCost, TaskFamily, TaskSpec


class PluginFamily:
    """The plugin family `inner`, its specs named `path` outside and its own name inside."""

    def __init__(self, path: str, inner: TaskFamily):
        self.name, self.inner = path, inner
        self.description = getattr(inner, "description", f"plugin {path}")

    def _inner_spec(self, spec: TaskSpec) -> TaskSpec:
        return TaskSpec(getattr(self.inner, "name", self.name), spec.kwargs)

    def sample(self, key: jax.Array) -> TaskSpec:
        spec = self.inner.sample(key)
        if not isinstance(spec, TaskSpec):
            raise PluginError(f"task family {self.name!r}: sample(key) returned a "
                              f"{type(spec).__name__}, not a task_zoo.TaskSpec")
        return TaskSpec(self.name, spec.kwargs)

    def task_fn(self, spec: TaskSpec):
        return self.inner.task_fn(self._inner_spec(spec))

    def cost(self, spec: TaskSpec) -> TaskCost:
        return self.inner.cost(self._inner_spec(spec))


def check(family: PluginFamily) -> None:
    """Run the family's interface on one sample as a worker would (sample, build, init, a batch
    of each split, the loss and its gradient under jit with the task an argument, the cost);
    a PluginError names the first step that fails and why."""
    key, name = jax.random.key(0), f"task family {family.name!r}"
    step = "sample(key)"
    try:
        spec = family.sample(key)
        step = "its spec's kwargs as JSON"
        TaskSpec.from_json(spec.to_json())
        step = "task_fn(spec)"
        task = family.task_fn(spec)
        step = "task.init(key)"
        params = task.init(key)
        step = "task.batch(key, split)"
        batches = {split: task.batch(key, split) for split in SPLITS}
        step = "jax.jit of task.loss, the task an argument (a pytree)"
        loss = jax.jit(lambda t, p, b: t.loss(p, key, b))(task, params, batches[TRAIN])
        if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
            raise PluginError(f"{name}: task.loss must return a scalar float, got "
                              f"{jnp.result_type(loss)}{list(jnp.shape(loss))}")
        step = "jax.grad of task.loss"
        grads = jax.jit(lambda t, p, b: jax.grad(t.loss)(p, key, b))(task, params, batches[TRAIN])
        step = "cost(spec)"
        cost = family.cost(spec)
    except PluginError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: say where it broke
        raise PluginError(f"{name}: {step} failed: {type(err).__name__}: {err}") from None
    finite = [bool(jnp.all(jnp.isfinite(x))) for x in [loss, *jax.tree.leaves(grads)]]
    if not all(finite):
        raise PluginError(f"{name}: the loss or its gradient at init is not finite (loss {float(loss)})")
    if not isinstance(cost, TaskCost):
        raise PluginError(f"{name}: cost(spec) returned a {type(cost).__name__}, not a task_zoo.TaskCost")
