"""`rnn_mlp` in torch: a per-tensor LSTM conditioning a per-parameter MLP, plus a nominal Adam
step (metaopt/optimizers/rnn_mlp.py). The LSTM runs once a step over every tensor together, as
there; the loss statistics it reads are kept, alike, in every parameter's state (torch saves
state per parameter), so `state_dict()` resumes them."""

from __future__ import annotations

import math

import torch

from metaopt.optimizers import rnn_mlp as reference
from metaopt.torch.base import LearnedOptimizer, mlp_columns
from metaopt.torch.lstm_l2l import lstm_step

K = len(reference.MOM_DECAYS)


def _log_feature(x):
    return torch.clamp(torch.log(x + 1e-30), -50.0, 50.0) / 10.0


def _rms(x):
    return torch.sqrt(torch.mean(torch.square(x)))


def _tensor_features(g, x, m, v, loss_features, time_features) -> torch.Tensor:
    m_nominal = m[reference.NOMINAL_MOM]
    rms_g, rms_m = _rms(g), _rms(m_nominal)
    cos = torch.mean(g * m_nominal) / (rms_g * rms_m + 1e-30)
    stats = [_log_feature(rms_g), _log_feature(rms_m), _log_feature(torch.sqrt(torch.mean(v))),
             _log_feature(_rms(x)), cos]
    static = torch.tensor([math.log(max(g.numel(), 1)) / 10.0, 1.0 if g.ndim == 0 else -1.0,
                           1.0 if g.ndim == 1 else -1.0], dtype=torch.float32, device=g.device)
    return torch.cat([torch.stack(stats), static, loss_features, time_features])


def _param_features(g, x, m, v) -> torch.Tensor:
    """(12, n) per-parameter features, each over its RMS in the tensor."""
    r = torch.rsqrt(v + reference._EPS)
    features = torch.cat([g.reshape(1, -1), x.reshape(1, -1), m.reshape(K, -1), v.reshape(1, -1),
                          r.reshape(1, -1), (m * r).reshape(K, -1)])
    return features * torch.rsqrt(1e-5 + torch.mean(torch.square(features), dim=1, keepdim=True))


class RNNMLP(LearnedOptimizer):
    """Per-tensor LSTM + per-parameter MLP; `step(loss=...)` feeds it the loss."""

    jax_class = reference.RNNMLP

    def _step(self, items: list, loss) -> None:
        cfg, f32 = self.config, torch.float32
        device = items[0][0].device  # where the LSTM runs, once for every tensor
        for p, _ in items:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.int64)
                state["momenta"] = torch.zeros((K, *p.shape), dtype=f32, device=p.device)
                state["rms"] = torch.zeros(p.shape, dtype=f32, device=p.device)
                state["h"] = torch.zeros(cfg.lstm_hidden, dtype=f32, device=device)
                state["c"] = torch.zeros(cfg.lstm_hidden, dtype=f32, device=device)
                state["loss_min"] = torch.zeros((), dtype=f32, device=device)
                state["loss_mean"] = torch.zeros((), dtype=f32, device=device)
                state["loss_count"] = torch.zeros((), dtype=torch.int64, device=device)
        first = self.state[items[0][0]]
        count = int(first["step"])
        loss_stats, loss_features = self._loss_stats(first, loss, device)
        fraction = torch.tensor(count, dtype=f32) / torch.tensor(max(self.num_steps, 1), dtype=f32)
        time_features = torch.tanh(fraction / torch.tensor(reference.TIMESCALES, dtype=f32) - 1.0).to(device)

        decays = torch.tensor(reference.MOM_DECAYS, dtype=f32, device=device)
        gs, xs = [p.grad.to(f32) for p, _ in items], [p.to(f32) for p, _ in items]
        for (p, _), g in zip(items, gs, strict=True):
            d = decays.to(p.device).reshape(-1, *[1] * g.ndim)
            self.state[p]["momenta"].mul_(d).add_((1 - d) * g)
            self.state[p]["rms"].mul_(reference.RMS_DECAY).add_((1 - reference.RMS_DECAY) * torch.square(g))
        ms = [self.state[p]["momenta"] for p, _ in items]
        vs = [self.state[p]["rms"] for p, _ in items]
        tensor_features = torch.stack([
            _tensor_features(g, x, m, v, loss_features.to(g.device), time_features.to(g.device)).to(device)
            for g, x, m, v in zip(gs, xs, ms, vs, strict=True)])
        theta = self.theta(device)
        h = torch.stack([self.state[p]["h"] for p, _ in items])
        c = torch.stack([self.state[p]["c"] for p, _ in items])
        from_lstm = torch.mean(h, dim=0).expand(h.shape)  # the cross-tensor mean of the last outputs
        h, c = lstm_step(theta["lstm"], torch.cat([tensor_features, from_lstm], dim=1), h, c)
        cond = h @ theta["cond"]["w"] + theta["cond"]["b"]
        clip = reference._OUT_CLIP
        nominal_scale = torch.clamp(h @ theta["nominal"]["w"] + theta["nominal"]["b"], -clip, clip)
        nominal_lr = cfg.nominal_lr * torch.exp(nominal_scale[:, 0])
        mlp, n = theta["mlp"], reference.NUM_PARAM_FEATURES
        first_bias = mlp["l0"]["b"] + cond @ mlp["l0"]["w"][n:]  # the conditioning, folded in

        t = torch.tensor(count + 1, dtype=f32)
        bc1 = (1 - torch.tensor(reference.MOM_DECAYS[reference.NOMINAL_MOM], dtype=f32) ** t).item()
        bc2 = (1 - torch.tensor(reference.RMS_DECAY, dtype=f32) ** t).item()
        for i, ((p, group), g, x, m, v) in enumerate(zip(items, gs, xs, ms, vs, strict=True)):
            local = self.theta(p.device)["mlp"]
            out = mlp_columns([local["l0"]["w"][:n], local["l1"]["w"], local["l2"]["w"]],
                              [first_bias[i].to(p.device), local["l1"]["b"], local["l2"]["b"]],
                              _param_features(g, x, m, v))
            learned = cfg.step_mult * out[0] * torch.exp(cfg.exp_mult * out[1])
            m_hat = m[reference.NOMINAL_MOM] / bc1
            nominal = nominal_lr[i].to(p.device) * m_hat / (torch.sqrt(v / bc2) + reference._EPS)
            update = -(nominal + learned.reshape(g.shape)) - group["weight_decay"] * x
            p.add_(update.to(p.dtype), alpha=group["lr"])
            state = self.state[p]
            state["h"], state["c"] = h[i].clone(), c[i].clone()
            state["loss_min"], state["loss_mean"], state["loss_count"] = (s.clone() for s in loss_stats)
            state["step"] += 1

    @staticmethod
    def _loss_stats(state: dict, loss, device):
        """New (min, mean, count) of the losses seen and the two loss features (rnn_mlp's)."""
        if loss is None:
            stats = (state["loss_min"], state["loss_mean"], state["loss_count"])
            return stats, torch.zeros(2, dtype=torch.float32, device=device)
        loss = torch.as_tensor(loss, dtype=torch.float32).detach().to(device)
        n = state["loss_count"] + 1
        low = torch.where(state["loss_count"] == 0, loss, torch.minimum(state["loss_min"], loss))
        mean = reference.LOSS_DECAY * state["loss_mean"] + (1 - reference.LOSS_DECAY) * loss
        mean_c = mean / (1 - reference.LOSS_DECAY ** n.to(torch.float32))
        spread = torch.clamp(mean_c - low, min=0.0) + 1e-3 * torch.abs(mean_c) + 1e-12
        rel = torch.clamp((loss - low) / spread, 0.0, 5.0)
        dev = torch.clamp((loss - mean_c) / (torch.abs(mean_c) + 1e-12), -5.0, 5.0)
        return (low, mean, n), torch.stack([rel, dev])
