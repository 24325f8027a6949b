"""The task zoo: families of inner training problems for meta-training learned optimizers.

>>> import jax, task_zoo
>>> fam = task_zoo.family("quadratic", dims=(8,))
>>> spec = fam.sample(jax.random.key(0))       # a TaskSpec: JSON-serialisable
>>> t = task_zoo.task(spec)                     # a Task: a jittable pytree
>>> params = t.init(jax.random.key(1))
>>> loss = t.loss(params, jax.random.key(2), t.batch(jax.random.key(3), task_zoo.TRAIN))
"""

from task_zoo.base import SPLITS, TEST, TRAIN, Task, TaskCost, TaskFamily, TaskSpec, batches
from task_zoo.mlp import MLPFamily
from task_zoo.quadratic import QuadraticFamily
from task_zoo.registry import families, family, register, task

register(QuadraticFamily.name, QuadraticFamily)
register(MLPFamily.name, MLPFamily)

__all__ = [
    "SPLITS",
    "TEST",
    "TRAIN",
    "MLPFamily",
    "QuadraticFamily",
    "Task",
    "TaskCost",
    "TaskFamily",
    "TaskSpec",
    "batches",
    "families",
    "family",
    "register",
    "task",
]
