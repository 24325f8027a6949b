"""A task mixture: which family to sample next, by weight or balanced by cost.

With `balance="weight"` a family is chosen with probability ∝ its weight. With
`balance="cost"` the weight is divided by the family's mean estimated FLOPs per inner step
(over `cost_samples` sampled specs), so that, in expectation, each family receives compute in
proportion to its weight rather than being sampled in proportion to it: a big transformer no
longer eats the budget of the quadratics beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from metaopt.task_zoo.augment import Augmentation
from metaopt.task_zoo.base import TaskFamily, TaskSpec
from metaopt.task_zoo.registry import cost

BALANCES = ("weight", "cost")


class Mixture:
    def __init__(self, families: Sequence[TaskFamily], weights: Sequence[float], balance: str = "weight",
                 augmentations: Sequence[Augmentation | None] | None = None, cost_samples: int = 16):
        if len(families) != len(weights) or not families:
            raise ValueError("a mixture needs one weight per family, and at least one family")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.families = list(families)
        self.augmentations = list(augmentations or [None] * len(families))
        weights = np.asarray(weights, np.float64)
        if balance == "cost":
            weights = weights / np.array([self.mean_flops(f, cost_samples) for f in self.families])
        self.probabilities = weights / weights.sum()

    @staticmethod
    def mean_flops(family: TaskFamily, samples: int) -> float:
        """Mean estimated FLOPs per inner step over `samples` specs (fixed keys: reproducible)."""
        keys = jax.random.split(jax.random.key(0), samples)
        return float(np.mean([cost(family.sample(k)).flops_per_step for k in keys]))

    def sample(self, key: jax.Array) -> TaskSpec:
        """A family by the mixture's probabilities, a spec from it, and its augmentation."""
        choice_key, spec_key, augment_key = jax.random.split(key, 3)
        index = int(jax.random.choice(choice_key, len(self.families), p=self.probabilities))
        spec = self.families[index].sample(spec_key)
        augmentation = self.augmentations[index]
        return augmentation.apply(augment_key, spec) if augmentation else spec
