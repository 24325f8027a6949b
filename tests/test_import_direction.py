"""Imports run one way: the library (trained optimizers, the registry client, storage, evaluation,
the task zoo and metaopt.torch) never imports the service (training orchestration, the learner, workers, the
job store, submission, wire code, the CLI) or the service's dependencies, not even inside a
function. A user who only loads an optimizer must not need Ray, gRPC, Redis or Kubernetes."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = ["metaopt/__init__.py", "metaopt/registry.py", "metaopt/storage.py", "metaopt/evaluation.py",
           "metaopt/tuning.py", "metaopt/inner.py", "metaopt/inspector.py", "metaopt/plugins.py",
           "metaopt/datasets.py", "metaopt/learnables", "metaopt/optimizers", "metaopt/torch",
           "task_zoo"]  # task_zoo/ is metaopt's
SERVICE = {"metaopt.learner", "metaopt.workers", "metaopt.train", "metaopt.cli", "metaopt.cli_jobs",
           "metaopt.cli_registry", "metaopt.cli_datasets", "metaopt.jobspec", "metaopt.jobstore",
           "metaopt.jobrecorder",
           "metaopt.submit", "metaopt.k8s", "metaopt.wire", "metaopt.inrun_eval", "metaopt.run_report",
           "metaopt.publishing", "metaopt._proto", "ray", "grpc", "redis", "kubernetes", "prometheus_client"}


def _library_files() -> list[pathlib.Path]:
    files = []
    for entry in LIBRARY:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _imported(tree: ast.AST) -> set[str]:
    """Every module an import statement anywhere in `tree` names, as `pkg.mod` and `pkg.mod.name`
    (so `from metaopt import train` counts as `metaopt.train`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _service(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SERVICE)


def test_the_library_never_imports_the_service_not_even_inside_a_function():
    files = _library_files()
    assert len(files) > 20, "the library's files were not found"
    found = {f"{path.relative_to(ROOT)}: {name}" for path in files
             for name in _imported(ast.parse(path.read_text(), str(path))) if _service(name)}
    assert not found, f"the library imports the service: {sorted(found)}"


def test_the_rule_catches_a_nested_import_of_the_service():
    code = "def f():\n    from metaopt import train\n    import ray.util\n"
    assert sorted(n for n in _imported(ast.parse(code)) if _service(n)) == ["metaopt.train", "ray.util"]


def test_loading_an_optimizer_and_evaluating_load_no_service_dependency():
    """In a fresh interpreter: import the library, build the committed reference optimizer; none
    of Ray, gRPC, Redis, Kubernetes or the service's modules is loaded."""
    code = ("import sys, metaopt, metaopt.evaluation\n"
            "metaopt.load('reference@champion', registry='examples/registry').as_optax(num_steps=100)\n"
            f"service = {sorted(SERVICE)!r}\n"
            "loaded = [m for m in sys.modules if any(m == s or m.startswith(s + '.') for s in service)]\n"
            "print(sorted(loaded))\n")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
