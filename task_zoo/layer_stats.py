"""Per-layer statistics, an optional capability of a task: what K-FAC, FOOF and MBF precondition with.

A task that has it defines `tapped_loss(params, key, batch, taps)`: its loss, computed with every
dense or convolutional layer's pre-activation passed through `taps(name, inputs, outputs)`. `name`
is the layer's key in `params` (whose value is {"w", "b"} or, for a bias-free layer, the weight
array itself); `inputs` is what multiplies the weight, (..., fan_in) (for a convolution, the
patches of `conv_patches`, so that a layer is always inputs @ w.reshape(fan_in, fan_out) + b);
`outputs` is (..., fan_out). `loss` and `tapped_loss` compute the same number; `loss` stays as it
was, so nothing changes in programs that do not ask for statistics.

`loss_grad_and_layer_stats` adds a zero to each layer's output and differentiates with respect to
it, which gives every example's gradient with respect to the layer's output in one backward pass,
the one that also gives the parameters' gradient (Grosse & Martens' trick). Statistics of a layer:

    a: (B, T, fan_in)   its inputs, T positions per example (1 for a dense layer, H·W for a conv)
    g: (B, T, fan_out)  d loss_n / d outputs for each example n (the mean loss's gradient × B)

so the layer's weight gradient is mean_n Σ_t a_nt g_ntᵀ. They are plain arrays in plain dicts:
the optimizers that read them (`metaopt.optimizers.curvature`) never import the task zoo.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


class Taps:
    """Records each layer's inputs; adds `offsets[name]` (zeros) to its outputs when given."""

    def __init__(self, offsets: dict[str, jax.Array] | None = None):
        self.offsets = offsets
        self.inputs: dict[str, jax.Array] = {}
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}

    def __call__(self, name: str, inputs: jax.Array, outputs: jax.Array) -> jax.Array:
        if name in self.inputs:
            raise ValueError(f"layer {name!r} is tapped twice; each layer must be used once per loss")
        self.inputs[name] = inputs
        self.shapes[name] = jax.ShapeDtypeStruct(outputs.shape, outputs.dtype)
        return outputs if self.offsets is None else outputs + self.offsets[name]


def tap(taps: Taps | None, name: str, inputs: jax.Array, outputs: jax.Array) -> jax.Array:
    """`outputs`, passed through `taps` when statistics are asked for (layers call this)."""
    return outputs if taps is None else taps(name, inputs, outputs)


def conv_patches(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """(B, H, W, C) -> (B, H', W', kernel·kernel·C): each output position's 'SAME'-padded input
    window, features in (kh, kw, c_in) order (an HWIO kernel's rows), so conv(x, w) = patches @
    w.reshape(-1, C_out)."""
    h, w = x.shape[1:3]
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + kernel - h, 0)
    pad_w = max((out_w - 1) * stride + kernel - w, 0)
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    windows = [x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
               for i in range(kernel) for j in range(kernel)]
    return jnp.concatenate(windows, axis=-1)


def has_layer_stats(task: Any) -> bool:
    return callable(getattr(task, "tapped_loss", None))


def loss_grad_and_layer_stats(task: Any, params: Any, key: jax.Array, batch: Any):
    """(loss, grads, {layer: {"a": (B, T, fan_in), "g": (B, T, fan_out)}}) in one forward and
    one backward pass. Raises ValueError for a task without the capability."""
    if not has_layer_stats(task):
        raise ValueError(
            f"{type(task).__name__} cannot provide per-layer statistics (it has no tapped_loss), "
            "which K-FAC, FOOF and MBF need; the zoo's mlp, cnn, autoencoder, logistic, "
            "least_squares and epinet families have them")
    probe = Taps()
    jax.eval_shape(lambda: task.tapped_loss(params, key, batch, probe))
    zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in probe.shapes.items()}

    def tapped(p, offsets):
        taps = Taps(offsets)
        return task.tapped_loss(p, key, batch, taps), taps.inputs

    (loss, inputs), (grads, out_grads) = jax.value_and_grad(tapped, argnums=(0, 1), has_aux=True)(
        params, zeros)
    stats = {}
    for name, a in inputs.items():
        b = a.shape[0]
        a = a.reshape(b, -1, a.shape[-1])
        stats[name] = {"a": a, "g": (b * out_grads[name]).reshape(b, a.shape[1], -1)}
    return loss, grads, stats


def loss_grad_and_extras(task: Any, optimizer: Any, params: Any, key: jax.Array, batch: Any):
    """(loss, grads, keyword arguments for `tx.update`) for one training step: `layer_stats=` when
    `optimizer.needs_layer_stats`, nothing more otherwise (then this is `jax.value_and_grad`)."""
    if getattr(optimizer, "needs_layer_stats", False):
        loss, grads, stats = loss_grad_and_layer_stats(task, params, key, batch)
        return loss, grads, {"layer_stats": stats}
    loss, grads = jax.value_and_grad(task.loss)(params, key, batch)
    return loss, grads, {}
