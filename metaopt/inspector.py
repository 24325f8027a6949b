"""What an optimizer does, read off with probes (Maheswaranathan et al. 2021, "Reverse engineering
learned optimizers"): `metaopt inspect REF` and `inspect(optimizer, theta)`.

Every probe but the training run uses one synthetic tensor of PROBE_SIZE parameters, fixed at
0.1·N(0, 1), and a "running" optimizer state: WARMUP steps of N(0, σ²) gradients (σ = 1) into
a run of HORIZON steps, so that a learned optimizer sees a state of the kind it trains in. The
probes, each averaged over SEEDS independent states:

- **response**: the update of one coordinate as a function of its gradient x at that fixed
  state (the other coordinates get fresh noise), minus its update at x = 0; x over ±1e-2..1e2 σ.
  Its shape: `linear` (within 5% of the small-gradient slope everywhere), `clipped` (linear, then
  flat beyond a threshold: the clip, = the largest response over the small-gradient slope),
  `sign-like` (half the largest response already at x = 1e-2 σ), else `saturating`.
- **impulse**: the mean change of the next updates after one step's gradient gets an extra σ on
  every coordinate (same noise with and without), normalised by the first: its decay is the
  optimizer's momentum. Reported as β (the fitted geometric decay per step), its timescale
  -1/log β, and the memory Σ_t r_t (1/(1 - β) for momentum β; 1 without momentum).
- **scale**: the exponent of the update's size against the gradients' scale c (warm-up and probe
  gradients times c, c in 1e-3, 1, 1e3): 1 for SGD's linear rule, 0 for Adam's invariance.
- **schedule**: a real training run (MLP on 8×8 digits, RUN_STEPS) with the effective learning
  rate -<u, g>/<g, g> of every step: its warm-up, peak and decay.
- **ablation** (an optimizer that names its feature groups, `FEATURE_GROUPS`, and takes
  `as_optax(..., ablate=...)`): the relative change of the update at the running state when the
  learned parts see each group as 0.

Curvature optimizers (K-FAC, FOOF, MBF) need a task's per-layer statistics: only the training run
probes them; the synthetic probes say so in their place.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import optimizers, task_zoo
from metaopt.task_zoo.layer_stats import loss_grad_and_extras

PROBE_SIZE = 256
WARMUP = 100
HORIZON = 1000
SEEDS = 8
IMPULSE_STEPS = 40
RUN_STEPS = 300
RUN_TASK = {"name": "mlp",
            "kwargs": {"width": 64, "depth": 2, "activation": "relu", "batch_size": 64, "seed": 0}}
GRID = np.concatenate([-np.logspace(2, -2, 25), [0.0], np.logspace(-2, 2, 25)])
SCALES = (1e-3, 1.0, 1e3)
LOSS = 1.0  # the loss= an optimizer that reads it is shown at every synthetic step


def _tx(optimizer, theta, num_steps: int, **options) -> optax.GradientTransformationExtraArgs:
    return optax.with_extra_args_support(optimizer.as_optax(theta, num_steps, **options))


def _warm(tx, key: jax.Array, scale: float = 1.0):
    """(params, state, probe gradient) at step WARMUP of a run of noise gradients times `scale`."""
    k_params, k_grads, k_probe = jax.random.split(key, 3)
    params = {"w": 0.1 * jax.random.normal(k_params, (PROBE_SIZE,))}

    def body(state, k):
        _, state = tx.update({"w": scale * jax.random.normal(k, (PROBE_SIZE,))}, state, params, loss=LOSS)
        return state, None

    state, _ = jax.lax.scan(body, tx.init(params), jax.random.split(k_grads, WARMUP))
    return params, state, scale * jax.random.normal(k_probe, (PROBE_SIZE,))


def _seeds(key: jax.Array) -> jax.Array:
    return jax.random.split(key, SEEDS)


def response(tx, key: jax.Array) -> dict:
    """The update of coordinate 0 against its gradient x at a running state (module docstring)."""

    def one(k):
        params, state, probe = _warm(tx, k)
        u = jax.vmap(lambda x: tx.update({"w": probe.at[0].set(x)}, state, params, loss=LOSS)[0]["w"][0])
        return -(u(jnp.asarray(GRID, jnp.float32)) - u(jnp.zeros((1,)))[0])

    r = np.asarray(jax.jit(jax.vmap(one))(_seeds(key)), np.float64).mean(axis=0)
    return {"gradient": GRID.tolist(), "response": r.tolist(), **_shape(GRID, r)}


def _shape(x: np.ndarray, r: np.ndarray) -> dict:
    """Classify a response curve (odd, x > 0 half read): linear, clipped, sign-like or saturating."""
    pos = x > 0
    x, r = x[pos], r[pos]
    slope = r[0] / x[0]  # at 1e-2 σ
    peak = np.max(np.abs(r))
    if not np.all(np.isfinite(r)) or slope <= 0 or peak == 0:
        return {"shape": "other", "small_gradient_slope": float(slope), "clip": None}
    linear = np.abs(r / (slope * x) - 1) <= 0.05
    if linear.all():
        return {"shape": "linear", "small_gradient_slope": float(slope), "clip": None}
    clip = peak / slope
    flat = np.abs(r / peak - 1) <= 0.05
    if x[0] < clip < x[-1] and linear[x <= clip / 2].all() and flat[x >= 2 * clip].all():
        return {"shape": "clipped", "small_gradient_slope": float(slope), "clip": float(clip)}
    shape = "sign-like" if r[0] >= 0.5 * peak else "saturating"
    return {"shape": shape, "small_gradient_slope": float(slope), "clip": None}


def impulse(tx, key: jax.Array) -> dict:
    """The decay of one gradient spike's effect on the next updates (module docstring)."""

    def one(k):
        params, state, _ = _warm(tx, k)
        noise = jax.random.normal(jax.random.fold_in(k, 1), (IMPULSE_STEPS, PROBE_SIZE))

        def run(spike):
            def body(state, xs):
                g, i = xs
                u, state = tx.update({"w": g + jnp.where(i == 0, spike, 0.0)}, state, params, loss=LOSS)
                return state, u["w"]

            return jax.lax.scan(body, state, (noise, jnp.arange(IMPULSE_STEPS)))[1]

        return jnp.mean(run(1.0) - run(0.0), axis=1)

    d = np.asarray(jax.jit(jax.vmap(one))(_seeds(key)), np.float64).mean(axis=0)
    r = d / d[0] if d[0] != 0 else np.zeros_like(d)
    out = {"response": r.tolist(), "memory": float(r.sum())}
    end = next((t for t in range(1, len(r)) if r[t] <= 0.05), len(r))
    if end < 3:  # no lasting effect past the spike's own step: no momentum
        return {**out, "beta": 0.0, "timescale": 0.0}
    t = np.arange(1, end)
    slope = np.polyfit(t, np.log(r[1:end]), 1)[0]
    beta = float(math.exp(slope))
    return {**out, "beta": beta, "timescale": float(-1 / slope) if slope < 0 else math.inf}


def scale_exponent(optimizer, theta, key: jax.Array) -> dict:
    """d log ‖u‖ / d log c with every gradient times c (module docstring)."""
    tx = _tx(optimizer, theta, HORIZON)

    def size(scale, k):
        params, state, probe = _warm(tx, k, scale)
        return jnp.sqrt(jnp.mean(tx.update({"w": probe}, state, params, loss=LOSS)[0]["w"] ** 2))

    sizes = jax.jit(jax.vmap(lambda c: jnp.mean(jax.vmap(lambda k: size(c, k))(_seeds(key)))))(
        jnp.asarray(SCALES, jnp.float32))
    sizes = np.asarray(sizes, np.float64)
    exponent = float(np.polyfit(np.log(SCALES), np.log(sizes), 1)[0])
    return {"scales": list(SCALES), "update_rms": sizes.tolist(), "exponent": exponent}


def ablation(optimizer, theta, key: jax.Array) -> dict | None:
    """{group: ‖u_ablated - u‖ / ‖u‖ at the running states}, or None without feature groups."""
    groups = getattr(optimizer, "feature_groups", None)
    if not groups:
        return None
    tx = _tx(optimizer, theta, HORIZON)
    ablated = [_tx(optimizer, theta, HORIZON, ablate=(g,)) for g in groups]

    def one(k):
        params, state, probe = _warm(tx, k)  # the state of the whole optimizer's run
        u = tx.update({"w": probe}, state, params, loss=LOSS)[0]["w"]
        v = jnp.stack([a.update({"w": probe}, state, params, loss=LOSS)[0]["w"] for a in ablated])
        return jnp.linalg.norm(v - u, axis=1) / jnp.maximum(jnp.linalg.norm(u), 1e-30)

    changes = np.asarray(jax.jit(jax.vmap(one))(_seeds(key)), np.float64).mean(axis=0)
    return dict(zip(groups, changes.tolist(), strict=True))


def schedule(optimizer, theta, key: jax.Array, steps: int = RUN_STEPS) -> dict:
    """A training run of RUN_TASK with each step's effective rate -<u, g>/<g, g> and loss."""
    task = task_zoo.task(task_zoo.TaskSpec(RUN_TASK["name"], RUN_TASK["kwargs"]))
    tx = _tx(optimizer, theta, steps)
    k_init, k_steps = jax.random.split(key)

    def body(carry, k):
        params, state = carry
        batch_key, loss_key = jax.random.split(k)
        loss, grads, extra = loss_grad_and_extras(task, optimizer, params, loss_key,
                                                  task.batch(batch_key, task_zoo.TRAIN))
        updates, state = tx.update(grads, state, params, loss=loss, **extra)
        dot = sum(jax.tree.leaves(jax.tree.map(jnp.vdot, updates, grads)))
        norm = sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))
        return (optax.apply_updates(params, updates), state), (loss, -dot / jnp.maximum(norm, 1e-30))

    params = task.init(k_init)
    run = jax.jit(lambda c, ks: jax.lax.scan(body, c, ks)[1])
    losses, rates = (np.asarray(a, np.float64) for a in run((params, tx.init(params)),
                                                            jax.random.split(k_steps, steps)))
    smooth = np.convolve(rates, np.ones(10) / 10, mode="valid")  # a 10-step mean: minibatch noise out
    peak = float(smooth.max())
    return {"task": RUN_TASK, "steps": steps, "loss": losses.tolist(), "effective_rate": rates.tolist(),
            "peak_rate": peak, "peak_step": int(smooth.argmax()) + 5,
            "warmup_steps": int(np.argmax(smooth >= 0.9 * peak)) + 5,
            "final_over_peak": float(smooth[-1] / peak) if peak > 0 else None,
            "constant": bool(peak > 0 and smooth.min() >= 0.95 * peak)}


def inspect(optimizer, theta, label: str | None = None, key: jax.Array | None = None,
            compare: bool = True, run_steps: int = RUN_STEPS) -> dict:
    """Every probe of `optimizer` at `theta` (module docstring); `compare` adds Adam's response,
    impulse and training run (the paper's reference) to the same report."""
    key = jax.random.key(0) if key is None else key
    out: dict[str, Any] = {"optimizer": label or optimizer.name, "name": optimizer.name,
                           "hparams": optimizer.hparams,
                           "schedule": schedule(optimizer, theta, key, run_steps)}
    if getattr(optimizer, "needs_layer_stats", False):
        out["synthetic"] = (f"{optimizer.name} needs a task's per-layer statistics: only the training run "
                            "probes it")
    else:
        tx = _tx(optimizer, theta, HORIZON)
        out |= {"response": response(tx, key), "impulse": impulse(tx, key),
                "scale": scale_exponent(optimizer, theta, key), "ablation": ablation(optimizer, theta, key)}
    if compare and optimizer.name != "adam":
        adam = _tx(optimizers.make("adam"), {}, HORIZON)
        out["adam"] = {"response": response(adam, key), "impulse": impulse(adam, key),
                       "schedule": schedule(optimizers.make("adam"), {}, key, run_steps)}
    return out


def summary(result: dict) -> list[str]:
    """The report's findings, one sentence each."""
    lines = []
    if "response" in result:
        r = result["response"]
        clip = f" at a gradient of {r['clip']:.3g} σ" if r["clip"] else ""
        lines.append(f"Update against gradient at a running state: {r['shape']}{clip} "
                     f"(small-gradient slope {r['small_gradient_slope']:.3g}).")
        i = result["impulse"]
        lines.append(f"Momentum: a gradient spike's effect decays as β = {i['beta']:.3f} per step "
                     f"(timescale {i['timescale']:.3g} steps; memory {i['memory']:.3g} steps' worth).")
        s = result["scale"]
        kind = "scale-invariant, as Adam" if abs(s["exponent"]) < 0.1 else \
            "linear in the gradient, as SGD" if abs(s["exponent"] - 1) < 0.1 else "partly scale-adaptive"
        lines.append(f"Gradient scale: the update grows as c^{s['exponent']:.2f} with gradients times c "
                     f"({kind}).")
    else:
        lines.append(result["synthetic"] + ".")
    s = result["schedule"]
    if s["constant"]:
        lines.append(f"Effective learning rate on the training run: constant at {s['peak_rate']:.3g}.")
    else:
        lines.append(f"Effective learning rate on the training run: peak {s['peak_rate']:.3g} at step "
                     f"{s['peak_step']} (90% of it by step {s['warmup_steps']}), "
                     f"{s['final_over_peak']:.2g}× the peak at the end.")
    if result.get("ablation"):
        ranked = sorted(result["ablation"].items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{g} {c:.1%}" for g, c in ranked)
        lines.append(f"Change of the update when the learned parts see a feature group as 0: {parts}.")
    return lines


def write_report(result: dict, out: pathlib.Path) -> dict[str, pathlib.Path]:
    """inspect.json, inspect.md and inspect.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "inspect.json", "md": out / "inspect.md", "png": out / "inspect.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    lines = [f"# What `{result['optimizer']}` does", "", *(f"- {line}" for line in summary(result)), "",
             "![probes](inspect.png)", "",
             "Probes: `metaopt/inspector.py` (its docstring says how each is made)."]
    paths["md"].write_text("\n".join(lines) + "\n")
    plot(result, paths["png"])
    return paths


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = result["optimizer"]
    panels = ["response", "impulse", "schedule", "ablation"] if "response" in result else ["schedule"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "response":
            for who, r in ((name, result["response"]), ("adam", result.get("adam", {}).get("response"))):
                if r is not None:
                    x, y = np.asarray(r["gradient"]), np.asarray(r["response"])
                    slope = r["small_gradient_slope"]
                    ax.plot(x, y / slope if slope > 0 else y, label=who)
            ax.plot(GRID, GRID, color="grey", lw=0.8, ls=":", label="linear")
            ax.set(xscale="symlog", yscale="symlog", xlabel="gradient (σ of the running noise)",
                   ylabel="-Δupdate / small-gradient slope", title="update against gradient")
        elif panel == "impulse":
            for who, i in ((name, result["impulse"]), ("adam", result.get("adam", {}).get("impulse"))):
                if i is not None:
                    ax.plot(np.clip(i["response"], 1e-4, None), label=f"{who} (β {i['beta']:.2f})")
            ax.set(yscale="log", xlabel="steps after the spike", ylabel="effect on the update (first = 1)",
                   title="impulse response")
        elif panel == "schedule":
            top = 0.0
            for who, s in ((name, result["schedule"]), ("adam", result.get("adam", {}).get("schedule"))):
                if s is not None:
                    smooth = np.convolve(s["effective_rate"], np.ones(10) / 10, "valid")
                    line, = ax.plot(s["effective_rate"], lw=0.5, alpha=0.3)
                    ax.plot(np.arange(5, 5 + len(smooth)), smooth, color=line.get_color(),
                            label=f"{who} (10-step mean)")
                    top = max(top, smooth.max())
            ax.set_ylim(-0.1 * top, 1.3 * top)  # single noisy steps beyond it are cut
            ax.set(xlabel="step", ylabel="-<u, g> / <g, g>", title="effective learning rate (MLP, digits)")
        else:
            groups = result.get("ablation") or {}
            ax.bar(list(groups), list(groups.values()))
            ax.set(ylabel="‖Δupdate‖ / ‖update‖", title="feature groups ablated")
            if not groups:
                ax.text(0.5, 0.5, "no feature groups", ha="center", transform=ax.transAxes)
            ax.tick_params(axis="x", labelrotation=30)
        if panel != "ablation":
            ax.legend(fontsize=7)
    fig.suptitle(f"metaopt inspect {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
