"""`small_fc` in torch: the step of metaopt/optimizers/small_fc.py (its docstring lists the 18
features and why), tensor by tensor. The JAX optimizer packs every tensor into chunks for speed;
the arithmetic per tensor is the same: Adafactor factors over the last two axes of the tensor in
JAX's order (`jax_view`), so rows and columns mean what they meant when θ was trained.
"""

from __future__ import annotations

from typing import Any

import torch

from metaopt.optimizers import small_fc as reference
from metaopt.torch.base import LearnedOptimizer, jax_view, kernel_scalars, mlp_columns, torch_view

# Which features are normalised: all but the scale-free Adam ratios m_k·rsqrt(v) (as in JAX).
_NORMALISED = torch.isin(torch.arange(reference.NUM_FEATURES), torch.tensor(reference._NORMALISED))


class SmallFC(LearnedOptimizer):
    """A per-parameter MLP on momentum, second-moment and Adafactor features."""

    jax_class = reference.SmallFC

    def _update(self, p, grad, state: dict, group: dict, theta: Any, loss) -> None:
        del loss  # not a feature of small_fc
        f32, shape = torch.float32, jax_view(p).shape  # every state array is in JAX's order
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["momenta"] = torch.zeros((len(reference.MOM_DECAYS), *shape), dtype=f32, device=p.device)
            state["rms"] = torch.zeros(shape, dtype=f32, device=p.device)
            factored = len(shape) >= 2  # else `row` holds the full v̂ and `col` is unused
            row, col = (shape[:-1], shape[:-2] + shape[-1:]) if factored else (shape, ())
            state["row"] = torch.zeros(row, dtype=f32, device=p.device)
            state["col"] = torch.zeros(col, dtype=f32, device=p.device)
        scalars = step_scalars(state, self.num_steps, group, p.device)
        # p.detach(): the same storage, as a plain tensor (dynamo fixes a Parameter's shape).
        self._kernel(p)(p.detach(), grad, state["momenta"], state["rms"], state["row"], state["col"],
                        scalars, theta)
        state["step"] += 1

    def _make_kernel(self, chunk: int | None):
        """The step of one tensor, a function of tensors alone (`scalars`: see `step_scalars`)."""
        config = self.config

        def kernel(p, grad, m, v, row, col, scalars, theta):
            count, num_steps, group_lr, weight_decay = scalars
            g, x = jax_view(grad).to(torch.float32), jax_view(p).to(torch.float32)
            a, b = _update_factors(g, row, col)
            decays = torch.tensor(reference.MOM_DECAYS, dtype=torch.float32, device=p.device)
            decays = decays.reshape(-1, *[1] * g.ndim)
            m.mul_(decays).add_((1 - decays) * g)
            v.mul_(reference.RMS_DECAY).add_((1 - reference.RMS_DECAY) * torch.square(g))
            features = torch.stack(_features(g, x, m, v, a, b)).reshape(reference.NUM_FEATURES, -1)
            # Every feature but the ratios over its RMS in this tensor (second-moment normalisation).
            scale = torch.rsqrt(reference._NORM_EPS + torch.mean(torch.square(features), dim=1))
            scale = torch.where(_NORMALISED.to(p.device), scale, 1.0)
            step = learned_step(theta["mlp"], features * scale[:, None], count / num_steps, config, chunk)
            update = torch_view(step.reshape(g.shape) - weight_decay * x)
            p.add_((update * group_lr).to(p.dtype))

        return kernel


def step_scalars(state: dict, num_steps: int, group: dict, device) -> torch.Tensor:
    """What small_fc's and adafac_mlp's step reads besides tensors (`kernel_scalars`): the step
    count, num_steps, the group's lr and weight_decay."""
    return kernel_scalars([int(state["step"]), num_steps, group["lr"], group["weight_decay"]], device)


def learned_step(mlp: dict, features: torch.Tensor, fraction: torch.Tensor, config,
                 chunk: int | None) -> torch.Tensor:
    """small_fc's (and adafac_mlp's) step from the normalised (F, n) features and the run's
    fraction done: the MLP, with the training-progress embedding tanh(fraction / τ - 1) folded
    into its first bias, gives a direction d and a magnitude s; the step is
    -step_mult · d · exp(exp_mult · s). `chunk`: as `mlp_columns`."""
    n = features.shape[0]
    timescales = torch.tensor(reference.TIMESCALES, dtype=torch.float32, device=features.device)
    time = torch.tanh(fraction / timescales - 1.0)
    layers = len(mlp) // 2
    weights = [mlp["w0"][:n]] + [mlp[f"w{i}"] for i in range(1, layers)]
    biases = [mlp["b0"] + time @ mlp["w0"][n:]] + [mlp[f"b{i}"] for i in range(1, layers)]
    h = mlp_columns(weights, biases, features, chunk)
    return -config.step_mult * h[0] * torch.exp(config.exp_mult * h[1])


def _update_factors(g: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Adafactor's row and column accumulators (small_fc's `_update_factors`) → (a, b), the
    factors of rsqrt(v̂) broadcast to g's shape; a 0-D or 1-D tensor keeps a full v̂ in `row`."""
    decay, eps = reference.FAC_DECAY, reference._EPS
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
