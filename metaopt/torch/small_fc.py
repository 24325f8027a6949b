"""`small_fc` in torch: the step of metaopt/optimizers/small_fc.py (its docstring lists the 18
features and why), tensor by tensor. The JAX optimizer packs every tensor into chunks for speed;
the arithmetic per tensor is the same: Adafactor factors over the last two axes of the tensor in
JAX's order (`jax_view`), so rows and columns mean what they meant when θ was trained.
"""

from __future__ import annotations

from typing import Any

import torch

from metaopt.optimizers import small_fc as reference
from metaopt.torch.base import LearnedOptimizer, jax_view, mlp_columns, torch_view

_RATIOS = slice(9, 14)  # the Adam ratios m_k·rsqrt(v): scale-free, not normalised


class SmallFC(LearnedOptimizer):
    """A per-parameter MLP on momentum, second-moment and Adafactor features."""

    jax_class = reference.SmallFC

    def _update(self, p, grad, state: dict, group: dict, theta: Any, loss) -> None:
        del loss  # not a feature of small_fc
        f32, shape = torch.float32, jax_view(p).shape  # every array below is in JAX's order
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["momenta"] = torch.zeros((len(reference.MOM_DECAYS), *shape), dtype=f32, device=p.device)
            state["rms"] = torch.zeros(shape, dtype=f32, device=p.device)
            factored = len(shape) >= 2  # else `row` holds the full v̂ and `col` is unused
            row, col = (shape[:-1], shape[:-2] + shape[-1:]) if factored else (shape, ())
            state["row"] = torch.zeros(row, dtype=f32, device=p.device)
            state["col"] = torch.zeros(col, dtype=f32, device=p.device)
        g, x = jax_view(grad).to(f32), jax_view(p).to(f32)
        a, b = _update_factors(g, state)
        decays = torch.tensor(reference.MOM_DECAYS, dtype=f32, device=p.device).reshape(-1, *[1] * g.ndim)
        m, v = state["momenta"], state["rms"]
        m.mul_(decays).add_((1 - decays) * g)
        v.mul_(reference.RMS_DECAY).add_((1 - reference.RMS_DECAY) * torch.square(g))
        features = torch.stack(_features(g, x, m, v, a, b)).reshape(reference.NUM_FEATURES, -1)
        # Every feature but the ratios over its RMS in this tensor (second-moment normalisation).
        scale = torch.rsqrt(reference._NORM_EPS + torch.mean(torch.square(features), dim=1))
        scale[_RATIOS] = 1.0
        features = features * scale[:, None]

        step = learned_step(theta["mlp"], features, int(state["step"]), self.num_steps, self.config)
        update = torch_view(step.reshape(shape) - group["weight_decay"] * x)
        p.add_(update.to(p.dtype), alpha=group["lr"])
        state["step"] += 1


def learned_step(mlp: dict, features: torch.Tensor, count: int, num_steps: int, config) -> torch.Tensor:
    """small_fc's (and adafac_mlp's) step from the normalised (F, n) features: the MLP, with the
    training-progress embedding tanh(step / num_steps / τ - 1) folded into its first bias, gives
    a direction d and a magnitude s; the step is -step_mult · d · exp(exp_mult · s)."""
    f32, n = torch.float32, features.shape[0]
    fraction = torch.tensor(count, dtype=f32) / torch.tensor(num_steps, dtype=f32)
    time = torch.tanh(fraction / torch.tensor(reference.TIMESCALES, dtype=f32) - 1.0).to(features.device)
    layers = len(mlp) // 2
    weights = [mlp["w0"][:n]] + [mlp[f"w{i}"] for i in range(1, layers)]
    biases = [mlp["b0"] + time @ mlp["w0"][n:]] + [mlp[f"b{i}"] for i in range(1, layers)]
    h = mlp_columns(weights, biases, features)
    return -config.step_mult * h[0] * torch.exp(config.exp_mult * h[1])


def _update_factors(g: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor's row and column accumulators (small_fc's `_update_factors`) → (a, b), the
    factors of rsqrt(v̂) broadcast to g's shape; a 0-D or 1-D tensor keeps a full v̂ in `row`."""
    decay, eps = reference.FAC_DECAY, reference._EPS
    row, col = state["row"], state["col"]
    g2 = torch.square(g)
    if g.ndim < 2:
        row.mul_(decay).add_((1 - decay) * g2)
        return torch.rsqrt(row + eps), torch.ones_like(g)
    row.mul_(decay).add_((1 - decay) * torch.mean(g2, dim=-1))
    col.mul_(decay).add_((1 - decay) * torch.mean(g2, dim=-2))
    col_normalised = col / (torch.mean(row, dim=-1, keepdim=True) + 1e-30)
    a = torch.rsqrt(row + eps)[..., :, None].expand(g.shape)
    b = torch.rsqrt(col_normalised + eps)[..., None, :].expand(g.shape)
    return a, b


def _features(g, x, m, v, a, b) -> list[torch.Tensor]:
    r = torch.rsqrt(v + reference._EPS)
    ratios = m * torch.rsqrt(v + reference._RATIO_EPS)
    fr = a * b  # ≈ rsqrt(v̂), the Adafactor preconditioner
    return [g, x, *m, v, r, *ratios, g * fr, m[2] * fr, a, b]
