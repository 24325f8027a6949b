"""What every trained optimizer in torch shares: θ on each parameter's device, the step, and
state that resumes exactly.

Layouts. A learned optimizer sees a tensor's shape (its fan-in, its rows and columns), and JAX
models keep a dense kernel as (in, out) and a convolution's as (*kernel, in, out), where torch
keeps (out, in) and (out, in, *kernel). So a ≥2-D torch parameter is read as the JAX layout of the
same layer: its fan-in is size / shape[0] (an embedding, (num, dim) in both, is read as a dense
(dim, num) kernel).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

CHUNK = 16384  # columns per block of a learned optimizer's MLP: (32, CHUNK) float32 = 2 MiB
# Hidden activations (floats: 16 MiB) a compiled step may hold at once. A compiled step runs its MLP
# on a whole tensor in one block; past this the eager step's cache-sized blocks win, so a larger
# tensor takes that even with compile=True (measured: benchmarks/torch_step.py's `threshold`).
COMPILED_ACTIVATIONS = 2**22


def fan_in(p: torch.Tensor) -> int:
    """A torch (out, in, *kernel) parameter's fan-in: in · prod(kernel); 1 for 0-D and 1-D."""
    return p.numel() // p.shape[0] if p.ndim >= 2 and p.shape[0] else 1


def _to_jax_order(ndim: int) -> tuple[int, ...]:
    return (*range(2, ndim), 1, 0) if ndim >= 2 else tuple(range(ndim))


def jax_view(t: torch.Tensor) -> torch.Tensor:
    """A view of a torch (out, in, *kernel) tensor in JAX's (*kernel, in, out) order."""
    return t.permute(_to_jax_order(t.ndim))


def torch_view(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `jax_view`: a JAX-ordered tensor viewed in torch's order."""
    order = _to_jax_order(t.ndim)
    return t.permute(tuple(order.index(i) for i in range(t.ndim)))


class LearnedOptimizer(torch.optim.Optimizer):
    """A trained θ applied to torch parameters. A subclass sets `jax_class`, the JAX optimizer
    class whose artifacts it runs (its hyperparameters are checked and defaulted there, once),
    and implements `_update(p, grad, state, group, theta, loss)` for one tensor, or `_step(items,
    loss)` for optimizers that read every tensor at once.

    `step(closure=None, loss=None)`: as torch.optim's, and `loss` for optimizers that read it.
    Each group's `lr` multiplies the learned step (1: the step θ was trained for) and
    `weight_decay` is decoupled (AdamW's: p ← p − lr · weight_decay · p); both may change between
    steps, as schedulers do.

    `compile=True`, for a subclass that writes a tensor's step as a function of tensors alone
    (`_make_kernel`), runs that step through torch.compile: all that changes from step to step
    (the step count, a group's lr) goes in as a tensor and shapes are dynamic, so it compiles once
    per tensor rank (the first steps: seconds on a CPU), never per shape, step or lr. Its features
    and MLP then fuse into a few passes, which wins on small and middling tensors; a tensor whose
    MLP activations exceed COMPILED_ACTIVATIONS (above 65,536 elements with two hidden layers of
    32) keeps the eager step, whose cache-sized blocks win there (benchmarks/torch_step.py)."""

    jax_class: type
    name = ""  # the metaopt.optimizers name: the JAX class's
    compilable = False  # whether `compile=True` is taken: the subclass defines `_make_kernel`

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name = cls.jax_class.name
        cls.compilable = cls._make_kernel is not LearnedOptimizer._make_kernel

    def __init__(self, params, theta: Any, hparams: dict[str, Any], num_steps: int, lr: float = 1.0,
                 weight_decay: float | None = None, compile: bool = False):
        if compile and not self.compilable:
            can = ", ".join(sorted(c.name for c in _subclasses(LearnedOptimizer) if c.compilable))
            raise NotImplementedError(f"{self.name} cannot compile its step yet ({can} can); "
                                      "leave compile=False")
        self.config = self._config(hparams)
        if weight_decay is None:  # the optimizer's own (nominal_mlp has one), else none
            weight_decay = getattr(self.config, "weight_decay", 0.0)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int (the length of the run), got {num_steps!r}")
        for what, value in (("lr", lr), ("weight_decay", weight_decay)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.num_steps = num_steps
        self._theta = {torch.device("cpu"): _map(lambda a: torch.from_numpy(np.array(a, np.float32)), theta)}
        # load_state_dict casts floating-point state to each parameter's dtype; the state is
        # float32 whatever the parameters are, so it is put back as saved (see _keep_state).
        self.register_load_state_dict_pre_hook(LearnedOptimizer._keep_state)
        self.register_load_state_dict_post_hook(LearnedOptimizer._restore_state)
        if self.compilable:
            mlp = theta["mlp"]  # the hidden units of its MLP: every layer's outputs but the last's
            self._hidden_units = sum(mlp[f"w{i}"].shape[1] for i in range(len(mlp) // 2 - 1))
            self._eager = self._make_kernel(CHUNK)
            self._compiled = torch.compile(self._make_kernel(None), dynamic=True) if compile else None

    def _config(self, hparams: dict[str, Any]) -> Any:
        return self.jax_class(**hparams)

    def theta(self, device: torch.device) -> Any:
        """θ as float32 tensors on `device` (copied there once)."""
        if device not in self._theta:
            self._theta[device] = _map(lambda t: t.to(device), self._theta[torch.device("cpu")])
        return self._theta[device]

    @torch.no_grad()
    def step(self, closure=None, loss=None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = self._with_gradients()
        if items:
            self._step(items, loss)
        return loss

    def _with_gradients(self) -> list:
        """(parameter, its group) for every parameter with a gradient, in order."""
        items = [(p, group) for group in self.param_groups for p in group["params"]
                 if p.grad is not None and p.numel()]
        if any(p.grad.is_sparse for p, _ in items):
            raise RuntimeError(f"{self.name} does not take sparse gradients (an Embedding's sparse=True)")
        return items

    def _step(self, items: list, loss) -> None:
        """One step of the parameters with gradients, (parameter, its group) in order."""
        for p, group in items:
            self._update(p, p.grad, self.state[p], group, self.theta(p.device), loss)

    def _update(self, p, grad, state: dict, group: dict, theta: Any, loss) -> None:
        raise NotImplementedError

    def _make_kernel(self, chunk: int | None):
        """The step of one tensor as a function of tensors alone, its MLP run in blocks of `chunk`
        columns (None: one block, as torch.compile needs; see `mlp_columns`)."""
        raise NotImplementedError

    def _kernel(self, p: torch.Tensor):
        """The step for `p`: compiled if compile=True and its MLP's activations on p fit."""
        small = self._compiled is not None and p.numel() * self._hidden_units <= COMPILED_ACTIVATIONS
        return self._compiled if small else self._eager

    @staticmethod
    def _keep_state(optimizer: LearnedOptimizer, state_dict: dict) -> None:
        optimizer._saved_state = {k: dict(v) for k, v in state_dict["state"].items()}

    @staticmethod
    def _restore_state(optimizer: LearnedOptimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, saved in optimizer._saved_state.items():
            p = params[index]
            optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in saved.items()}
        del optimizer._saved_state


def mlp_columns(weights: list, biases: list, x: torch.Tensor, chunk: int | None = CHUNK) -> torch.Tensor:
    """A relu MLP applied to each column of the feature-major x (features, n) → (outputs, n).
    `weights` are JAX's (in, out) matrices. Columns go through in chunks, so that the (hidden,
    chunk) activations stay in cache (a million-parameter tensor's would be 64 MB), and each
    layer is one addmm with its bias. `chunk=None`: one block, with no Python loop over the
    columns (under torch.compile such a loop would fix the tensor's size into the graph)."""
    if chunk is None:
        return _mlp(weights, biases, x)
    out = torch.empty((weights[-1].shape[1], x.shape[1]), dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[1], chunk):
        out[:, start:start + chunk] = _mlp(weights, biases, x[:, start:start + chunk])
    return out


def _mlp(weights: list, biases: list, h: torch.Tensor) -> torch.Tensor:
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = torch.addmm(b[:, None], w.T, h)
        if i < len(weights) - 1:
            h = torch.relu_(h)
    return h


def kernel_scalars(values: list[float], device: torch.device) -> torch.Tensor:
    """The numbers a compiled kernel reads besides tensors (the step count, a group's lr, ...), as
    one float32 tensor, so that it is not compiled again as they change. Its length is marked
    static: dynamo's duck sizing would otherwise tie it to every dimension of the same size among
    the kernel's arguments (a 4-element `scalars` and a (4, n) weight), fixing that dimension too,
    which then compiles again for each new size."""
    scalars = torch.tensor(values, dtype=torch.float32, device=device)
    torch._dynamo.mark_static(scalars)
    return scalars


def _subclasses(cls) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)
