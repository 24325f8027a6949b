"""How closely metaopt.torch follows the JAX optimizers, step for step, for every learned
architecture: the largest difference of a parameter tensor between the frameworks over its RMS.

    python benchmarks/torch_numerics.py [--quick] [--json] [--out DIR]

The problem has several tensors of every kind: a conv layer (weight (4, 2, 3, 3) and bias), a
dense layer (weight (3, 64) and bias) and a scalar. torch keeps the weights as (out, in, kh, kw)
and (out, in); the JAX twins hold the same numbers as (kh, kw, in, out) and (in, out).
Open loop: one recorded sequence of gradients and losses fed to both, the error read at every
100th of 1,000 steps. Closed loop: each framework computes its own gradients of the same conv net
on the same data, the error read at every 20th of 200 steps. tests/test_torch.py asserts the
tolerances on the same functions.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import metaopt.torch as mt
from metaopt import optimizers, registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
REGISTRY = str(ROOT / "examples" / "registry")
SHAPES = {"conv_w": (4, 2, 3, 3), "conv_b": (4,), "fc_w": (3, 64), "fc_b": (3,), "scale": ()}
# Every option path of the published versions: 1 small_fc (one hidden layer); nominal_mlp's 2
# absolute correction, 3 relative, 4 with the per-tensor rate, 5 element-wise gain, 7 rate at the
# schedule's pace, 9 Adam's β2 at 0.9 (the champion). Beside them, untrained variants (below).
VERSIONS = [1, 2, 3, 4, 5, 7, 9]
UNTRAINED = ["small_fc", "adafac_mlp", "lstm_l2l", "nn_adam", "rnn_mlp", "lgl2o"]  # every other architecture
CLOSED_LOOP_VERSIONS = [1, 4, 9]  # and every untrained case
OPEN_LOOP_STEPS, CLOSED_LOOP_STEPS = 1000, 200


def jax_layout(a: np.ndarray) -> np.ndarray:
    """A torch-ordered weight in JAX's order: (out, in, kh, kw) → (kh, kw, in, out), (out, in) → (in, out)."""
    return {4: lambda x: x.transpose(2, 3, 1, 0), 2: lambda x: x.T}.get(a.ndim, lambda x: x)(a)


def initial(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.normal(size=s) * 0.3, np.float32) for k, s in SHAPES.items()}


def untrained(name: str) -> registry.TrainedOptimizer:
    """`name`'s initial θ; a zero-initialised head (nn_adam's, rnn_mlp's nominal scale) made
    random, so that every learned part acts."""
    opt = optimizers.make(name)
    theta = jax.tree.map(np.asarray, opt.init(jax.random.key(5)))
    head = {"nn_adam": "head", "rnn_mlp": "nominal"}.get(name)
    if head:
        w = np.random.default_rng(2).normal(size=theta[head]["w"].shape) * 0.3
        theta[head]["w"] = np.asarray(w, np.float32)
    return registry.TrainedOptimizer(name, 0, name, opt.hparams, theta, {})


def untrained_variant() -> registry.TrainedOptimizer:
    """nominal_mlp's options no published version uses (rate held through the warm-up, a
    threshold and a start for it, weight decay, a stable phase, Adam's β2), with a random output
    layer so the learned correction acts."""
    hparams = dict(relative_correction=True, rate_adaptation=0.1, rate_after_warmup=True, rate_threshold=0.1,
                   rate_init=-0.5, weight_decay=0.01, warmup=0.1, stable=0.3, rms_decay=0.99)
    opt = optimizers.make("nominal_mlp", **hparams)
    theta = jax.tree.map(np.asarray, opt.init(jax.random.key(3)))
    w1 = np.random.default_rng(1).normal(size=theta["mlp"]["w1"].shape)
    theta["mlp"]["w1"] = np.asarray(w1, np.float32)
    theta["tensor"]["w"] = np.asarray([0.3, -0.2, 0.1], np.float32)
    return registry.TrainedOptimizer("variant", 0, "nominal_mlp", opt.hparams, theta, {})


def case(version) -> registry.TrainedOptimizer:
    """reference:VERSION for an int, else "variant" or an untrained architecture's name."""
    if isinstance(version, int):
        return registry.load(f"reference:{version}", REGISTRY)
    return untrained_variant() if version == "variant" else untrained(version)


def relative_error(torch_params: dict, jax_params: dict) -> float:
    worst = 0.0
    for k, p in torch_params.items():
        a, b = jax_layout(p.detach().numpy()), np.asarray(jax_params[k])
        worst = max(worst, float(np.max(np.abs(a - b)) / (np.sqrt(np.mean(b**2)) + 1e-12)))
    return worst


def open_loop(trained: registry.TrainedOptimizer, steps: int = OPEN_LOOP_STEPS) -> dict:
    """{"errors": at every 100th step, "moved": how far JAX's parameters went (same measure)}."""
    rng = np.random.default_rng(1)
    init = initial()
    tx = trained.as_optax(num_steps=steps)
    update = jax.jit(tx.update)
    jax_params = {k: jnp.asarray(jax_layout(v)) for k, v in init.items()}
    state = tx.init(jax_params)
    torch_params = {k: torch.tensor(v) for k, v in init.items()}
    opt = mt.from_trained(trained, list(torch_params.values()), num_steps=steps)
    errors = []
    for step in range(1, steps + 1):
        # Gradients of varying size, with a pull towards the start (as a loss's curvature gives).
        scale = 0.1 * (0.5 + np.cos(step / 50) ** 2)
        grads = {k: np.asarray(rng.normal(size=s) * scale + 0.05 * init[k], np.float32)
                 for k, s in SHAPES.items()}
        loss = np.float32(2.0 * np.exp(-step / 300) + 0.1 * rng.random())  # read by nn_adam, rnn_mlp
        jax_grads = {k: jnp.asarray(jax_layout(g)) for k, g in grads.items()}
        updates, state = update(jax_grads, state, jax_params, loss=loss)
        jax_params = optax.apply_updates(jax_params, updates)
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(grads[k])
        opt.step(loss=float(loss))
        if step % 100 == 0:
            errors.append(relative_error(torch_params, jax_params))
    moved = relative_error({k: torch.tensor(v) for k, v in init.items()}, jax_params)
    return {"errors": errors, "moved": moved}


def torch_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(torch.nn.functional.conv2d(x, p["conv_w"], p["conv_b"]))
    logits = (h.flatten(1) @ p["fc_w"].T + p["fc_b"]) * p["scale"]
    return torch.nn.functional.cross_entropy(logits, y)


def jax_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), p["conv_w"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + p["conv_b"]).transpose(0, 3, 1, 2)  # flattened as torch does: (C, H, W)
    logits = (h.reshape(h.shape[0], -1) @ p["fc_w"] + p["fc_b"]) * p["scale"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def closed_loop(trained: registry.TrainedOptimizer, steps: int = CLOSED_LOOP_STEPS) -> dict:
    """{"errors": at every 20th step, "first_loss", "last_loss": torch's}."""
    rng = np.random.default_rng(2)
    x = np.asarray(rng.normal(size=(32, 2, 6, 6)), np.float32)
    y = rng.integers(0, 3, size=32)
    init = initial()
    init["scale"] = np.float32(1.0)
    tx = trained.as_optax(num_steps=steps)
    jax_params = {k: jnp.asarray(jax_layout(v)) for k, v in init.items()}
    state = tx.init(jax_params)

    @jax.jit
    def jax_step(params, state):
        grads = jax.grad(jax_loss)(params, jnp.asarray(x), jnp.asarray(y))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    opt = mt.from_trained(trained, list(torch_params.values()), num_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    first = torch_loss(torch_params, xt, yt).item()
    errors = []
    for step in range(1, steps + 1):
        jax_params, state = jax_step(jax_params, state)
        opt.zero_grad()
        torch_loss(torch_params, xt, yt).backward()
        opt.step()
        if step % 20 == 0:
            errors.append(relative_error(torch_params, jax_params))
    return {"errors": errors, "first_loss": first, "last_loss": torch_loss(torch_params, xt, yt).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps, the champion only")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=pathlib.Path, help="write torch_numerics.json here")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    opens = [4] if args.quick else [*VERSIONS, "variant", *UNTRAINED]
    closeds = [4] if args.quick else [*CLOSED_LOOP_VERSIONS, "variant", *UNTRAINED]
    rows = []
    for version in opens:
        result = open_loop(case(version), OPEN_LOOP_STEPS // scale)
        rows.append({"case": str(version), "loop": "open", "worst": max(result["errors"]), **result})
    for version in closeds:
        result = closed_loop(case(version), CLOSED_LOOP_STEPS // scale)
        rows.append({"case": str(version), "loop": "closed", "worst": max(result["errors"]), **result})
    result = {"benchmark": "torch_numerics", "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
              "torch": torch.__version__, "jax": jax.__version__, "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "torch_numerics.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
        return
    for r in rows:
        name = f"reference:{r['case']}" if r["case"].isdigit() else r["case"]
        print(f"{r['loop']:>6} loop {name:<12} worst relative difference {r['worst']:.2e}", file=sys.stdout)


if __name__ == "__main__":
    main()
