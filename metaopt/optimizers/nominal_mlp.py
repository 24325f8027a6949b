"""`nominal_mlp`: Adam on the user's schedule (the *nominal* step), corrected by a small learned
per-parameter MLP and scaled per tensor by a learned law. Built to be pulled onto models it
never saw during meta-training.

    update = -lr(t) · α_T · a_T · (d + c) - lr(t) · weight_decay · p
      d   = m̂ / (sqrt(v̂) + eps)                 Adam's direction (bias-corrected, β1 0.9, β2 `rms_decay`)
      c   = clip_rms_T(MLP(x), correction_bound · s_T)  learned correction, per-tensor RMS ≤ the bound;
            s_T = 1, or rms_T(d) with `relative_correction` (the correction anneals with Adam's step);
            or with `elementwise_correction` c = correction_bound · d ⊙ tanh(MLP(x)), a learned gain
            on each element of Adam's step, within [1 - bound, 1 + bound]
      a_T = exp(4 tanh((b + w · f_T) / 4))        learned per-tensor step multiplier, in [e⁻⁴, e⁴]
      α_T = 1, or with `rate_adaptation` κ > 0 the tensor's hypergradient rate:
            log α_T += κ · (cos(g_t, d_{t-1}) - rate_threshold) each step from `rate_init`,
            within ±rate_range (with `rate_after_warmup`, only once the warm-up is over; with
            `rate_on_schedule`, κ times lr(t)/peak, so α_T adapts at the schedule's pace)
      lr(t) = learning_rate · cosine decay to 0 over num_steps (after `warmup` of the run, and
              `stable` of it at the peak), or
              the user's own schedule: `as_optax(theta, num_steps, learning_rate=schedule)`;
              with `rate_estimate` c > 0, also times Prodigy's estimate d_t of the rate (from 1e-6,
              never falling; Adam's moments then average d·g), so learning_rate is a multiplier
              (Prodigy's convention: 1)

Where each piece comes from, and why it is here:
- The nominal term (learned_optimization `adafac_nominal.py`, "STAR"): the learned part only
  corrects a good hand-designed step, so the untrained optimizer is already AdamW with a cosine
  schedule, and a θ that meta-training has not reached yet cannot make it worse than that.
- The bounded correction (Celo2, Moudgil et al. 2026, normalises the MLP's output per tensor):
  whatever the task, the learned part moves a tensor by at most `correction_bound` times the RMS
  of an Adam step of unit-size ratios, so a pattern learned on small MLPs cannot blow up a model
  it never saw. The bound clips (not normalises): at θ₀ the MLP's output layer is zero, c = 0
  exactly, and small perturbations of θ move the step continuously (PES needs that).
  With `relative_correction` the bound is relative to the RMS of d itself: near a minimum, where
  Adam's ratios m̂/√v̂ fall towards noise, an absolute bound lets the correction keep stirring the
  weights at full size (version 2 of `reference` ended 10× above its own untrained anchor on the
  held-out MLPs so); a relative one can at most cancel or double Adam's step, tensor by tensor.
  An RMS bound still lets the correction move elements Adam leaves still and turn others against
  Adam's sign: version 4's, trained on 1,000-step runs, took the 5,000-step CNN from 0.49× tuned
  Adam's final loss (without it) to 370,000× (docs/reference_optimizer.md, version 5). The
  `elementwise_correction` gain bounds each element by Adam's own step on it, so the learned part
  can only re-weight Adam's step (by 0 to 2 at the default bound 1), never reverse or create one.
- The per-tensor multiplier a_T (μLO, Thérien et al. 2026; LARS/LAMB's trust ratio): its features
  f_T = (log10 rms(p) + 1, log10 fan_in - 1.5, [p is a vector]) let meta-training learn a step
  that follows the parameter scale and the fan-in, as μP prescribes for wider nets, instead of one
  global step. b alone is a learned global log learning-rate multiplier.
- The hypergradient rate α_T (Baydin et al. 2018, "Online learning rate adaptation with
  hypergradient descent", here per tensor, multiplicative and on the cosine, so scale-free): one
  peak rate cannot fit every model (tuned Adam's ranges from 0.0007 on a 7-layer MLP to 0.05 on
  least squares), and the learned law a_T sees only static shapes. α_T watches the run itself:
  it grows while each gradient still points along the last step, shrinks when the step
  overshoots, and drifts down under pure gradient noise. It is hand-designed, so the untrained
  optimizer already has it, and its rate κ and range were chosen untrained on
  examples/suites/design_validation.yaml, never on an evaluation suite.
  `rate_after_warmup` holds α_T at 1 until the warm-up ends: during a warm-up the schedule keeps
  steps deliberately small, so each gradient still points along the last step and α_T can climb,
  undoing part of the warm-up. On the design suite (20% warm-up, 3 seeds) holding it took the
  LSTM from 1.25× tuned Adam's final loss to 1.01× and least squares from 0.996× to 1.16×: one
  win fewer, so the reference does not use it (docs/reference_optimizer.md, version 6).
  `rate_on_schedule` scales κ by lr(t)/peak, so α_T moves in proportion to the steps it judges.
  While the schedule keeps steps small (early in the warm-up, late in the decay) a step barely
  changes the next gradient, so cos(g_t, d_{t-1}) speaks of the noise and of that smallness, not
  of the rate, yet without it α_T moves at the full κ. On the design suite's 5,000-step 5×48 tanh
  MLP (seed 0) version 6's anchor (20% warm-up) had some tensors' α_T at the floor and others near
  the ceiling before the warm-up ended, the loss climbed back from 0.009 to 0.41 as the rate
  peaked, and the run ended at 7.0e-5; at the schedule's pace no tensor's α_T rose above 1 in the
  warm-up and the run ended at 8.8e-7. Over the design suite (3 seeds) it kept 9 of 12 wins and
  lowered the geometric mean, so the reference uses it (docs/reference_optimizer.md, version 7).
  `rate_init` (log α_T at step 0) and `rate_threshold` (the cosine above which α_T grows) were
  screened after version 7 and are not used: on a transformer every tensor's α_T but the
  embedding's falls towards the floor, the embedding's (sparse rows, cos near 0) stays at 1, and
  the early steps at α_T ≈ 1 cost it later; starting lower or requiring a positive cosine mends
  both transformers but costs the MLPs their early rate (6 of 12 wins at best against 9).
- `rate_estimate` (Prodigy, Mishchenko & Defazio 2023, as optax.contrib.prodigy): instead of a
  peak rate, d_t = max(d_{t-1}, c · Σ λ_k <g_k, x_0 - x_k> / ||Σ λ_k g_k||_1), a distance over a
  gradient size, grown from far below any rate. Screened after version 8, untrained, on the design
  suite: it wins three of its four language models (version 7's anchor wins two) and least
  squares, since it starts with tiny steps and settles near tuned constant Adam's rate; but it loses
  the deep MLPs at every coefficient, 9 of 12 at best (c = 0.5) against the anchor's 9 at a lower
  geometric mean. Not used by the reference (docs/reference_optimizer.md, "After version 8").
- `dmd_history` k (Šimánek, Vašata & Kordík 2022, "Learning to optimize with dynamic mode
  decomposition"): the MLP also sees a dynamic mode decomposition of each tensor's last k steps
  (before the schedule, so a warm-up or a decay is not read as a mode): per element the step DMD
  predicts next, per tensor the spectral radius and the oscillation of the dominant mode
  (`optimizers.dmd`). Whether a step's direction is settling, growing or flipping is what the
  per-element momenta see only one element at a time. Off by default; not in metaopt.torch.
- `rms_decay`, Adam's β2, 0.999 by default (versions 1-8). With α_T, a second moment that
  forgets in ~10 steps (0.9) rather than ~1,000 keeps each element's step near unit size while
  the rate and the gradients' scale change under it; a slow one lags a growing gradient, so the
  step outgrows it. Screened untrained on the design suite (3 seeds): 0.9 won 11 of 12 at 0.0587×
  tuned Adam's final loss, 0.95 11 at 0.101×, 0.98 10 (its 5,000-step tanh MLP blew up), 0.999 (version
  7's anchor) 9 at 0.45×. Version 9 uses 0.9 (docs/reference_optimizer.md, version 9).
  `stable` holds the peak for that fraction of the run after the warm-up (warm-up, stable,
  decay: Hu et al. 2024) before the cosine; it helped the language models and least squares
  and blew up the deep MLPs, whose α_T climbs at full pace all the while (not used).
- The schedule is the user's (Celo2): the optimizer cannot know a good horizon-dependent decay
  better than the person who sets `num_steps`; the learned parts see the run's fraction and the
  absolute step (μLO: features of the absolute step generalise to longer runs).

Per-element MLP features x (F = 11): g/(sqrt(v̂)+eps) and m̂_k/(sqrt(v̂)+eps) for β in
MOM_DECAYS (scale-free ratios, clipped to ±RATIO_CLIP), p / rms_T(p); then per tensor f_T (3) and
per step (3): t/num_steps, log10(1 + t)/4, lr(t)/learning_rate. One hidden layer (relu). With
`dmd_history`, F = 14: the DMD prediction per element (after p / rms_T(p)) and the two DMD tensor
features (after the step features).
Meta-parameters θ = {"mlp": {"w0": (11, hidden), "b0", "w1": (hidden, 1), "b1"}, "tensor": {"w": (3,),
"b": ()}}: 11·16+16 + 16+1 + 3+1 = 213 float32 with hidden 16. θ₀ zeroes the output layer and the
tensor law, so the untrained optimizer equals AdamW with the schedule (a NumPy test checks it).

Optimizer state per parameter: 3 momenta + 1 second moment = 4 float32 (and one float32 per
tensor for α_T); with `rate_estimate` 2 more (x_0 and Prodigy's gradient sum) and 2 scalars; with
`dmd_history` k, k more (the steps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt.optimizers import dmd
from metaopt.optimizers.hand_designed import cosine_schedule
from metaopt.optimizers.slots import zero_where

MOM_DECAYS = (0.5, 0.9, 0.99)  # 0.9 is Adam's β1: the nominal direction's momentum
ADAM_MOMENTUM = 1  # index of β1 = 0.9 in MOM_DECAYS
RMS_DECAY = 0.999
RATIO_CLIP = 10.0
NUM_ELEMENT_FEATURES = 1 + len(MOM_DECAYS) + 1
NUM_TENSOR_FEATURES = 3
NUM_STEP_FEATURES = 3
NUM_FEATURES = NUM_ELEMENT_FEATURES + NUM_TENSOR_FEATURES + NUM_STEP_FEATURES
# The MLP's inputs by kind, for ablation (`as_optax(..., ablate=...)`, `metaopt inspect`): the
# gradient ratio, the momentum ratios and the scaled parameter per element; the per-tensor features
# (of the tensor law too); the step features.
FEATURE_GROUPS = ("gradient", "momenta", "parameter", "tensor", "progress")
MULTIPLIER_RANGE = 4.0  # a_T within [e^-4, e^4]
ESTIMATE_START = 1e-6  # d_0 of `rate_estimate`: an under-estimate of any rate (Prodigy's default)
CHUNK = 16384  # elements per lax.map iteration of the MLP: (16, CHUNK) f32 activations = 1 MiB


class DistanceEstimate(NamedTuple):
    """Prodigy's running estimate of the rate (with `rate_estimate`): d, the rate (never falls);
    numerator, the decayed sum of d-weighted <g_t, x_0 - x_t>; x0, the parameters at init;
    grad_sum, per leaf, the decayed d-weighted sum of gradients (its L1 norm is the denominator)."""

    d: jax.Array
    numerator: jax.Array
    x0: tuple
    grad_sum: tuple


class NominalMLPState(NamedTuple):
    """count: () int32 steps taken; momenta: per-leaf (len(MOM_DECAYS), *leaf.shape) float32
    EMAs of g; rms: per-leaf EMA of g² (leaf shapes); log_rate: per-leaf () float32 log of the
    tensor's adapted rate multiplier α_T (empty when `rate_adaptation` is 0); estimate: the
    DistanceEstimate with `rate_estimate` (else empty); history: per-leaf (dmd_history, *leaf.shape)
    float32, the tensor's last steps before the schedule, oldest first (empty without DMD)."""

    count: jax.Array
    momenta: tuple
    rms: tuple
    log_rate: tuple = ()
    estimate: tuple = ()
    history: tuple = ()


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x))) if x.size else jnp.float32(0.0)


def tensor_features(p: jax.Array, rms: jax.Array | None = None) -> jax.Array:
    """f_T of one parameter tensor, (3,) float32: log10 rms(p) + 1, log10 fan_in - 1.5, [ndim ≤ 1].
    fan_in of a ≥2-D tensor is size / last dimension (dense (in, out), conv HWIO). `rms`: rms(p),
    when the caller has it already."""
    p = p.astype(jnp.float32)
    rms = _rms(p) if rms is None else rms
    fan_in = p.size // p.shape[-1] if p.ndim >= 2 and p.shape[-1] else 1
    return jnp.stack([jnp.log10(rms + 1e-8) + 1.0, jnp.float32(math.log10(max(fan_in, 1)) - 1.5),
                      jnp.float32(p.ndim <= 1)])


def _mlp_apply(mlp: dict, x: jax.Array, bias: jax.Array) -> jax.Array:
    """(F_element, n) features (w0's first F_element rows weigh them) → (n,) outputs.
    Feature-major, so each layer is one W^T @ X; a large tensor goes through in chunks of CHUNK
    elements (`lax.map`), so the (hidden, n) activations of a million-parameter tensor are never
    materialised (fresh multi-MB buffers cost page faults on every call, as small_fc found)."""

    def apply(chunk):
        h = jax.nn.relu(mlp["w0"][:x.shape[0]].T @ chunk + bias[:, None])
        return (mlp["w1"].T @ h + mlp["b1"][:, None])[0]

    n = x.shape[1]
    if n <= CHUNK:
        return apply(x)
    chunks = -(-n // CHUNK)
    size = -(-n // chunks // 128) * 128  # equal chunks of ≤ CHUNK, little padding
    x = jnp.pad(x, ((0, 0), (0, chunks * size - n))).reshape(x.shape[0], chunks, size)
    return jax.lax.map(apply, x.transpose(1, 0, 2)).reshape(-1)[:n]


def clip_rms(x: jax.Array, bound: float) -> jax.Array:
    """x scaled down, if need be, so that its RMS is at most `bound` (unchanged below it)."""
    rms = _rms(x)
    return x * jnp.minimum(1.0, bound / jnp.maximum(rms, 1e-30))


@dataclasses.dataclass(frozen=True)
class NominalMLP:
    """Adam on a schedule plus a bounded learned correction (see module docstring)."""

    hidden: int = 16
    # Chosen on held-out draws of the reference recipe's training mix (untrained, 0.003-0.1), never
    # on an evaluation suite: docs/reference_optimizer.md.
    learning_rate: float = 0.03
    warmup: float = 0.05  # fraction of the run
    stable: float = 0.0  # fraction of the run at the peak after the warm-up (0: v1-v8 load unchanged)
    rms_decay: float = RMS_DECAY  # Adam's β2 (0.999: v1-v8 load unchanged)
    correction_bound: float = 1.0
    relative_correction: bool = False  # False: reference v2's absolute bound, so it loads unchanged
    elementwise_correction: bool = False  # a per-element gain on d (False: v2-v4 load unchanged)
    rate_adaptation: float = 0.0  # κ of the per-tensor hypergradient rate; 0: off (v2, v3 load unchanged)
    rate_range: float = 2.3  # |log α_T| ≤ this: α_T within [1/10, 10] by default
    rate_after_warmup: bool = False  # hold α_T at 1 through the warm-up (False: v4, v5 load unchanged)
    rate_on_schedule: bool = False  # κ times lr(t)/peak (False: v4-v6 load unchanged)
    rate_threshold: float = 0.0  # log α_T grows only while cos(g_t, d_{t-1}) > this (0: v2-v7 unchanged)
    rate_init: float = 0.0  # log α_T at step 0, within ±rate_range (0: v2-v7 load unchanged)
    # Prodigy's coefficient on its estimate of the peak rate; 0: off, the peak is learning_rate
    # (v2-v8 load unchanged). On, learning_rate multiplies the estimate (Prodigy's convention: 1).
    rate_estimate: float = 0.0
    # k ≥ 3: the MLP also sees features of a dynamic mode decomposition of each tensor's last k
    # steps (`optimizers.dmd`); 0: off (v1-v8 load unchanged).
    dmd_history: int = 0
    weight_decay: float = 0.0
    eps: float = 1e-8

    name = "nominal_mlp"
    description = ("Adam on the user's schedule + a bounded learned per-parameter correction "
                   "(nominal term, Celo2, muLO)")
    learned = True

    def __post_init__(self):
        if (self.hidden < 1 or not 0 <= self.warmup < 1 or not 0 <= self.stable < 1 - self.warmup
                or not 0 < self.rms_decay < 1 or self.correction_bound < 0
                or self.rate_adaptation < 0 or self.rate_range < 0 or abs(self.rate_init) > self.rate_range
                or not -1 < self.rate_threshold < 1
                or not (math.isfinite(self.rate_estimate) and self.rate_estimate >= 0)
                or not (self.dmd_history == 0 or self.dmd_history >= dmd.RANK + 1)):
            raise ValueError(f"nominal_mlp needs hidden >= 1, 0 <= warmup < 1, 0 <= stable < 1 - warmup, "
                             f"0 < rms_decay < 1, correction_bound, "
                             f"rate_adaptation, rate_range and rate_estimate >= 0, |rate_init| <= "
                             f"rate_range, -1 < rate_threshold < 1 (a cosine's range) and dmd_history "
                             f"0 (off) or >= {dmd.RANK + 1}, got {self}")

    @property
    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def feature_groups(self) -> tuple[str, ...]:
        """What `as_optax(..., ablate=...)` takes."""
        return FEATURE_GROUPS + (("dmd",) if self.dmd_history else ())

    @property
    def num_features(self) -> tuple[int, int]:
        """(per element, in all) inputs of the MLP: w0's rows are the element features, then the
        per-tensor, per-step and (with DMD) DMD per-tensor features."""
        extra = (dmd.NUM_ELEMENT_FEATURES, dmd.NUM_TENSOR_FEATURES) if self.dmd_history else (0, 0)
        return NUM_ELEMENT_FEATURES + extra[0], NUM_FEATURES + sum(extra)

    def init(self, key: jax.Array) -> dict:
        num_features = self.num_features[1]
        w0 = jax.random.truncated_normal(key, -2.0, 2.0, (num_features, self.hidden), jnp.float32)
        return {
            "mlp": {"w0": w0 / np.sqrt(num_features), "b0": jnp.zeros((self.hidden,), jnp.float32),
                    "w1": jnp.zeros((self.hidden, 1), jnp.float32), "b1": jnp.zeros((1,), jnp.float32)},
            "tensor": {"w": jnp.zeros((NUM_TENSOR_FEATURES,), jnp.float32), "b": jnp.zeros((), jnp.float32)},
        }

    def reset_slots(self, tx: Any, state: NominalMLPState, regrown: Any) -> NominalMLPState:
        """The regrown slots' momenta and second moments (and, with `rate_estimate`, starting
        points and gradient sums; with DMD, their step histories) set to 0; the per-tensor rates
        stay (`optimizers.slots`)."""
        del tx
        masks = jax.tree.leaves(regrown)

        def zero(leaves: tuple) -> tuple:
            return tuple(zero_where(x, m) for x, m in zip(leaves, masks, strict=True))

        estimate = state.estimate
        if estimate:
            estimate = estimate._replace(x0=zero(estimate.x0), grad_sum=zero(estimate.grad_sum))
        return state._replace(momenta=zero(state.momenta), rms=zero(state.rms), estimate=estimate,
                              history=zero(state.history) if state.history else ())

    def as_optax(self, theta: Any, num_steps: int, learning_rate: float | optax.Schedule | None = None,
                 ablate: tuple[str, ...] = ()) -> optax.GradientTransformationExtraArgs:
        """`learning_rate`: None for `self.learning_rate` with cosine decay over `num_steps`, a float
        for that rate on the same schedule, or the user's own optax schedule (step -> rate).
        `ablate`: groups of FEATURE_GROUPS the learned parts see as 0, to measure what each
        contributes (`metaopt inspect`); the nominal direction is untouched."""
        unknown = sorted(set(ablate) - set(self.feature_groups))
        if unknown:
            raise ValueError(f"nominal_mlp cannot ablate {unknown}: its feature groups are "
                             f"{self.feature_groups}")
        if theta["mlp"]["w0"].shape[0] != self.num_features[1]:
            raise ValueError(f"this θ's MLP takes {theta['mlp']['w0'].shape[0]} features, nominal_mlp with "
                             f"dmd_history={self.dmd_history} takes {self.num_features[1]}: build θ with the "
                             "same hyperparameters (opt.init) as the optimizer it is used with")

        def seen(group: str, x: jax.Array) -> jax.Array:
            return jnp.zeros_like(x) if group in ablate else x

        a_number = isinstance(learning_rate, int | float)
        if a_number and not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"nominal_mlp needs a positive, finite learning_rate, got {learning_rate!r}; "
                             "pass a rate such as 3e-3, or an optax schedule")
        if callable(learning_rate):
            # The step feature lr(t)/base needs the run's peak rate: a warm-up schedule starts at 0.
            schedule = learning_rate
            base = jnp.max(jax.vmap(schedule)(jnp.arange(max(num_steps, 1))))
        else:
            base = self.learning_rate if learning_rate is None else learning_rate
            schedule = cosine_schedule(base, num_steps, self.warmup, self.stable)
        mlp, law = theta["mlp"], theta["tensor"]
        decays = jnp.asarray(MOM_DECAYS, jnp.float32)
        adapt = self.rate_adaptation > 0
        hold_steps = int(round(self.warmup * num_steps))

        def init_fn(params):
            leaves = jax.tree.leaves(params)
            momenta = tuple(jnp.zeros((len(MOM_DECAYS), *jnp.shape(p)), jnp.float32) for p in leaves)
            rms = tuple(jnp.zeros(jnp.shape(p), jnp.float32) for p in leaves)
            log_rate = tuple(jnp.full((), self.rate_init, jnp.float32) for _ in leaves) if adapt else ()
            estimate = ()
            if self.rate_estimate > 0:
                estimate = DistanceEstimate(jnp.float32(ESTIMATE_START), jnp.float32(0.0),
                                            tuple(jnp.asarray(p, jnp.float32) for p in leaves), rms)
            history = tuple(jnp.zeros((self.dmd_history, *jnp.shape(p)), jnp.float32)
                            for p in leaves) if self.dmd_history else ()
            return NominalMLPState(jnp.zeros((), jnp.int32), momenta, rms, log_rate, estimate, history)

        def update_fn(updates, state, params=None, **extra_args):
            del extra_args  # e.g. loss=; not used
            if params is None:
                raise ValueError("nominal_mlp needs params (for weight decay and its per-tensor features)")
            grads, treedef = jax.tree.flatten(updates)
            leaves = treedef.flatten_up_to(params)
            count = state.count + 1
            t = count.astype(jnp.float32)
            lr = schedule(state.count)
            # Only with rate_after_warmup: without it the compiled step is versions 4 and 5's.
            held = state.count < hold_steps if self.rate_after_warmup else None
            lr_fraction = lr / jnp.maximum(jnp.abs(base), 1e-30)
            estimate, scale = state.estimate, 1.0
            if self.rate_estimate > 0:
                estimate = self._estimate_rate(estimate, grads, leaves, lr, t)
                # As Prodigy's, this step is taken at the estimate so far, and Adam's moments
                # average d·g: while d climbs by orders of magnitude, the gradients from when it was
                # small fade from them (on raw gradients the screen lost 4 more of 12 problems).
                scale = state.estimate.d
                lr = lr * scale
            step_feats = seen("progress", jnp.stack([state.count.astype(jnp.float32) / num_steps,
                                                     jnp.log10(t) / 4.0, lr_fraction]).astype(jnp.float32))
            pace = lr_fraction if self.rate_on_schedule else None
            # Bias corrections of every EMA (as optax: 1 - β^t).
            mom_fix = 1.0 - decays ** t
            rms_fix = 1.0 - self.rms_decay ** t
            new_updates, new_m, new_v, new_rate, new_history = [], [], [], [], []
            log_rates = state.log_rate if adapt else (None,) * len(grads)
            histories = state.history or (None,) * len(grads)
            for g, p, m, v, log_rate, history in zip(grads, leaves, state.momenta, state.rms, log_rates,
                                                     histories, strict=True):
                g32, p32 = g.astype(jnp.float32) * scale, p.astype(jnp.float32)
                bshape = (-1,) + (1,) * g32.ndim
                rate = 1.0
                if adapt:
                    log_rate = self._adapt_rate(log_rate, g32, m[ADAM_MOMENTUM], v, held, pace)
                    rate = jnp.exp(log_rate)
                    new_rate.append(log_rate)
                m = decays.reshape(bshape) * m + (1 - decays.reshape(bshape)) * g32
                v = self.rms_decay * v + (1 - self.rms_decay) * jnp.square(g32)
                denom = jnp.sqrt(v / rms_fix) + self.eps * scale
                ratios = m / mom_fix.reshape(bshape) / denom  # (K, *shape)
                direction = ratios[ADAM_MOMENTUM]
                p_rms = _rms(p32)
                f_t = seen("tensor", tensor_features(p32, p_rms))
                x = [
                    seen("gradient", jnp.clip(g32 / denom, -RATIO_CLIP, RATIO_CLIP).reshape(1, -1)),
                    seen("momenta", jnp.clip(ratios, -RATIO_CLIP, RATIO_CLIP).reshape(len(MOM_DECAYS), -1)),
                    seen("parameter", (p32 / jnp.maximum(p_rms, 1e-30)).reshape(1, -1)),
                ]  # (F_element, n) once joined: feature-major, so the MLP is W^T @ X
                shared = [f_t, step_feats]
                if history is not None:
                    dmd_element, dmd_tensor = dmd.features(history)
                    x.append(seen("dmd", dmd_element))
                    shared.append(seen("dmd", dmd_tensor))
                x = jnp.concatenate(x)
                bias = mlp["b0"] + jnp.concatenate(shared) @ mlp["w0"][x.shape[0]:]
                out = _mlp_apply(mlp, x, bias).reshape(g32.shape)
                if self.elementwise_correction:
                    correction = self.correction_bound * direction * jnp.tanh(out)
                else:
                    bound = self.correction_bound * (_rms(direction) if self.relative_correction else 1.0)
                    correction = clip_rms(out, bound)
                z = law["b"] + law["w"] @ f_t
                multiplier = jnp.exp(MULTIPLIER_RANGE * jnp.tanh(z / MULTIPLIER_RANGE))
                step = rate * multiplier * (direction + correction)
                if history is not None:
                    # The step before the schedule: a warm-up or a decay would read as a mode of
                    # its own, growing or fading, in every tensor alike.
                    new_history.append(dmd.push(history, step))
                u = -lr * (step + self.weight_decay * p32)
                new_updates.append(u.astype(g.dtype))
                new_m.append(m)
                new_v.append(v)
            new_state = NominalMLPState(count, tuple(new_m), tuple(new_v), tuple(new_rate), estimate,
                                        tuple(new_history))
            return jax.tree.unflatten(treedef, new_updates), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def _estimate_rate(self, estimate: DistanceEstimate, grads: list, params: list, lr: jax.Array,
                       t: jax.Array) -> DistanceEstimate:
        """One step of Prodigy's estimate of the rate (Mishchenko & Defazio 2023, Algorithm 4, as
        optax.contrib.prodigy): d grows to coef · Σ_k λ_k d_k <g_k, x_0 - x_k> / ||Σ_k λ_k d_k g_k||_1,
        where λ_k = d_k lr(k) bc_k, both sums decayed by β3 = sqrt(β2), and never falls. The
        numerator says how far the run has moved along its gradients, the denominator how large they
        were: their ratio is a distance to the solution over a gradient size, the rate at which
        Adam's step covers it. d_0 divides both sums to keep them in float32's range (it cancels
        in the ratio); a step at lr(k) = 0 (a warm-up from 0) adds nothing to either."""
        d = estimate.d
        beta3 = math.sqrt(self.rms_decay)
        bias = jnp.sqrt(1.0 - self.rms_decay ** t) / (1.0 - MOM_DECAYS[ADAM_MOMENTUM] ** t)
        weight = d / ESTIMATE_START * d * lr * bias  # λ_k d_k / d_0
        moved = sum(jnp.vdot(g.astype(jnp.float32), x0 - p.astype(jnp.float32))
                    for g, x0, p in zip(grads, estimate.x0, params, strict=True))
        numerator = beta3 * estimate.numerator + weight * moved
        grad_sum = tuple(beta3 * s + weight * g.astype(jnp.float32)
                         for s, g in zip(estimate.grad_sum, grads, strict=True))
        denominator = sum(jnp.sum(jnp.abs(s)) for s in grad_sum)
        proposal = jnp.where(denominator > 0, self.rate_estimate * numerator
                             / jnp.maximum(denominator, 1e-30), 0.0)
        return DistanceEstimate(jnp.maximum(d, proposal), numerator, estimate.x0, grad_sum)

    def _adapt_rate(self, log_rate: jax.Array, g: jax.Array, m_prev: jax.Array,
                    v_prev: jax.Array, held: jax.Array | None, pace: jax.Array | None) -> jax.Array:
        """One hypergradient step on log α_T (Baydin et al. 2018, per tensor and multiplicative):
        ∂loss/∂log α_T ∝ -<g_t, d_{t-1}>, so α grows while the new gradient still points along the
        last step (the rate is too small) and shrinks when it turns against it (overshoot), and
        under pure gradient noise it drifts down, an annealing of its own. The cosine makes the
        step scale-free; bias corrections are per-tensor scalars and drop out of it. While `held`
        (the warm-up, with `rate_after_warmup`), log α_T stays where it is; `pace` (lr(t)/peak, with
        `rate_on_schedule`) scales the step."""
        d_prev = m_prev / (jnp.sqrt(v_prev) + 1e-30)
        cos = jnp.vdot(g, d_prev) / (jnp.linalg.norm(g) * jnp.linalg.norm(d_prev) + 1e-30)
        step = self.rate_adaptation * (cos - self.rate_threshold)
        if pace is not None:
            step = step * pace
        if held is not None:
            step = jnp.where(held, 0.0, step)
        return jnp.clip(log_rate + step, -self.rate_range, self.rate_range)
