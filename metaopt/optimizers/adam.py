"""Adam (Kingma & Ba, 2015) as a metaopt `Optimizer`: a hand-designed baseline with θ = {}.

State: optax's ScaleByAdamState, 2 float32 per parameter (first and second moments).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class Adam:
    """Adam with fixed hyperparameters; `as_optax` ignores θ and `num_steps`."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    name = "adam"  # class attribute, not a dataclass field
    description = "Adam (Kingma & Ba 2015), optax.adam"
    learned = False

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init(self, key: jax.Array) -> dict:
        del key  # nothing to learn
        return {}

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        del theta, num_steps
        return optax.with_extra_args_support(
            optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps)
        )
