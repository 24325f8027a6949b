"""`nominal_mlp` in torch: the step of metaopt/optimizers/nominal_mlp.py (whose docstring says
what each piece is and why), element for element, so a JAX-trained θ does here what it does there.

The hyperparameters are the artifact's, checked and defaulted by the JAX optimizer's own class.
The peak rate (`learning_rate`) follows the same warm-up, stable phase and cosine decay over `num_steps`;
a group's `lr` multiplies the whole step on top (torch schedulers), 1 by default.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metaopt.optimizers import nominal_mlp as reference
from metaopt.torch.base import LearnedOptimizer, fan_in, kernel_scalars, mlp_columns

K = len(reference.MOM_DECAYS)


class NominalMLP(LearnedOptimizer):
    """Adam on a cosine schedule, a bounded learned correction and a learned per-tensor law."""

    jax_class = reference.NominalMLP

    def __init__(self, params, theta: Any, hparams: dict[str, Any], num_steps: int,
                 learning_rate: float | None = None, lr: float = 1.0, weight_decay: float | None = None,
                 compile: bool = False):
        """`learning_rate`: the peak rate of the schedule (default: the artifact's)."""
        super().__init__(params, theta, hparams, num_steps, lr=lr, weight_decay=weight_decay, compile=compile)
        if self.config.rate_estimate > 0:
            raise NotImplementedError("nominal_mlp's rate_estimate (Prodigy's d_t) is not in metaopt.torch "
                                      "yet; no published version uses it")
        if self.config.dmd_history:
            raise NotImplementedError(
                "nominal_mlp's dmd_history (features from a dynamic mode decomposition of recent steps) is "
                "not in metaopt.torch; no published version uses it. Use this artifact with optax "
                "(metaopt.load(...).as_optax), or train one with dmd_history: 0 for PyTorch")
        base = self.config.learning_rate if learning_rate is None else learning_rate
        if not (isinstance(base, int | float) and math.isfinite(base) and base > 0):
            raise ValueError(f"nominal_mlp needs a positive, finite learning_rate, got {learning_rate!r}")
        self.base = float(base)
        self.warmup_steps = int(round(self.config.warmup * num_steps))
        self.stable_steps = int(round(self.config.stable * num_steps))

    def schedule(self, count: int) -> float:
        """The peak rate with a linear warm-up from 0, held for the stable steps, then cosine decay
        to 0 at num_steps (optax's linear, constant and cosine_decay schedules joined, as the JAX
        optimizer's `cosine_schedule`)."""
        warm, decay_from = self.warmup_steps, self.warmup_steps + self.stable_steps
        if count < warm:
            return self.base * count / warm
        if count < decay_from:
            return self.base
        decay_steps = max(self.num_steps - decay_from, 1)
        progress = min(count - decay_from, decay_steps) / decay_steps
        return self.base * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _update(self, p, grad, state: dict, group: dict, theta: Any, loss) -> None:
        del loss  # not a feature of nominal_mlp
        cfg, f32 = self.config, torch.float32
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["momenta"] = torch.zeros((K, *p.shape), dtype=f32, device=p.device)
            state["rms"] = torch.zeros(p.shape, dtype=f32, device=p.device)
            if cfg.rate_adaptation > 0:
                state["log_rate"] = torch.full((), cfg.rate_init, dtype=f32, device=p.device)
        # Everything that changes from step to step goes in as a tensor, so that a compiled kernel
        # is compiled once per shape, not once per step.
        count = int(state["step"])
        lr = self.schedule(count)
        held = cfg.rate_after_warmup and count < self.warmup_steps
        log_fan_in = math.log10(max(fan_in(p), 1)) - 1.5
        scalars = [count + 1, count / self.num_steps, lr, lr / self.base, float(held), group["lr"],
                   group["weight_decay"], log_fan_in, float(p.ndim <= 1)]
        scalars = kernel_scalars(scalars, p.device)
        # p.detach(): the same storage, as a plain tensor (dynamo fixes a Parameter's shape).
        self._kernel(p)(p.detach(), grad, state["momenta"], state["rms"], state.get("log_rate"), scalars,
                        theta)
        state["step"] += 1

    def _make_kernel(self, chunk: int | None):
        """The step of one tensor, a function of tensors alone (`scalars`: see `_update`)."""
        cfg = self.config
        n, clip = reference.NUM_ELEMENT_FEATURES, reference.RATIO_CLIP

        def kernel(p, grad, m, v, log_rate, scalars, theta):
            t, run_fraction, lr, lr_fraction, held, group_lr, weight_decay, log_fan_in, is_vector = scalars
            decays = torch.tensor(reference.MOM_DECAYS, dtype=torch.float32, device=p.device)
            decays = decays.reshape(-1, *[1] * p.ndim)
            mom_fix = 1.0 - decays ** t
            rms_fix = 1.0 - torch.tensor(cfg.rms_decay, dtype=torch.float32, device=p.device) ** t
            g, x = grad.to(torch.float32), p.to(torch.float32)
            rate = 1.0
            if log_rate is not None:
                pace = lr_fraction if cfg.rate_on_schedule else 1.0
                log_rate.copy_(_adapt_rate(cfg, log_rate, g, m[reference.ADAM_MOMENTUM], v, held, pace))
                rate = torch.exp(log_rate)
            m.mul_(decays).add_((1 - decays) * g)
            v.mul_(cfg.rms_decay).add_((1 - cfg.rms_decay) * torch.square(g))
            denom = torch.sqrt(v / rms_fix) + cfg.eps
            ratios = m / mom_fix / denom
            direction = ratios[reference.ADAM_MOMENTUM]
            p_rms = _rms(x)
            tensor_features = torch.stack([torch.log10(p_rms + 1e-8) + 1.0, log_fan_in, is_vector])
            step_features = torch.stack([run_fraction, torch.log10(t) / 4.0, lr_fraction])
            features = torch.cat([torch.clamp(g / denom, -clip, clip).reshape(1, -1),
                                  torch.clamp(ratios, -clip, clip).reshape(K, -1),
                                  (x / torch.clamp(p_rms, min=1e-30)).reshape(1, -1)])
            mlp, law = theta["mlp"], theta["tensor"]
            bias = mlp["b0"] + torch.cat([tensor_features, step_features]) @ mlp["w0"][n:]
            out = mlp_columns([mlp["w0"][:n], mlp["w1"]], [bias, mlp["b1"]], features, chunk)
            out = out[0].reshape(p.shape)
            if cfg.elementwise_correction:
                correction = cfg.correction_bound * direction * torch.tanh(out)
            else:
                bound = cfg.correction_bound * (_rms(direction) if cfg.relative_correction else 1.0)
                correction = out * torch.clamp(bound / torch.clamp(_rms(out), min=1e-30), max=1.0)
            z = law["b"] + law["w"] @ tensor_features
            multiplier = torch.exp(reference.MULTIPLIER_RANGE * torch.tanh(z / reference.MULTIPLIER_RANGE))
            update = -lr * (rate * multiplier * (direction + correction) + weight_decay * x)
            p.add_((update * group_lr).to(p.dtype))

        return kernel


def _adapt_rate(cfg, log_rate, g, m_prev, v_prev, held, pace):
    """One hypergradient step on log α_T (the JAX optimizer's `_adapt_rate`); `held` is 1 while
    the rate is held (through the warm-up, with rate_after_warmup)."""
    d_prev = m_prev / (torch.sqrt(v_prev) + 1e-30)
    cos = torch.dot(g.reshape(-1), d_prev.reshape(-1)) / (torch.linalg.vector_norm(g)
                                                          * torch.linalg.vector_norm(d_prev) + 1e-30)
    step = torch.where(held > 0, 0.0, cfg.rate_adaptation * (cos - cfg.rate_threshold) * pace)
    return torch.clamp(log_rate + step, -cfg.rate_range, cfg.rate_range)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.mean(torch.square(x))) if x.numel() else torch.zeros((), device=x.device)
