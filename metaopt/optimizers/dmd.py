"""Dynamic mode decomposition (DMD) of a tensor's recent steps, as input features of a learned
optimizer (Šimánek, Vašata & Kordík 2022, "Learning to optimize with dynamic mode decomposition":
features of the optimization's own dynamics help a learned optimizer on unseen architectures).

The snapshots are a tensor's last k steps, flattened: S = [s_1 … s_k] (n × k), X = S[:, :-1],
Y = S[:, 1:]. Exact DMD (Tu et al. 2014) at rank r = 2: X ≈ U Σ Vᵀ (its two largest singular
values), Ã = Uᵀ Y V Σ⁻¹ (2 × 2), the linear map that best carries each step to the next within
span(U). Its eigenvalues λ are the modes of the recent dynamics: |λ| < 1 a direction whose steps
shrink, > 1 one whose steps grow, arg λ an oscillation (a step that flips sign each time: arg π).
What the optimizer sees (`features`):
- per element, the step DMD predicts next, ŝ = U Ã Uᵀ s_k, over rms(s_k);
- per tensor, log ρ (ρ = max |λ|, the spectral radius) and |arg λ_max| / π.

Everything comes from the Gram matrix G = SᵀS (k × k, O(n k²) per tensor), never an SVD of the
n × k snapshot matrix: with XᵀX = V Σ² Vᵀ (`eigh` of a (k-1) × (k-1) matrix), U = X V Σ⁻¹, so
Ã = Σ⁻¹ Vᵀ (XᵀY) V Σ⁻¹ and ŝ = X a with a = V Σ⁻¹ Ã Σ⁻¹ Vᵀ Xᵀ s_k, a combination of past steps.
At rank 2 the eigenvalues have a closed form (JAX has no general `eig` on GPU). Singular values
below RCOND · σ_max drop out (as a pseudo-inverse's), so a history of zeros (the first steps) or of
one repeated step gives finite features: ρ = 0 and ŝ = 0, or the one mode that is there.
The features carry no gradient: `eigh`'s derivative is undefined at repeated eigenvalues (that
history of zeros), so a gradient-based meta-training (TBPTT) sees them as constants; ES and PES
need none.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

RANK = 2
RCOND = 1e-3  # singular values below this times the largest drop out (float32 Gram: σ² to ~1e-7)
LOG_RADIUS_CLIP = 3.0  # log ρ within ±3: ρ in [0.05, 20]
PREDICTION_CLIP = 10.0  # ŝ / rms(s_k) within ±10, as nominal_mlp's other ratios
NUM_ELEMENT_FEATURES = 1
NUM_TENSOR_FEATURES = 2


def push(history: jax.Array, step: jax.Array) -> jax.Array:
    """The history (k, *shape), oldest first, with `step` appended and the oldest dropped."""
    return jnp.concatenate([history[1:], step[None].astype(history.dtype)])


def decompose(history: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ŝ, ρ, arg λ_max) of a history (k, *shape), k ≥ 3: the next step DMD predicts (shape of
    one step), the spectral radius of Ã and the argument in [0, π] of its dominant eigenvalue."""
    k = history.shape[0]
    if k < RANK + 1:
        raise ValueError(f"DMD at rank {RANK} needs a history of at least {RANK + 1} steps, got {k}")
    s = history.reshape(k, -1).astype(jnp.float32)
    gram = s @ s.T  # (k, k): XᵀX, XᵀY and Xᵀs_k are its blocks
    xx, xy, xs = gram[:-1, :-1], gram[:-1, 1:], gram[:-1, -1]
    eigvals, eigvecs = jnp.linalg.eigh(xx)  # ascending
    sigma2, v = eigvals[-RANK:], eigvecs[:, -RANK:]  # the two largest singular values, squared
    sigma = jnp.sqrt(jnp.maximum(sigma2, 0.0))
    keep = sigma > RCOND * jnp.max(sigma)
    inv_sigma = jnp.where(keep, 1.0 / jnp.where(keep, sigma, 1.0), 0.0)
    a_tilde = inv_sigma[:, None] * (v.T @ xy @ v) * inv_sigma[None, :]
    coef = v @ (inv_sigma * (a_tilde @ (inv_sigma * (v.T @ xs))))
    prediction = (coef @ s[:-1]).reshape(history.shape[1:])
    radius, angle = _dominant_eigenvalue(a_tilde)
    return prediction, radius, angle


def _dominant_eigenvalue(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|λ| and arg λ ∈ [0, π] of the eigenvalue of largest modulus of a real 2 × 2 matrix: λ =
    tr/2 ± √disc, disc = (tr/2)² - det; a complex pair when disc < 0, of modulus √det."""
    half_trace = 0.5 * (a[0, 0] + a[1, 1])
    disc = half_trace ** 2 - (a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0])
    real = half_trace + jnp.where(half_trace >= 0, 1.0, -1.0) * jnp.sqrt(jnp.maximum(disc, 0.0))
    imag = jnp.sqrt(jnp.maximum(-disc, 0.0))
    return jnp.hypot(real, imag), jnp.arctan2(imag, real)


def features(history: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(element features (1, n), tensor features (2,)) of a history (k, *shape): ŝ / rms(s_k),
    clipped to ±PREDICTION_CLIP; log ρ clipped to ±LOG_RADIUS_CLIP, over that clip; |arg λ| / π.
    All but the first in [-1, 1]; a history of zeros gives ŝ = 0, arg 0 and log ρ at its floor
    (-1). Constants to autodiff."""
    history = jax.lax.stop_gradient(history)
    prediction, radius, angle = decompose(history)
    last = history[-1].astype(jnp.float32)
    last_rms = jnp.sqrt(jnp.mean(jnp.square(last))) if last.size else jnp.float32(0.0)
    ratio = jnp.where(last_rms > 0, prediction / jnp.maximum(last_rms, 1e-30), 0.0)
    element = jnp.clip(ratio, -PREDICTION_CLIP, PREDICTION_CLIP).reshape(1, -1)
    floor = math.exp(-LOG_RADIUS_CLIP)
    log_radius = jnp.where(radius > 0, jnp.log(jnp.maximum(radius, floor)), -LOG_RADIUS_CLIP)
    tensor = jnp.stack([jnp.clip(log_radius, -LOG_RADIUS_CLIP, LOG_RADIUS_CLIP) / LOG_RADIUS_CLIP,
                        angle / jnp.pi])
    return element, tensor.astype(jnp.float32)
