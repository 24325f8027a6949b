"""How metaopt installs: one import namespace, and dependencies that follow the layers.

`pip install metaopt` is the library (trained optimizers, the registry client, storage, the
`metaopt` command's registry verbs); `metaopt[eval]` adds the task zoo and evaluation;
`metaopt[service]` meta-training; `metaopt[torch]` metaopt.torch. Each file imports only what its
layer's extras declare, read from pyproject.toml; tests/test_install.py installs each layer into
a clean environment."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from typer.testing import CliRunner

from metaopt import extras
from metaopt.cli import app
from metaopt.extras import _canonical
from tests.test_import_direction import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Where each layer's files live. The CLI's verbs import what they need inside themselves, after
# checking their extra, so only the CLI modules' top-level imports count for the core.
CORE = ["metaopt/__init__.py", "metaopt/registry.py", "metaopt/storage.py", "metaopt/extras.py",
        "metaopt/publishing.py", "metaopt/optimizers"]
CORE_TOP_LEVEL_ONLY = ["metaopt/cli.py", "metaopt/cli_registry.py", "metaopt/cli_jobs.py"]
EVAL = ["metaopt/evaluation.py", "metaopt/tuning.py", "task_zoo"]
TORCH = ["metaopt/torch"]
EVERYTHING = ["metaopt", "learner", "workers", "task_zoo"]


def _declared(*extras_: str) -> set[str]:
    """Distributions the core and the given extras declare (an extra naming metaopt[x] includes x)."""
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra in extras_:
        requirements += PYPROJECT["project"]["optional-dependencies"][extra]
    names = set()
    for requirement in requirements:
        name, nested = re.match(r"([A-Za-z0-9._-]+)(?:\[([^\]]*)\])?", requirement).groups()
        names |= _declared(*nested.split(",")) if _canonical(name) == "metaopt" else {_canonical(name)}
    return names


def _files(entries: list[str]) -> list:
    paths = [ROOT / e for e in entries]
    return [p for path in paths for p in (sorted(path.rglob("*.py")) if path.is_dir() else [path])
            if "_proto" not in p.parts]  # generated


def _third_party(tree: ast.AST, top_level_only: bool = False) -> set[str]:
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "metaopt"}


def _undeclared(files, allowed: set[str], top_level_only: bool = False) -> set[str]:
    owners = metadata.packages_distributions()  # import name -> the distributions that provide it
    found = set()
    for path in files:
        for module in _third_party(ast.parse(path.read_text(), str(path)), top_level_only):
            if not {_canonical(d) for d in owners.get(module, [module])} & allowed:
                found.add(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {module}")
    return found


def test_each_layer_imports_only_what_its_extras_declare():
    assert len(_files(CORE)) > 10 and len(_files(EVAL)) > 10
    core = _declared()
    assert not _undeclared(_files(CORE), core)
    assert not _undeclared(_files(CORE_TOP_LEVEL_ONLY), core, top_level_only=True)
    assert not _undeclared(_files(EVAL), _declared("eval"))
    assert not _undeclared(_files(TORCH), _declared("torch"))
    assert not _undeclared(_files(EVERYTHING), _declared("eval", "service", "torch"))


def test_the_layer_rule_catches_an_undeclared_import_even_inside_a_function(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import json\nimport numpy\n\ndef f():\n    import sklearn.linear_model\n")
    assert _undeclared([planted], _declared()) == {f"{planted}: sklearn"}
    assert _undeclared([planted], _declared(), top_level_only=True) == set()
    assert _undeclared([planted], _declared("eval")) == set()


def test_the_package_list_names_every_package_folder_under_one_namespace():
    """pyproject.toml lists packages by hand (package-dir maps learner/ to metaopt.learner, ...): a
    new subpackage left out of the list would be left out of the wheel."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    listed = set(setuptools["packages"])
    assert all(name.startswith("metaopt.") for name in listed - {"metaopt"})
    found = set()
    for init in sorted(ROOT.glob("*/**/__init__.py")):
        folder = init.parent
        for name, root in [*folders.items(), ("metaopt", ROOT / "metaopt")]:
            if folder.is_relative_to(root):
                found.add(".".join([name, *folder.relative_to(root).parts]))
    assert found == listed


def test_nothing_generic_is_importable_at_the_top_level():
    """In this environment (an editable install), as in a regular one: the design's folders are
    metaopt.task_zoo, metaopt.learner, metaopt.workers, and `import task_zoo` fails."""
    code = ("import importlib.util as u\n"
            "print([n for n in ('task_zoo', 'learner', 'workers') if u.find_spec(n) is not None],"
            " [u.find_spec('metaopt.' + n) is not None for n in ('task_zoo', 'learner', 'workers')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT / "tests")  # not the root, whose folders `python -c` would see
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "[True,", "True,", "True]"]


# --- extras: what is missing, and the CLI saying so ------------------------------------------

def _hide(monkeypatch, *distributions: str) -> None:
    """Make metaopt.extras see `distributions` as not installed (the rest as installed)."""
    real = metadata.version

    def version(name):
        if _canonical(name) in {_canonical(d) for d in distributions}:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(extras.metadata, "version", version)


def test_missing_reads_the_extras_from_metaopts_installed_metadata():
    assert extras.missing("eval") == [] and extras.missing("service") == []  # this env has all
    eval_requirements = [r for r in metadata.requires("metaopt") if 'extra == "eval"' in r]
    assert {_canonical(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in eval_requirements} == (
        _declared("eval") - _declared())


def test_missing_names_hidden_distributions_and_service_includes_eval_when_faked(monkeypatch):
    _hide(monkeypatch, "flax", "ray")
    assert extras.missing("eval") == ["flax"]
    assert extras.missing("service") == ["flax", "ray"]
    with pytest.raises(extras.MissingExtraError, match=r"pip install 'metaopt\[eval\]'"):
        extras.require("eval", "the task zoo")


@pytest.mark.parametrize(("argv", "extra"), [
    (["train", "x.yaml"], "service"), (["serve-learner", "x.yaml"], "service"),
    (["worker", "x.yaml", "--learner", "h:1", "--job-id", "j"], "service"), (["list-jobs"], "service"),
    (["status", "j"], "service"), (["eval", "adam", "--suite", "smoke"], "eval"), (["list", "tasks"], "eval"),
])
def test_a_verb_whose_extra_is_hidden_says_which_extra_to_install(monkeypatch, argv, extra):
    _hide(monkeypatch, "ray", "scikit-learn")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    verb = " ".join(a for a in argv[:2] if not a.endswith(".yaml") and a not in {"adam", "j"})
    assert f"`metaopt {verb}` needs metaopt[{extra}]" in result.output
    assert f"pip install 'metaopt[{extra}]'" in result.output
