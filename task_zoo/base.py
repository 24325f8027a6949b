"""Interfaces of the task zoo: TaskSpec, Task and TaskFamily.

A *task* is one inner training problem (a model, its data and its loss). A *task family* is a
distribution over tasks; `TaskFamily.sample(key)` draws a `TaskSpec`, and `task_zoo.task(spec)`
builds the `Task`. A `TaskSpec` is what travels (messages, logs, manifests); a `Task` is what
computes.

Tasks are pytrees (``flax.struct.dataclass``): their arrays (data sets, curvatures, targets) are
leaves and their sizes are static fields. Jitted code therefore takes a task as an ordinary
argument, and two tasks of the same shape share one compiled program: a worker that re-samples
a task of a known shape compiles nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import jax

Params = Any  # a pytree of arrays
Batch = Any  # a pytree of arrays

TRAIN = "train"
TEST = "test"
SPLITS = (TRAIN, TEST)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task family's name plus JSON-serialisable keyword arguments for its `task_fn`."""

    name: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), so equal specs serialise to equal strings."""
        return json.dumps({"name": self.name, "kwargs": dict(self.kwargs)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        obj = json.loads(text)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ValueError(f"a task spec must be a JSON object with a 'name', got {text!r}")
        kwargs = obj.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ValueError(f"task spec kwargs must be a JSON object, got {kwargs!r}")
        return cls(obj["name"], kwargs)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskSpec) and self.to_json() == other.to_json()


class Task(Protocol):
    """One inner problem. Every method is pure and jittable; a Task is a pytree.

    A task does not carry its `TaskSpec`: the spec's values (seeds, curvatures) must not be
    static pytree data, or every sampled task would compile anew. Keep the spec beside it.
    """

    def init(self, key: jax.Array) -> Params:
        """Fresh inner parameters."""

    def loss(self, params: Params, key: jax.Array, batch: Batch) -> jax.Array:
        """Scalar float32 loss of `params` on `batch` (`key` for stochastic layers)."""

    def batch(self, key: jax.Array, split: str) -> Batch:
        """One minibatch drawn from the preloaded data of `split` ('train' or 'test')."""


def batches(task: Task, key: jax.Array, split: str) -> Iterator[Batch]:
    """An endless stream of minibatches of `split`, for plain Python training loops."""
    while True:
        key, sub = jax.random.split(key)
        yield task.batch(sub, split)


@dataclasses.dataclass(frozen=True)
class TaskCost:
    """What one inner training step of a task costs, estimated from its spec alone."""

    parameters: int  # number of trainable scalars
    flops_per_step: float  # forward and backward on one training batch (≈ 3 × forward)


class TaskFamily(Protocol):
    """A distribution over tasks of one kind.

    Everything needed to build a task goes into its spec's kwargs (sizes, data set name or
    URI, seeds), because `task_zoo.task(spec)` builds it with the family's default settings.
    """

    name: str
    description: str  # one line, for `metaopt list tasks`

    def sample(self, key: jax.Array) -> TaskSpec:
        """Draw one task's spec (sizes, settings, data seed)."""

    def task_fn(self, spec: TaskSpec) -> Task:
        """Build the task a spec describes."""

    def cost(self, spec: TaskSpec) -> TaskCost:
        """Estimated size and compute of one inner step of the task `spec` describes."""
