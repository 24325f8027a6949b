"""Plugins: a task family or an optimizer named by import path, `module:Attribute`.

A job spec may name the user's own code where it names a built-in:

    tasks:
      - family: "my_tasks:RosenbrockFamily"     # my_tasks.py beside the spec, or installed
    optimizer:
      name: "my_opts:SignSGD"

`load(path)` imports the module and returns the attribute, or raises a PluginError that says
what is wrong (the module cannot be imported, or has no such attribute). The module is searched
where Python searches, plus the current directory (`metaopt train` run next to `my_tasks.py`
finds it, as `python -m` would). `metaopt train` hands the module's source to its Ray workers
(`ray_modules`) and `metaopt submit` uploads it in the job's working directory (`source`), so
every process imports the same code. An artifact trained with a plugin records its import path
and the sha256 of its source (`record`); loading it needs the plugin installed, and code is never
taken from an artifact.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pathlib
import re
import sys
import warnings

IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PluginError(ValueError):
    """A plugin cannot be used: its module does not import, or it is not what it must be."""


def is_import_path(name: object) -> bool:
    """Whether `name` names a plugin (`module:Attribute`) rather than a built-in."""
    return isinstance(name, str) and ":" in name


def _split(path: str) -> tuple[str, str]:
    if not IMPORT_PATH.match(path):
        raise PluginError(f"{path!r} is not an import path: write it as `module:Attribute` "
                          "(for example my_tasks:RosenbrockFamily)")
    module, attribute = path.split(":")
    return module, attribute


def _with_cwd_on_path():
    """The current directory on sys.path, as `python -m` has it; console scripts do not."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def load(path: str, what: str = "plugin"):
    """The object `module:Attribute` names; `what` says what it is for, in errors."""
    module_name, attribute = _split(path)
    _with_cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PluginError(
            f"{what} {path!r}: cannot import module {module_name!r} ({err}); put {module_name}.py "
            "(or its package) in the current directory or on PYTHONPATH, or pip install it") from None
    except Exception as err:  # noqa: BLE001 - the user's module raised while importing
        raise PluginError(f"{what} {path!r}: importing module {module_name!r} raised "
                          f"{type(err).__name__}: {err}") from err
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise PluginError(f"{what} {path!r}: module {module_name!r} has no attribute "
                              f"{attribute!r}; it has {public}")
        obj = getattr(obj, part)
    return obj


def source(path: str) -> pathlib.Path:
    """The file or package directory of the plugin's top-level module: what is shipped to a
    cluster and hashed."""
    top = _split(path)[0].split(".")[0]
    _with_cwd_on_path()
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        raise PluginError(f"plugin {path!r}: module {top!r} has no source file to ship")
    origin = pathlib.Path(spec.origin)
    return origin.parent if spec.submodule_search_locations else origin


def source_sha256(path: str) -> str:
    """sha256 over the plugin's source: its module file, or every .py file of its package
    (relative paths and contents, in sorted order)."""
    root = source(path)
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        rel = file.relative_to(root).as_posix() if root.is_dir() else file.name
        digest.update(rel.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def record(path: str) -> dict[str, str]:
    """What an artifact or a run records of a plugin: its import path and source sha256."""
    return {"import_path": path, "sha256": source_sha256(path)}


def check_recorded(recorded: dict[str, str], artifact: str) -> None:
    """Before rebuilding what `artifact` holds with the plugin it records: the plugin must be
    importable here (PluginError saying so otherwise), and a source other than the one it was
    trained with is warned about (the weights may not fit what the code now computes)."""
    path = recorded["import_path"]
    try:
        load(path, "plugin")
        here = source_sha256(path)
    except PluginError as err:
        raise PluginError(f"{artifact} was trained with the plugin {path!r} (source sha256 "
                          f"{recorded['sha256'][:12]}…), which this environment cannot import: "
                          f"{err}. Install that module where you load the artifact; code is never "
                          "taken from the registry") from None
    if here != recorded["sha256"]:
        warnings.warn(f"{artifact} was trained with plugin {path!r} of source sha256 "
                      f"{recorded['sha256'][:12]}…, but the installed one is {here[:12]}…",
                      stacklevel=3)


def ray_modules(paths) -> list[str]:
    """Ray runtime_env `py_modules` entries that ship these plugins' sources to every worker."""
    return sorted({str(source(p)) for p in paths})
