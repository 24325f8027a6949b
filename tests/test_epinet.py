"""The epinet family (task_zoo/epinet.py): its joint log-loss against a direct NumPy computation
(products of probabilities, no log-sum-exp), the epinet's index dependence, and its refusals."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metaopt import task_zoo
from metaopt.task_zoo.epinet import EpinetFamily


def _np_mlp(layers, names, x, last_activation):
    for i, name in enumerate(names):
        x = x @ np.asarray(layers[name]["w"], np.float64) + np.asarray(layers[name]["b"], np.float64)
        if i < len(names) - 1 or last_activation:
            x = np.maximum(x, 0.0)
    return x


def _np_epinet(layers, prefix, phi, z, outputs):
    """σ(φ, z) for each example and index, looped: (B, K, outputs)."""
    out = np.zeros((len(phi), len(z), outputs))
    for n in range(len(phi)):
        for k in range(len(z)):
            hidden = _np_mlp(layers, [f"{prefix}_0", f"{prefix}_1"], np.concatenate([phi[n], z[k]]), False)
            out[n, k] = hidden.reshape(outputs, len(z[k])) @ z[k]
    return out


@pytest.mark.parametrize("problem", ["classification", "regression"])
def test_joint_log_loss_is_minus_log_of_the_mean_over_indices_of_the_product_of_probabilities(problem):
    """A tiny case (2 groups of tau = 3, 4 indices), float64 NumPy: f = μ(x) + σ_L + scale·σ_P, then
    -log((1/K) Σ_k Π_i p(y_i | x_i, z_k)) / tau averaged over groups."""
    spec = task_zoo.TaskSpec("epinet", {"problem": problem, "width": 5, "depth": 2, "batch_size": 6, "tau": 3,
                                        "index_dim": 2, "num_indices": 4, "prior_scale": 0.7, "seed": 3})
    task = task_zoo.task(spec)
    params = task.init(jax.random.key(0))
    batch = task.batch(jax.random.key(1), task_zoo.TRAIN)
    key = jax.random.key(2)
    z = np.asarray(jax.random.normal(key, (4, 2)), np.float64)  # as the loss draws them from its key

    x = np.asarray(batch["x"], np.float64)
    phi = _np_mlp(params, ["layer_0", "layer_1"], x, True)
    logits = (_np_mlp(params, ["layer_2"], phi, False)[:, None]
              + _np_epinet(params, "epinet", phi, z, task.outputs)
              + 0.7 * _np_epinet(task.prior, "prior", phi, z, task.outputs))  # (B, K, outputs)
    y = np.asarray(batch["y"])
    if problem == "classification":
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        likelihood = probs[np.arange(6), :, y]  # (B, K)
    else:
        noise = float(task.noise)
        residual = (logits[..., 0] - y[:, None]) / noise
        likelihood = np.exp(-0.5 * residual**2) / (noise * np.sqrt(2 * np.pi))
    groups = likelihood.reshape(2, 3, 4).prod(axis=1)  # (groups, K)
    want = np.mean(-np.log(groups.mean(axis=1)) / 3)
    np.testing.assert_allclose(float(task.loss(params, key, batch)), want, rtol=1e-5)


def test_the_prediction_depends_on_the_index_through_the_epinet_alone():
    """Different indices give different predictions (the prior makes them differ even untrained);
    with prior scale 0 and the learnable epinet's output layer zero, every index predicts μ(x);
    and no gradient reaches the base network through the epinet (stop-gradient on φ)."""
    spec = task_zoo.TaskSpec("epinet", {"problem": "classification", "width": 8, "depth": 1, "batch_size": 8,
                                        "seed": 0, "prior_scale": 0.0})
    task = task_zoo.task(spec)
    params = task.init(jax.random.key(0))
    x = task.batch(jax.random.key(1), task_zoo.TRAIN)["x"]
    z = jax.random.normal(jax.random.key(2), (3, task.index_dim))
    out = np.asarray(task.predict(params, x, z))
    assert np.abs(out[:, 0] - out[:, 1]).max() > 1e-3
    silent = {**params, "epinet_1": jax.tree.map(np.zeros_like, params["epinet_1"])}
    out = np.asarray(task.predict(silent, x, z))
    np.testing.assert_allclose(out[:, 0], out[:, 2], rtol=1e-6, atol=1e-6)

    def epinet_part(p):
        return (task.predict(p, x, z) - task.predict({**p, "epinet_1": silent["epinet_1"]}, x, z)).sum()

    grads = jax.grad(epinet_part)(params)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["layer_0"]))


def test_bad_specs_and_settings_are_refused_with_the_reason():
    base = {"problem": "classification", "width": 8, "depth": 1, "batch_size": 8, "seed": 0}
    for change, reason in [({"problem": "ranking"}, "problem must be one of"),
                           ({"tau": 3}, r"batch_size \(8\) must be a multiple of tau \(3\)"),
                           ({"noise": 0.0}, "noise > 0"), ({"index_dim": 0}, "must be >= 1")]:
        with pytest.raises(ValueError, match=reason):
            task_zoo.task(task_zoo.TaskSpec("epinet", {**base, **change}))
    with pytest.raises(ValueError, match="multiple of every tau"):
        EpinetFamily(batch_sizes=(32, 36), taus=(8,))
