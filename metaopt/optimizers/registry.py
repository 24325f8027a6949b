"""Name → factory registry for optimizers: `names()`, `make(name, **hparams)`, `register`.

Every factory is a frozen dataclass type (or callable) whose keyword arguments are the
optimizer's hyperparameters; `make` validates names before calling it so that typos fail
loudly instead of silently using a default. A name `module:Attribute` is a plugin's factory,
imported where it is first asked for (optimizers/plugin.py).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from metaopt import plugins
from metaopt.optimizers.base import Optimizer
from metaopt.optimizers.plugin import PluginOptimizer, plugin_factory
from metaopt.optimizers.plugin import check as check_plugin

_REGISTRY: dict[str, Callable[..., Optimizer]] = {}


def register(name: str, factory: Callable[..., Optimizer]) -> None:
    """Register `factory(**hparams) -> Optimizer` under `name` (re-registering replaces it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"optimizer name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def names() -> list[str]:
    """Sorted names of all registered optimizers."""
    return sorted(_REGISTRY)


def _accepted(factory: Callable[..., Optimizer]) -> list[str]:
    if dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory) if f.init]
    return [p for p in inspect.signature(factory).parameters if p != "self"]


def make(name: str, **hparams: Any) -> Optimizer:
    """Build the optimizer registered as `name` with the given hyperparameters.

    Raises ValueError for an unknown name (listing the known ones) or an unknown
    hyperparameter (naming it and the accepted ones).
    """
    plugin = plugins.is_import_path(name)
    if name not in _REGISTRY and not plugin:
        raise ValueError(f"unknown optimizer {name!r}; registered optimizers: {names()}")
    factory = plugin_factory(name) if plugin else _REGISTRY[name]
    accepted = _accepted(factory)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for optimizer {name!r}; accepted: {accepted}")
    return PluginOptimizer(name, factory(**hparams), hparams) if plugin else factory(**hparams)


def check(name: str, **hparams: Any) -> Optimizer:
    """`make(name, **hparams)`, and for a plugin its interface run on a tiny problem
    (PluginError naming what is wrong): what a job spec checks before anything starts."""
    opt = make(name, **hparams)
    if isinstance(opt, PluginOptimizer):
        check_plugin(opt)
    return opt
