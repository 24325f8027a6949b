"""Install checks: metaopt from this working tree into clean virtual environments, as a user
gets it from pip. Without extras it pulls, verifies and uses a trained optimizer with optax, and
Ray, gRPC, Redis, Kubernetes and the task zoo's flax are not even importable; with [eval] the
task zoo works and the service is still absent; with [torch], metaopt.torch trains a torch model.

Versions come from requirements.lock (a constraints file), so pip takes the wheels this machine
already has (its local index, or pip's cache) rather than downloading newer ones: about 13 s an
environment here, from one wheel built for all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv

import pytest

from tests.test_import_direction import ROOT

REGISTRY = ROOT / "examples" / "registry"
SOURCES = ["metaopt", "learner", "workers", "task_zoo", "pyproject.toml", "README.md"]
SERVICE_MODULES = ["ray", "grpc", "redis", "kubernetes"]
# flax's orbax-checkpoint brings prometheus_client and protobuf along, so only the core lacks them.
EVAL_MODULES = ["flax", "sklearn", "matplotlib", "prometheus_client", "google.protobuf"]
TOP_LEVEL = ["task_zoo", "learner", "workers"]  # the design's folders: only as metaopt.*


def _install(where, wheel, extras: str = "") -> None:
    """A clean venv at `where`, with metaopt from `wheel` and its `extras` ("[eval]", ...). This
    interpreter's pip installs into it (`pip --python`): a venv's own pip would take seconds more
    to bootstrap, and pip is not what is tested. --no-compile: byte-compiling every installed file
    (all of torch's) costs more than the few modules a test imports compile on first use."""
    venv.create(where, with_pip=False, clear=True)
    requirement = f"metaopt{extras} @ {wheel.as_uri()}"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", where / "bin" / "python", "install",
                           "--quiet", "--no-compile", "-c", ROOT / "requirements.lock", requirement],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """metaopt's wheel, built once from its sources copied out of the checkout (pip builds in the
    source folder, and its build/ must not land in the working tree)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, src],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(out.glob("metaopt-*.whl"))


def _run(where, code: str, cwd) -> dict:
    """Run `code` with the venv's python in `cwd` (not the checkout, whose folders `python -c`
    would find); it prints one JSON line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([where / "bin" / "python", "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


IMPORTABLE = """
import importlib.util, json

def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False

print(json.dumps(sorted(n for n in {names!r} if found(n))))
"""

USE_THE_REFERENCE = f"""
import json
import jax, jax.numpy as jnp, optax
import metaopt

# A 30-parameter least-squares problem, stepped eagerly as a user debugging would.
A = jax.random.normal(jax.random.key(0), (40, 30)); b = A @ jnp.ones(30)
loss = lambda x: jnp.mean((A @ x - b) ** 2)
tx = metaopt.load("reference@champion", registry={str(REGISTRY)!r}).as_optax(num_steps=100)
x = jnp.zeros(30); state = tx.init(x); first = float(loss(x))
for _ in range(100):
    updates, state = tx.update(jax.grad(loss)(x), state, x)
    x = optax.apply_updates(x, updates)
print(json.dumps({{"first": first, "last": float(loss(x))}}))
"""


def test_metaopt_without_extras_uses_a_trained_optimizer_and_has_no_service(wheel, tmp_path):
    where = tmp_path / "venv"
    _install(where, wheel)
    losses = _run(where, USE_THE_REFERENCE, tmp_path)
    assert losses["last"] < 0.5 * losses["first"], losses  # it trains: the library works alone
    present = _run(where, IMPORTABLE.format(names=SERVICE_MODULES + EVAL_MODULES + TOP_LEVEL), tmp_path)
    assert present == []
    # The CLI's registry verbs work; a verb needing an extra says which, and exits 1.
    metaopt = where / "bin" / "metaopt"
    listed = subprocess.run([metaopt, "registry", "list", "--registry", REGISTRY, "--json"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert listed.returncode == 0 and "reference" in listed.stdout, listed.stderr
    train = subprocess.run([metaopt, "train", "job.yaml"], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
    assert train.returncode == 1 and "pip install 'metaopt[service]'" in train.stderr, train.stderr
    zoo = subprocess.run([where / "bin" / "python", "-c", "import metaopt.task_zoo"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert "metaopt.task_zoo needs metaopt[eval]" in zoo.stderr, zoo.stderr


@pytest.mark.slow  # default run: the install without extras, and test_import_direction's layering
def test_metaopt_with_eval_has_the_task_zoo_and_still_no_service(wheel, tmp_path):
    where = tmp_path / "venv"
    _install(where, wheel, "[eval]")
    code = "import json; from metaopt import task_zoo; print(json.dumps(task_zoo.families()))"
    families = _run(where, code, tmp_path)
    assert {"mlp", "quadratic", "transformer_lm"} <= set(families)
    assert _run(where, IMPORTABLE.format(names=SERVICE_MODULES + TOP_LEVEL), tmp_path) == []
    listed = subprocess.run([where / "bin" / "metaopt", "list", "tasks", "--json"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert listed.returncode == 0 and json.loads(listed.stdout), listed.stderr



USE_IT_FROM_TORCH = f"""
import json
import torch
import metaopt.torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
x = torch.randn(64, 4); y = x.sum(1, keepdim=True)
opt = metaopt.torch.load("reference@champion", model.parameters(), num_steps=100, registry={str(REGISTRY)!r})
losses = []
for _ in range(100):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(json.dumps({{"first": losses[0], "last": losses[-1]}}))
"""


@pytest.mark.slow  # default run: tests/test_torch.py, the install without extras, the import layering
def test_metaopt_with_torch_trains_a_torch_model_and_has_no_service(wheel, tmp_path):
    where = tmp_path / "venv"
    _install(where, wheel, "[torch]")  # torch==2.13.0 from requirements.lock
    losses = _run(where, USE_IT_FROM_TORCH, tmp_path)
    assert losses["last"] < 0.1 * losses["first"], losses
    assert _run(where, IMPORTABLE.format(names=SERVICE_MODULES + EVAL_MODULES + TOP_LEVEL), tmp_path) == []
