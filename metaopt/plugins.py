"""Plugins: a task family, an optimizer or a meta-objective named by import path, `module:Attribute`.

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
every process imports the same code. On Kubernetes (a RayJob cannot upload a folder, and the
learner pod is not a Ray process) the sources travel as one zip in the job's object storage,
named by its sha256 (`upload`): Ray fetches it as the job's remote working_dir, and
`metaopt serve-learner|workers --plugins URI` fetch and verify it (`fetch`). An artifact trained
with a plugin records its import path and the sha256 of its source (`record`); loading it needs
the plugin installed, and code is never taken from an artifact.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import pathlib
import re
import shutil
import sys
import tempfile
import warnings
import zipfile

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


def load_factory(path: str, what: str):
    """`load(path)`, which must be callable: a class or function taking the object's settings."""
    factory = load(path, what)
    if not callable(factory):
        raise PluginError(f"{what} {path!r} is a {type(factory).__name__}, not a factory: name a class "
                          "or function that takes its settings (hyperparameters)")
    return factory


class Named:
    """A plugin's object (`inner`) under its import path, so that whatever records its `name` and
    `hparams` (an artifact's manifest) rebuilds it; everything else is the inner object's."""

    def __init__(self, path: str, inner, hparams: dict):
        self.name, self.inner = path, inner
        self.hparams = dict(getattr(inner, "hparams", hparams))  # what make(path, **…) rebuilds
        self.description = getattr(inner, "description", f"plugin {path}")

    def __getattr__(self, attribute: str):  # init, as_optax, kind, objective, ...
        if attribute == "inner":  # not set yet (copy, pickle): no recursion through inner
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.inner)))


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


BUNDLE_DIR = "plugins"  # the zip's one top-level folder: Ray makes its contents the working_dir
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: the same sources give the same bytes


def pack(paths) -> bytes:
    """The plugins' sources (module files, or whole packages but their __pycache__) as one zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        # In the order of their names in the zip, wherever they are: the same sources, the same bytes.
        for root in sorted({source(p) for p in paths}, key=lambda root: root.name):
            files = ([f for f in sorted(root.rglob("*")) if f.is_file() and "__pycache__" not in f.parts]
                     if root.is_dir() else [root])
            for file in files:
                name = f"{root.name}/{file.relative_to(root).as_posix()}" if root.is_dir() else root.name
                bundle.writestr(zipfile.ZipInfo(f"{BUNDLE_DIR}/{name}", _EPOCH), file.read_bytes(),
                                zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def bundle_uri(storage_root: str, data: bytes) -> str:
    """Where `upload` puts a bundle: by content, so a bundle is written once and never changes.
    A local root becomes a file:// URI, which Ray fetches as it fetches s3:// or gs://."""
    from fsspec.core import split_protocol

    if split_protocol(storage_root)[0] in (None, "file"):
        storage_root = pathlib.Path(split_protocol(storage_root)[1]).resolve().as_uri()
    return f"{storage_root.rstrip('/')}/plugins/{hashlib.sha256(data).hexdigest()}.zip"


def upload(paths, storage_root: str) -> str:
    """Put the plugins' bundle in the job's object storage; returns its URI."""
    from metaopt.storage import fresh_fs

    data = pack(paths)
    uri = bundle_uri(storage_root, data)
    fs, path = fresh_fs(uri)
    if not fs.exists(path):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
    return uri


def fetch(uri: str) -> pathlib.Path:
    """Download the bundle at `uri`, check it against the sha256 in its name, unpack it and put it
    first on sys.path (and on PYTHONPATH, for the processes this one starts); returns the folder."""
    from metaopt.storage import fresh_fs

    digest = pathlib.PurePosixPath(uri).stem
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise PluginError(f"{uri} is not a plugin bundle: its name must be SHA256.zip, as "
                          "`metaopt submit --k8s` or `metaopt upload-plugins` wrote it")
    try:
        fs, path = fresh_fs(uri)
        data = fs.cat_file(path)
    except (OSError, ValueError) as err:
        raise PluginError(f"cannot read the plugin bundle {uri}: {err}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise PluginError(f"the plugin bundle {uri} does not match the sha256 in its name: it was "
                          "changed or damaged; upload the plugins again")
    target = pathlib.Path(tempfile.gettempdir()) / "metaopt-plugins" / digest
    if not target.is_dir():  # unpacked beside it, then renamed: another process may do the same
        target.parent.mkdir(parents=True, exist_ok=True)
        unpacked = tempfile.mkdtemp(dir=target.parent)
        with zipfile.ZipFile(io.BytesIO(data)) as bundle:
            bundle.extractall(unpacked)
        try:
            os.rename(unpacked, target)
        except OSError:  # the other process was first: its copy is the same bytes
            shutil.rmtree(unpacked, ignore_errors=True)
    folder = str(target / BUNDLE_DIR)
    sys.path.insert(0, folder)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
    return target / BUNDLE_DIR
