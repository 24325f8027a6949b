"""Trained optimizers as `torch.optim.Optimizer`s: the same artifacts, verified the same way.

    import metaopt.torch
    opt = metaopt.torch.load("reference@champion", model.parameters(),
                             registry="examples/registry", num_steps=1000)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

`pip install 'metaopt[torch]'`. The artifact's sha256s (and a pinned digest, NAME@sha256:HEX)
are checked as for `metaopt.load`; nothing is unpickled and no code comes from the artifact.
A parameter group's `lr` multiplies the learned step (1 by default), so `torch.optim.lr_scheduler`
works as on any torch optimizer; `weight_decay` is decoupled, as AdamW's.
"""

from __future__ import annotations

from typing import Any

from metaopt.extras import require

require("torch", "metaopt.torch")

from metaopt.registry import TrainedOptimizer, load_path
from metaopt.registry import load as load_trained
from metaopt.torch.adafac_mlp import AdafacMLP
from metaopt.torch.base import LearnedOptimizer
from metaopt.torch.lgl2o import LGL2O
from metaopt.torch.lstm_l2l import LSTML2L
from metaopt.torch.nn_adam import NNAdam
from metaopt.torch.nominal_mlp import NominalMLP
from metaopt.torch.rnn_mlp import RNNMLP
from metaopt.torch.small_fc import SmallFC

# metaopt.optimizers name -> its torch implementation: every learned architecture of the zoo.
# What is not here (lookahead, a wrapper of a wrapper) is refused by name.
ARCHITECTURES: dict[str, type[LearnedOptimizer]] = {
    cls.name: cls for cls in (NominalMLP, SmallFC, AdafacMLP, LSTML2L, NNAdam, RNNMLP, LGL2O)}


def from_trained(trained: TrainedOptimizer, params, num_steps: int, **options: Any) -> LearnedOptimizer:
    """A torch optimizer over `params` applying a loaded artifact's θ for `num_steps` steps."""
    if trained.kind != "optimizer":
        raise NotImplementedError(f"{trained.ref} holds a {trained.kind} ({trained.optimizer_name}), not an "
                                  "optimizer: metaopt.torch runs learned optimizers only")
    cls = ARCHITECTURES.get(trained.optimizer_name)
    if cls is None:
        raise NotImplementedError(
            f"{trained.ref} is a {trained.optimizer_name!r} optimizer, which metaopt.torch cannot run yet "
            f"(it runs {sorted(ARCHITECTURES)}); use it from JAX: metaopt.load(...).as_optax(num_steps)")
    return cls(params, trained.theta, trained.hparams, num_steps, **options)


def load(ref: str, params, num_steps: int, registry: str | None = None, **options: Any) -> LearnedOptimizer:
    """`ref` (NAME, NAME:VERSION, NAME@ALIAS or NAME@sha256:HEX) from `registry`, verified, as a
    torch optimizer over `params` for a run of `num_steps` steps. `options`: `lr`,
    `weight_decay` and the architecture's own (for nominal_mlp: `learning_rate`, the peak rate)."""
    return from_trained(load_trained(ref, registry), params, num_steps, **options)


def from_artifact(path: str, params, num_steps: int, **options: Any) -> LearnedOptimizer:
    """The artifact directory at `path` (what `metaopt pull` printed), verified, as `load` does."""
    return from_trained(load_path(path), params, num_steps, **options)


__all__ = ["ARCHITECTURES", "AdafacMLP", "LGL2O", "LSTML2L", "LearnedOptimizer", "NNAdam", "NominalMLP",
           "RNNMLP", "SmallFC", "from_artifact", "from_trained", "load"]
