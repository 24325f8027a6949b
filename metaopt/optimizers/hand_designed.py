"""Hand-designed baselines as metaopt `Optimizer`s: thin wrappers over optax, θ = {}.

Each class is a frozen dataclass whose fields are the optimizer's hyperparameters (with the
usual defaults) and carries a `search_space` class attribute that `metaopt.tuning` samples
from: `{hparam: (kind, low, high)}` with kind "log_uniform" or "uniform", or
`("choice", [values, ...])`. The spaces cover the main hyperparameters only; the rest keep their
defaults. State floats per parameter are those of the optax implementation:

  name      reference                                         state floats / parameter
  sgd       Robbins & Monro 1951                              0
  adam      Kingma & Ba, "Adam: A Method for Stochastic       2 (first and second moments)
            Optimization", ICLR 2015
  adam_cosine Adam on a warm-up and cosine decay              2 (first and second moments)
            (Loshchilov & Hutter, "SGDR", ICLR 2017), β2 tuned
  momentum  Polyak 1964 (heavy ball); Nesterov 1983 /         1 (the velocity)
            Sutskever et al. 2013 (nesterov=True)
  adamw     Loshchilov & Hutter, "Decoupled Weight Decay      2 (first and second moments)
            Regularization", ICLR 2019
  lamb      You et al., "Large Batch Optimization for Deep    2 (first and second moments)
            Learning: Training BERT in 76 minutes", ICLR 2020
  lars      You, Gitman & Ginsburg, "Large Batch Training     1 (the momentum)
            of Convolutional Networks", arXiv:1708.03888, 2017

`learning_rate` (and the other float hyperparameters) may be jax arrays as well as Python
floats: the tuner passes traced values so that all its trials share one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import optax


def heavy_ball(momentum: Any) -> list[optax.GradientTransformation]:
    """[v = momentum·v + (1 - momentum)·update], or [] at momentum 0 (the curvature optimizers'
    convention, M-FAC's reference code's). `momentum` may be traced, hence the type check."""
    if isinstance(momentum, int | float) and momentum == 0:
        return []
    return [optax.ema(momentum, debias=False)]


def cosine_schedule(learning_rate: float, num_steps: int, warmup: float,
                    stable: float = 0.0) -> optax.Schedule:
    """Linear warm-up over `warmup` of the run, the peak held over the next `stable` of it, then
    cosine decay to 0 at `num_steps` (with `stable` > 0: warm-up, stable, decay; Hu et al. 2024)."""
    warm = int(round(warmup * num_steps))
    hold = int(round(stable * num_steps))
    pieces, boundaries = [], []
    if warm:
        pieces.append(optax.linear_schedule(0.0, learning_rate, warm))
        boundaries.append(warm)
    if hold:
        pieces.append(optax.constant_schedule(learning_rate))
        boundaries.append(warm + hold)
    pieces.append(optax.cosine_decay_schedule(learning_rate, max(num_steps - warm - hold, 1)))
    return optax.join_schedules(pieces, boundaries) if boundaries else pieces[0]


class _HandDesigned:
    """Shared plumbing: no meta-parameters, hparams = the dataclass fields."""

    learned = False
    search_space: ClassVar[dict[str, tuple]] = {}

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init(self, key: jax.Array) -> dict:
        del key  # nothing to learn
        return {}

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        del theta, num_steps  # fixed rule, no schedule
        # with_extra_args_support lets `update` accept (and ignore) loss= and friends.
        return optax.with_extra_args_support(self._optax())

    def _optax(self) -> optax.GradientTransformation:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SGD(_HandDesigned):
    """Plain gradient descent: update = -learning_rate · g."""

    learning_rate: float = 0.1

    name = "sgd"
    description = "stochastic gradient descent (Robbins & Monro 1951), optax.sgd"
    search_space: ClassVar[dict[str, tuple]] = {"learning_rate": ("log_uniform", 1e-4, 1.0)}

    def _optax(self):
        return optax.sgd(self.learning_rate)


@dataclasses.dataclass(frozen=True)
class Adam(_HandDesigned):
    """Adam with bias correction, optax.adam."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    name = "adam"
    description = "Adam (Kingma & Ba 2015), optax.adam"
    search_space: ClassVar[dict[str, tuple]] = {"learning_rate": ("log_uniform", 1e-5, 1e-1)}

    def _optax(self):
        return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps)


@dataclasses.dataclass(frozen=True)
class AdamCosine(Adam):
    """Adam on a linear warm-up over `warmup` of the run and a cosine decay to 0 at `num_steps`,
    tuned over its peak rate and β2. The reference optimizer's anchor is Adam on such a schedule
    with β2 0.9; measured against `adam` alone (a constant rate, β2 0.999, only the rate tuned), a
    learned optimizer would get credit for the schedule and β2, which any user can have for free."""

    warmup: float = 0.05  # fraction of the run

    name = "adam_cosine"
    description = "Adam with warm-up and cosine decay, rate and beta2 tuned (Loshchilov & Hutter 2017)"
    search_space: ClassVar[dict[str, tuple]] = {"learning_rate": ("log_uniform", 1e-5, 1e-1),
                                                "b2": ("uniform", 0.9, 0.999)}

    def __post_init__(self):
        if not 0 <= self.warmup < 1:
            raise ValueError(f"adam_cosine needs 0 <= warmup < 1 (a fraction of the run), got {self.warmup}")

    def as_optax(self, theta: Any, num_steps: int) -> optax.GradientTransformationExtraArgs:
        del theta
        rate = cosine_schedule(self.learning_rate, num_steps, self.warmup)
        return optax.with_extra_args_support(optax.adam(rate, b1=self.b1, b2=self.b2, eps=self.eps))


@dataclasses.dataclass(frozen=True)
class Momentum(_HandDesigned):
    """SGD with momentum, optax's convention (no dampening):

        v_t = momentum · v_{t-1} + g_t
        update = -lr · v_t                       (heavy ball)
        update = -lr · (g_t + momentum · v_t)    (nesterov=True)
    """

    # Default lr keeps the heavy ball overdamped (monotone loss) for curvatures h up to ~2:
    # lr·h <= (1 - √momentum)² ≈ 2.6e-3; the effective step lr/(1 - momentum) is still 1e-2.
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False

    name = "momentum"
    description = "SGD with heavy-ball or Nesterov momentum (Polyak 1964; Sutskever et al. 2013)"
    search_space: ClassVar[dict[str, tuple]] = {
        "learning_rate": ("log_uniform", 1e-4, 1.0),
        "momentum": ("uniform", 0.5, 0.99),
    }

    def _optax(self):
        return optax.sgd(self.learning_rate, momentum=self.momentum, nesterov=self.nesterov)


@dataclasses.dataclass(frozen=True)
class AdamW(_HandDesigned):
    """Adam with decoupled weight decay: update = -lr · (m̂/(√v̂ + eps) + weight_decay · p)."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4

    name = "adamw"
    description = "Adam with decoupled weight decay (Loshchilov & Hutter 2019), optax.adamw"
    search_space: ClassVar[dict[str, tuple]] = {
        "learning_rate": ("log_uniform", 1e-5, 1e-1),
        "weight_decay": ("log_uniform", 1e-6, 1e-1),
    }

    def _optax(self):
        return optax.adamw(
            self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay
        )


@dataclasses.dataclass(frozen=True)
class Lamb(_HandDesigned):
    """LAMB: the Adam(W) direction rescaled per tensor by the trust ratio ‖p‖ / ‖direction‖,
    so `learning_rate` is a relative step size per layer."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0

    name = "lamb"
    description = "layer-wise adaptive Adam for large batches (You et al. 2020), optax.lamb"
    search_space: ClassVar[dict[str, tuple]] = {
        "learning_rate": ("log_uniform", 1e-4, 1e-1),
        "weight_decay": ("log_uniform", 1e-6, 1e-1),
    }

    def _optax(self):
        return optax.lamb(
            self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay
        )


@dataclasses.dataclass(frozen=True)
class Lars(_HandDesigned):
    """LARS: momentum SGD on g rescaled per tensor by trust_coefficient · ‖p‖ / ‖g + wd·p‖.

    The default learning rate is large because the trust coefficient (1e-3) already makes the
    per-step relative change of each tensor ≈ learning_rate · 1e-3 (× 1/(1-momentum))."""

    learning_rate: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 1e-3
    nesterov: bool = False

    name = "lars"
    description = "layer-wise adaptive rate scaling (You et al. 2017), optax.lars"
    search_space: ClassVar[dict[str, tuple]] = {
        "learning_rate": ("log_uniform", 1e-2, 10.0),
        "weight_decay": ("log_uniform", 1e-6, 1e-2),
    }

    def _optax(self):
        return optax.lars(
            self.learning_rate,
            weight_decay=self.weight_decay,
            trust_coefficient=self.trust_coefficient,
            momentum=self.momentum,
            nesterov=self.nesterov,
        )
