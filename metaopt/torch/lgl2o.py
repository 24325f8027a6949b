"""`lgl2o` in torch: the loss guard of metaopt/optimizers/lgl2o.py around a learned optimizer.

Both the learned optimizer and the fallback propose an update from the same gradient (both
states advance every step, as in the paper); the guard keeps the learned one unless the
fallback's predicts a lower loss: by Σ⟨g, u⟩ by default, or, given a closure as
`torch.optim.LBFGS` takes one, by the loss the closure returns at each candidate point (the
paper's exact rule: two more forward and backward passes a step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from metaopt.optimizers.lgl2o import LGL2O as Reference  # (metaopt.optimizers.lgl2o is the factory)
from metaopt.optimizers.lookahead import spec_of
from metaopt.torch.base import LearnedOptimizer

# Hand-designed fallbacks and their torch counterparts (the same update rules as optax's).
_FALLBACKS: dict[str, Callable] = {
    "adam": lambda params, h: torch.optim.Adam(params, lr=h["learning_rate"], betas=(h["b1"], h["b2"]),
                                               eps=h["eps"]),
    "adamw": lambda params, h: torch.optim.AdamW(params, lr=h["learning_rate"], betas=(h["b1"], h["b2"]),
                                                 eps=h["eps"], weight_decay=h["weight_decay"]),
    "sgd": lambda params, h: torch.optim.SGD(params, lr=h["learning_rate"]),
    "momentum": lambda params, h: torch.optim.SGD(params, lr=h["learning_rate"], momentum=h["momentum"],
                                                  nesterov=h["nesterov"]),
}


class LGL2O(LearnedOptimizer):
    """Loss-guarded learned optimizer; `learned_steps` counts the steps the learned update won."""

    jax_class = Reference

    def __init__(self, params, theta: Any, hparams: dict[str, Any], num_steps: int, lr: float = 1.0,
                 weight_decay: float | None = None):
        from metaopt.torch import ARCHITECTURES  # the learned optimizers this one wraps

        super().__init__(params, theta, hparams, num_steps, lr=lr, weight_decay=weight_decay)
        flat = [p for group in self.param_groups for p in group["params"]]

        def build(spec: dict, spec_theta) -> torch.optim.Optimizer:
            if spec["name"] in _FALLBACKS:
                return _FALLBACKS[spec["name"]](flat, spec["hparams"])
            if spec["name"] not in ARCHITECTURES:
                raise NotImplementedError(f"lgl2o around {spec['name']!r}: metaopt.torch cannot run it yet")
            return ARCHITECTURES[spec["name"]](flat, spec_theta, spec["hparams"], num_steps)

        self.learned = build(spec_of(self.config.learned_optimizer), theta)
        fallback = self.config.fallback  # a learned fallback runs with its initial θ, as in JAX (key 0)
        initial = jax.tree.map(np.asarray, fallback.init(jax.random.key(0))) if fallback.learned else None
        self.fallback = build(spec_of(fallback), initial)
        self.learned_steps = 0

    def _config(self, hparams: dict[str, Any]) -> Reference:
        # The artifact's hparams are {"learned": spec, "fallback": spec}, as lgl2o(...) takes them.
        return Reference(learned_optimizer=hparams.get("learned"), fallback=hparams.get("fallback"))

    @torch.no_grad()
    def step(self, closure=None, loss=None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = self._with_gradients()
        start = [p.detach().clone() for p, _ in items]
        grads = [p.grad.detach().clone() for p, _ in items]
        candidates = []
        for optimizer in (self.learned, self.fallback):
            if isinstance(optimizer, LearnedOptimizer):
                optimizer.step(loss=loss)
            else:  # a torch.optim fallback
                optimizer.step()
            candidates.append([p.detach() - s for (p, _), s in zip(items, start, strict=True)])
            for (p, _), s, g in zip(items, start, grads, strict=True):
                p.copy_(s)
                p.grad = g.clone()  # the fallback sees the same gradient
        scores = [self._score(update, items, start, grads, closure) for update in candidates]
        keep_learned = bool(scores[0] <= scores[1])  # False when the learned score is NaN
        self.learned_steps += keep_learned
        chosen = candidates[0 if keep_learned else 1]
        for (p, group), s, u in zip(items, start, chosen, strict=True):
            p.copy_(s + group["lr"] * (u - group["weight_decay"] * s.to(u.dtype)).to(p.dtype))
        return loss

    @staticmethod
    def _score(update, items, start, grads, closure) -> float:
        if closure is None:  # first-order prediction of the loss change
            return float(sum(torch.dot(g.reshape(-1).float(), u.reshape(-1).float()) for g, u in
                             zip(grads, update, strict=True)))
        for (p, _), s, u in zip(items, start, update, strict=True):
            p.copy_(s + u)
        with torch.enable_grad():
            value = float(closure().detach())
        for (p, _), s, g in zip(items, start, grads, strict=True):
            p.copy_(s)
            p.grad = g
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"learned": self.learned.state_dict(), "fallback": self.fallback.state_dict(),
                "learned_steps": self.learned_steps, "param_groups": super().state_dict()["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.learned.load_state_dict(state_dict["learned"])
        self.fallback.load_state_dict(state_dict["fallback"])
        self.learned_steps = int(state_dict["learned_steps"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
