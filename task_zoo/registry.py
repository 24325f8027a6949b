"""Name -> task-family factory registry.

A factory is any callable ``factory(**kwargs) -> TaskFamily`` (usually the family class). The
built-in families register themselves in ``task_zoo/__init__.py``; a name `module:Attribute` is
a plugin's factory, imported where it is first asked for (task_zoo/plugin.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from metaopt import plugins
from metaopt.task_zoo.augment import augment_task, split_augment
from metaopt.task_zoo.base import Task, TaskCost, TaskFamily, TaskSpec
from metaopt.task_zoo.plugin import PluginFamily, check

_FACTORIES: dict[str, Callable[..., TaskFamily]] = {}


def register(name: str, factory: Callable[..., TaskFamily]) -> None:
    """Make `factory` available as `family(name, ...)`. Re-registering the same factory is a
    no-op (module reloads); registering a different one under a taken name is an error."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a task family name must be a non-empty str, got {name!r}")
    if _FACTORIES.get(name, factory) is not factory:
        raise ValueError(f"task family {name!r} is already registered")
    _FACTORIES[name] = factory


def families() -> list[str]:
    """Sorted names of the registered families."""
    return sorted(_FACTORIES)


def _factory(name: str, what: str) -> Callable[..., TaskFamily]:
    if plugins.is_import_path(name):
        return _plugin(name)
    try:
        return _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r} in {what}; known: {families()}") from None


def family(name: str, **kwargs) -> TaskFamily:
    """The family `name`, with keyword overrides of its settings (see the family's class)."""
    factory = _factory(name, "family()")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:  # unknown keyword: say which ones are accepted
        accepted = list(inspect.signature(factory).parameters)
        raise ValueError(f"task family {name!r}: {e}; accepted kwargs: {accepted}") from None
    return factory(**kwargs)


@functools.cache
def _plugin(path: str) -> Callable[..., TaskFamily]:
    """The plugin's factory, its families shown as PluginFamily (specs named by `path`)."""
    factory = plugins.load_factory(path, "task family")

    def plugin_family(**kwargs) -> PluginFamily:
        return PluginFamily(path, factory(**kwargs))

    plugin_family.__signature__ = inspect.signature(factory)  # the settings family() checks
    return plugin_family


def check_family(name: str, **kwargs) -> TaskFamily:
    """`family(name, **kwargs)`, and for a plugin its interface run on one tiny sample
    (PluginError naming what is wrong): what a job spec checks before anything starts."""
    built = family(name, **kwargs)
    if isinstance(built, PluginFamily):
        check(built)
    return built


def task(spec: TaskSpec) -> Task:
    """Build the task `spec` describes, using its family's default settings (and wrapped in
    its augmentation, if the spec carries one)."""
    base_spec, augmentation = _split(spec)
    built = _factory(spec.name, f"spec {spec.to_json()}")().task_fn(base_spec)
    return augment_task(built, **augmentation) if augmentation else built


def cost(spec: TaskSpec) -> TaskCost:
    """The estimated cost of one inner step of the task `spec` describes."""
    base_spec, _ = _split(spec)
    return _factory(spec.name, f"spec {spec.to_json()}")().cost(base_spec)


def _split(spec: TaskSpec):
    if not isinstance(spec, TaskSpec):
        raise ValueError(f"expected a TaskSpec, got {type(spec).__name__}: {spec!r}")
    return split_augment(spec)
