"""`nn_adam` in torch: Adam whose per-tensor lr, β1, β2 and eps an LSTM sets every step
(metaopt/optimizers/nn_adam.py). The LSTM runs once a step over every tensor together, as there."""

from __future__ import annotations

import math

import torch

from metaopt.optimizers import nn_adam as reference
from metaopt.torch.base import LearnedOptimizer
from metaopt.torch.lstm_l2l import lstm_step


def _log_feature(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.log(x + 1e-30), -50.0, 50.0) / 10.0


def _features(g, m, v, x, loss_feature, fraction) -> torch.Tensor:
    """nn_adam's 7 statistics of one tensor: its gradient, previous moments and values."""
    rms_g = torch.sqrt(torch.mean(torch.square(g)))
    rms_m = torch.sqrt(torch.mean(torch.square(m)))
    cos = torch.mean(g * m) / (rms_g * rms_m + 1e-30)
    rms_x = torch.sqrt(torch.mean(torch.square(x)))
    return torch.stack([_log_feature(torch.mean(torch.abs(g))), _log_feature(rms_m),
                        _log_feature(torch.sqrt(torch.mean(v))), _log_feature(rms_x), cos, loss_feature,
                        fraction])


class NNAdam(LearnedOptimizer):
    """Per-tensor LSTM predicting Adam's hyperparameters; `step(loss=...)` feeds it the loss."""

    jax_class = reference.NNAdam

    def _step(self, items: list, loss) -> None:
        cfg, f32 = self.config, torch.float32
        device = items[0][0].device  # where the LSTM runs, once for every tensor
        for p, _ in items:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.int64)
                state["mu"] = torch.zeros(p.shape, dtype=f32, device=p.device)
                state["nu"] = torch.zeros(p.shape, dtype=f32, device=p.device)
                for key in ("mass1", "mass2"):
                    state[key] = torch.zeros((), dtype=f32, device=device)
                for key in ("h", "c"):
                    state[key] = torch.zeros(cfg.hidden, dtype=f32, device=device)
        count = int(self.state[items[0][0]]["step"])
        loss_feature = torch.zeros((), dtype=f32, device=device)
        if loss is not None:
            loss = torch.as_tensor(loss, dtype=f32).detach().to(device)
            loss_feature = torch.sign(loss) * torch.log1p(torch.abs(loss))
        fraction = torch.tensor(count, dtype=f32) / torch.tensor(max(self.num_steps, 1), dtype=f32)
        fraction = fraction.to(device)
        x = torch.stack([_features(p.grad.to(f32), self.state[p]["mu"], self.state[p]["nu"], p.to(f32),
                                   loss_feature, fraction).to(device) for p, _ in items])
        h = torch.stack([self.state[p]["h"] for p, _ in items])
        c = torch.stack([self.state[p]["c"] for p, _ in items])
        theta = self.theta(device)
        h, c = lstm_step(theta["lstm"], x, h, c)
        clip = reference._OUT_CLIP
        out = torch.clamp(h @ theta["head"]["w"] + theta["head"]["b"], -clip, clip)
        lr = torch.exp(math.log(cfg.learning_rate) + out[:, 0])
        # The logits of 1 - β in float64, so that σ returns 1 - β to float32 precision.
        omb1 = torch.sigmoid(math.log((1 - cfg.b1) / cfg.b1) + out[:, 1])
        omb2 = torch.sigmoid(math.log((1 - cfg.b2) / cfg.b2) + out[:, 2])
        eps = torch.exp(math.log(cfg.eps) + out[:, 3])
        for i, (p, group) in enumerate(items):
            state = self.state[p]
            state["mass1"] = (1 - omb1[i]) * state["mass1"] + omb1[i]
            state["mass2"] = (1 - omb2[i]) * state["mass2"] + omb2[i]
            state["h"], state["c"] = h[i].clone(), c[i].clone()
            g = p.grad.to(f32)
            a1, a2, rate, e = (t.to(p.device) for t in (omb1[i], omb2[i], lr[i], eps[i]))
            m = state["mu"] = a1 * g + (1 - a1) * state["mu"]  # the operation order of optax
            v = state["nu"] = a2 * torch.square(g) + (1 - a2) * state["nu"]
            adam = (m / state["mass1"].to(p.device)) / (torch.sqrt(v / state["mass2"].to(p.device)) + e)
            update = -rate * adam - group["weight_decay"] * p.to(f32)
            p.add_(update.to(p.dtype), alpha=group["lr"])
            state["step"] += 1
