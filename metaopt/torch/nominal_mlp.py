"""`nominal_mlp` in torch: the step of metaopt/optimizers/nominal_mlp.py (whose docstring says
what each piece is and why), element for element, so a JAX-trained θ does here what it does there.

The hyperparameters are the artifact's, checked and defaulted by the JAX optimizer's own class.
The peak rate (`learning_rate`) follows the same warm-up and cosine decay over `num_steps`;
a group's `lr` multiplies the whole step on top (torch schedulers), 1 by default.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metaopt.optimizers import nominal_mlp as reference
from metaopt.torch.base import LearnedOptimizer, fan_in, mlp_columns

K = len(reference.MOM_DECAYS)


class NominalMLP(LearnedOptimizer):
    """Adam on a cosine schedule, a bounded learned correction and a learned per-tensor law."""

    jax_class = reference.NominalMLP

    def __init__(self, params, theta: Any, hparams: dict[str, Any], num_steps: int,
                 learning_rate: float | None = None, lr: float = 1.0, weight_decay: float | None = None):
        """`learning_rate`: the peak rate of the schedule (default: the artifact's)."""
        super().__init__(params, theta, hparams, num_steps, lr=lr, weight_decay=weight_decay)
        if self.config.rate_estimate > 0:
            raise NotImplementedError("nominal_mlp's rate_estimate (Prodigy's d_t) is not in metaopt.torch "
                                      "yet; no published version uses it")
        base = self.config.learning_rate if learning_rate is None else learning_rate
        if not (isinstance(base, int | float) and math.isfinite(base) and base > 0):
            raise ValueError(f"nominal_mlp needs a positive, finite learning_rate, got {learning_rate!r}")
        self.base = float(base)
        self.warmup_steps = int(round(self.config.warmup * num_steps))

    def schedule(self, count: int) -> float:
        """The peak rate with a linear warm-up from 0, then cosine decay to 0 at num_steps (optax's
        linear_schedule joined to cosine_decay_schedule, as the JAX optimizer's)."""
        warm = self.warmup_steps
        if count < warm:
            return self.base * count / warm
        decay_steps = max(self.num_steps - warm, 1)
        return self.base * 0.5 * (1.0 + math.cos(math.pi * min(count - warm, decay_steps) / decay_steps))

    def _update(self, p, grad, state: dict, group: dict, theta: Any, loss) -> None:
        del loss  # not a feature of nominal_mlp
        cfg, f32 = self.config, torch.float32
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["momenta"] = torch.zeros((K, *p.shape), dtype=f32, device=p.device)
            state["rms"] = torch.zeros(p.shape, dtype=f32, device=p.device)
            if cfg.rate_adaptation > 0:
                state["log_rate"] = torch.full((), cfg.rate_init, dtype=f32, device=p.device)
        def scalar(value) -> torch.Tensor:
            return torch.tensor(value, dtype=f32, device=p.device)

        count = int(state["step"])
        t = scalar(count + 1)
        lr = self.schedule(count)
        lr_fraction = lr / self.base
        step_features = torch.stack([scalar(count / self.num_steps), torch.log10(t) / 4.0,
                                     scalar(lr_fraction)])
        decays = torch.tensor(reference.MOM_DECAYS, dtype=f32, device=p.device).reshape(-1, *[1] * p.ndim)
        mom_fix = 1.0 - decays ** t
        rms_fix = 1.0 - scalar(reference.RMS_DECAY) ** t

        g, x = grad.to(f32), p.to(f32)
        m, v = state["momenta"], state["rms"]
        rate = 1.0
        if cfg.rate_adaptation > 0:
            held = cfg.rate_after_warmup and count < self.warmup_steps
            pace = lr_fraction if cfg.rate_on_schedule else 1.0
            previous = m[reference.ADAM_MOMENTUM]
            state["log_rate"] = self._adapt_rate(state["log_rate"], g, previous, v, held, pace)
            rate = torch.exp(state["log_rate"])
        m.mul_(decays).add_((1 - decays) * g)
        v.mul_(reference.RMS_DECAY).add_((1 - reference.RMS_DECAY) * torch.square(g))
        denom = torch.sqrt(v / rms_fix) + cfg.eps
        ratios = m / mom_fix / denom
        direction = ratios[reference.ADAM_MOMENTUM]
        p_rms = _rms(x)
        log_fan_in = math.log10(max(fan_in(p), 1))
        tensor_features = torch.stack([torch.log10(p_rms + 1e-8) + 1.0, scalar(log_fan_in - 1.5),
                                       scalar(float(p.ndim <= 1))])
        clip = reference.RATIO_CLIP
        features = torch.cat([torch.clamp(g / denom, -clip, clip).reshape(1, -1),
                              torch.clamp(ratios, -clip, clip).reshape(K, -1),
                              (x / torch.clamp(p_rms, min=1e-30)).reshape(1, -1)])
        mlp, law = theta["mlp"], theta["tensor"]
        n = reference.NUM_ELEMENT_FEATURES
        bias = mlp["b0"] + torch.cat([tensor_features, step_features]) @ mlp["w0"][n:]
        out = mlp_columns([mlp["w0"][:n], mlp["w1"]], [bias, mlp["b1"]], features)[0].reshape(p.shape)
        if cfg.elementwise_correction:
            correction = cfg.correction_bound * direction * torch.tanh(out)
        else:
            bound = cfg.correction_bound * (_rms(direction) if cfg.relative_correction else 1.0)
            correction = out * torch.clamp(bound / torch.clamp(_rms(out), min=1e-30), max=1.0)
        z = law["b"] + law["w"] @ tensor_features
        multiplier = torch.exp(reference.MULTIPLIER_RANGE * torch.tanh(z / reference.MULTIPLIER_RANGE))
        update = -lr * (rate * multiplier * (direction + correction) + group["weight_decay"] * x)
        p.add_(update.to(p.dtype), alpha=group["lr"])
        state["step"] += 1

    def _adapt_rate(self, log_rate, g, m_prev, v_prev, held: bool, pace: float):
        """One hypergradient step on log α_T (the JAX optimizer's `_adapt_rate`)."""
        cfg = self.config
        d_prev = m_prev / (torch.sqrt(v_prev) + 1e-30)
        cos = torch.dot(g.reshape(-1), d_prev.reshape(-1)) / (torch.linalg.vector_norm(g)
                                                              * torch.linalg.vector_norm(d_prev) + 1e-30)
        step = 0.0 if held else cfg.rate_adaptation * (cos - cfg.rate_threshold) * pace
        return torch.clamp(log_rate + step, -cfg.rate_range, cfg.rate_range)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.mean(torch.square(x))) if x.numel() else torch.zeros((), device=x.device)
