"""`lstm_l2l` in torch: the coordinatewise LSTM of metaopt/optimizers/lstm_l2l.py (Andrychowicz
et al. 2016), each scalar parameter with its own hidden and cell states."""

from __future__ import annotations

import math
from typing import Any

import torch

from metaopt.optimizers import lstm_l2l as reference
from metaopt.torch.base import CHUNK, LearnedOptimizer


def lstm_step(p: dict, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One LSTM step for a batch: x (B, I), h/c (B, H); gates ordered [i, f, g, o] (as JAX's)."""
    z = torch.addmm(p["b"], x, p["wx"]).addmm_(h, p["wh"])
    i, f, g, o = torch.chunk(z, 4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def preprocess(g: torch.Tensor, p: float) -> torch.Tensor:
    """Appendix A's gradient preprocessing: g (n,) → (n, 2)."""
    big = torch.abs(g) >= math.exp(-p)
    log_abs = torch.log(torch.where(big, torch.abs(g), torch.ones_like(g)))
    first = torch.where(big, log_abs / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), math.exp(p) * g)
    return torch.stack([first, second], dim=-1)


class LSTML2L(LearnedOptimizer):
    """A 2-layer LSTM shared by every coordinate, on its preprocessed gradient."""

    jax_class = reference.LSTML2L

    def _update(self, p, grad, state: dict, group: dict, theta: Any, loss) -> None:
        del loss  # the paper's input is the gradient only
        cfg, n = self.config, p.numel()
        if not state:
            state["h"] = torch.zeros((cfg.layers, n, cfg.hidden), dtype=torch.float32, device=p.device)
            state["c"] = torch.zeros_like(state["h"])
        g = grad.reshape(-1).to(torch.float32)
        step = torch.empty(n, dtype=torch.float32, device=p.device)
        for start in range(0, n, CHUNK):  # (n, 4·hidden) gate activations a chunk at a time
            rows = slice(start, start + CHUNK)
            x = preprocess(g[rows], cfg.preproc_p)
            for layer in range(cfg.layers):
                x, c = lstm_step(theta[f"lstm{layer}"], x, state["h"][layer, rows], state["c"][layer, rows])
                state["h"][layer, rows], state["c"][layer, rows] = x, c
            step[rows] = cfg.output_scale * torch.addmm(theta["out"]["b"], x, theta["out"]["w"])[:, 0]
        x32 = p.to(torch.float32).reshape(-1)
        update = step - group["weight_decay"] * x32
        p.add_(update.reshape(p.shape).to(p.dtype), alpha=group["lr"])
