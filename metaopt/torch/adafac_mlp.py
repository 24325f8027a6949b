"""`adafac_mlp` in torch: the step of metaopt/optimizers/adafac_mlp.py (its docstring lists the
28 features and the learnable decays), tensor by tensor, in JAX's order of axes (`jax_view`).
The JAX optimizer runs a tensor in cache-sized blocks and folds the per-row and per-column
features into the first layer; the arithmetic per element is the same."""

from __future__ import annotations

from typing import Any

import torch

from metaopt.optimizers import adafac_mlp as reference
from metaopt.torch.base import LearnedOptimizer, jax_view, torch_view
from metaopt.torch.small_fc import learned_step, step_scalars

K = len(reference.FAC_DECAYS)


def _decays(theta_decays: torch.Tensor, initial: tuple[float, ...]) -> torch.Tensor:
    logits = [reference._logit(d) for d in initial]
    logits = torch.tensor(logits, dtype=torch.float32, device=theta_decays.device)
    return torch.sigmoid(logits + theta_decays)


def _expand(d: torch.Tensor, ndim: int) -> torch.Tensor:
    return d.reshape(d.shape + (1,) * ndim)


class AdafacMLP(LearnedOptimizer):
    """A per-parameter MLP on Adafactor features, with learnable decays."""

    jax_class = reference.AdafacMLP

    def _update(self, p, grad, state: dict, group: dict, theta: Any, loss) -> None:
        del loss  # not a feature of adafac_mlp
        f32, shape = torch.float32, jax_view(p).shape  # every state array is in JAX's order
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["momenta"] = torch.zeros((len(reference.MOM_DECAYS), *shape), dtype=f32, device=p.device)
            state["rms"] = torch.zeros(shape, dtype=f32, device=p.device)
            row, col = (shape[:-1], shape[:-2] + shape[-1:]) if len(shape) >= 2 else (shape, ())
            state["rows"] = torch.zeros((K, *row), dtype=f32, device=p.device)
            state["cols"] = torch.zeros((K, *col), dtype=f32, device=p.device)
        scalars = step_scalars(state, self.num_steps, group, p.device)
        # p.detach(): the same storage, as a plain tensor (dynamo fixes a Parameter's shape).
        self._kernel(p)(p.detach(), grad, state["momenta"], state["rms"], state["rows"], state["cols"],
                        scalars, theta)
        state["step"] += 1

    def _make_kernel(self, chunk: int | None):
        """The step of one tensor, a function of tensors alone (`scalars`: see `step_scalars`)."""
        config = self.config

        def kernel(p, grad, m, v, rows, cols, scalars, theta):
            count, num_steps, group_lr, weight_decay = scalars
            g, x = jax_view(grad).to(torch.float32), jax_view(p).to(torch.float32)
            shape, factored = g.shape, g.ndim >= 2
            decays = theta["decays"]
            mom_d = _expand(_decays(decays["momentum"], reference.MOM_DECAYS), g.ndim)
            rms_d = _decays(decays["rms"], (reference.RMS_DECAY,))[0]
            fac_d = _decays(decays["adafactor"], reference.FAC_DECAYS)
            m.mul_(mom_d).add_((1 - mom_d) * g)
            v.mul_(rms_d).add_((1 - rms_d) * torch.square(g))
            eps = reference._EPS
            g2 = torch.square(g)
            if factored:
                d = _expand(fac_d, g.ndim - 1)
                rows.mul_(d).add_((1 - d) * torch.mean(g2, dim=-1))
                cols.mul_(d).add_((1 - d) * torch.mean(g2, dim=-2))
                # As small_fc: col over mean(row), never row·col (float32 underflow).
                col_n = cols / (torch.mean(rows, dim=-1, keepdim=True) + 1e-30)
                fac = torch.rsqrt(rows + eps)[..., :, None] * torch.rsqrt(col_n + eps)[..., None, :]
                row_b, col_b = rows[..., :, None].expand(K, *shape), cols[..., None, :].expand(K, *shape)
                row_features = [row_b, col_b, torch.rsqrt(row_b + eps), torch.rsqrt(col_b + eps)]
            else:  # 0-D/1-D: `rows` holds the full, unfactored v̂ (as RMSProp)
                d = _expand(fac_d, g.ndim)
                rows.mul_(d).add_((1 - d) * g2)
                fac = torch.rsqrt(rows + eps)
                row_features = [rows, rows, fac, fac]
            r = torch.rsqrt(v + eps)
            features = torch.cat([torch.stack([g, x]), m, torch.stack([v, r]), m * r, g * fac, m * fac,
                                  *row_features]).reshape(reference.NUM_FEATURES, -1)
            # Every feature over its RMS in this tensor (second-moment normalisation).
            mean_square = torch.mean(torch.square(features), dim=1, keepdim=True)
            features = features * torch.rsqrt(reference._NORM_EPS + mean_square)
            step = learned_step(theta["mlp"], features, count / num_steps, config, chunk)
            update = torch_view(step.reshape(shape) - weight_decay * x)
            p.add_((update * group_lr).to(p.dtype))

        return kernel
