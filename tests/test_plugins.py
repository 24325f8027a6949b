"""Plugins: a task family and an optimizer named by import path in a job spec, from a module
of the user's (examples/plugins/, the code docs/plugins.md shows), used by the zoo, checked
before a job starts, meta-trained by `metaopt train` (real Ray workers), recorded in the
artifact and needed again to load it. `metaopt submit` to a real Ray head: tests/test_submit.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax
import pytest
import yaml

from metaopt import optimizers, plugins, task_zoo
from metaopt.jobspec import JobSpecError, check_runnable, parse_job_spec
from metaopt.plugins import PluginError
from tests.jsonout import last_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "plugins"
FAMILY, OPTIMIZER = "my_tasks:RosenbrockFamily", "my_opts:LearnedMomentum"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A user's folder with the two plugin modules and the job spec, as the working directory."""
    for name in ("my_tasks.py", "my_opts.py", "plugin.yaml"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def spec_with(**changes) -> dict:
    spec = yaml.safe_load((EXAMPLES / "plugin.yaml").read_text())
    return {**spec, **changes}


def test_the_docs_example_is_the_tested_one_and_under_60_lines():
    source = (EXAMPLES / "my_tasks.py").read_text()
    assert len(source.splitlines()) < 60
    docs = (EXAMPLES.parent.parent / "docs" / "plugins.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", docs, re.S):
        assert all(line in source for line in block.splitlines()), block


def test_a_plugin_family_samples_specs_named_by_its_import_path(project):
    family = task_zoo.family(FAMILY, dims=[4])
    spec = family.sample(jax.random.key(0))
    assert spec.name == FAMILY and spec.kwargs["dim"] == 4  # what travels finds the plugin again
    task = task_zoo.task(spec)  # as a worker builds it, from the spec alone
    params = task.init(jax.random.key(1))
    assert task.loss(params, jax.random.key(2), task.batch(jax.random.key(3), task_zoo.TEST)).shape == ()
    assert task_zoo.cost(spec).parameters == 4
    assert FAMILY not in task_zoo.families()  # the built-ins' list stays the built-ins'
    task_zoo.check_family(FAMILY, dims=[4])


def test_a_plugin_optimizer_is_named_by_its_import_path_and_rebuilds_from_its_hparams(project):
    opt = optimizers.make(OPTIMIZER, init_lr=0.02)
    assert opt.name == OPTIMIZER and opt.hparams == {"init_lr": 0.02} and opt.learned
    again = optimizers.make(opt.name, **opt.hparams)  # what an artifact's manifest rebuilds
    assert float(again.init(jax.random.key(0))["log_lr"]) == pytest.approx(float(jax.numpy.log(0.02)))
    optimizers.check(OPTIMIZER)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lr'\].*accepted: \['init_lr'\]"):
        optimizers.make(OPTIMIZER, lr=0.1)


@pytest.mark.parametrize(("family", "message"), [
    ("no_such_module:Family", r"cannot import module 'no_such_module'.*current directory or on PYTHONPATH"),
    ("my_tasks:NoSuchFamily", r"'my_tasks' has no attribute 'NoSuchFamily'; it has \[.*'RosenbrockFamily'"),
    ("my_tasks:RosenbrockFamily.name", r"is a str, not a factory"),
    ("my_tasks:", r"is not an import path: write it as `module:Attribute`"),
])
def test_a_bad_import_path_is_refused_when_the_spec_is_read(project, family, message):
    with pytest.raises(JobSpecError, match=r"tasks\.0: .*" + message):
        parse_job_spec(spec_with(tasks=[{"family": family}]))


BROKEN = {
    "a family whose loss is not a scalar": (
        "family", "tasks.0.family", "task.loss must return a scalar float, got float32\\[3\\]",
        """
        import jax.numpy as jnp
        from flax import struct
        from my_tasks import Rosenbrock, RosenbrockFamily

        @struct.dataclass
        class VectorLoss(Rosenbrock):
            def loss(self, params, key, batch):
                return jnp.ones(3)

        class Family(RosenbrockFamily):
            def task_fn(self, spec):
                t = super().task_fn(spec)
                return VectorLoss(t.floor, t.noise, t.dim)
        """),
    "a family whose tasks are not pytrees": (
        "family", "tasks.0.family", r"jax.jit of task.loss, the task an argument \(a pytree\) failed",
        """
        from my_tasks import Rosenbrock, RosenbrockFamily

        class Plain(Rosenbrock):  # not registered with jax: a subclass needs @struct.dataclass too
            pass

        class Family(RosenbrockFamily):
            def task_fn(self, spec):
                t = super().task_fn(spec)
                return Plain(t.floor, t.noise, t.dim)
        """),
    "a family without cost": (
        "family", "tasks.0.family", r"cost\(spec\) failed: AttributeError",
        """
        from my_tasks import RosenbrockFamily

        class Family:
            name, description = "no_cost", "no cost method"
            def __init__(self):
                self.inner = RosenbrockFamily()
            def sample(self, key):
                return self.inner.sample(key)
            def task_fn(self, spec):
                return self.inner.task_fn(spec)
        """),
    "an optimizer whose updates have the wrong shape": (
        "optimizer", "optimizer.name", r"update returned updates shaped .* for parameters shaped",
        """
        import jax, optax
        from my_opts import LearnedMomentum

        class Optimizer(LearnedMomentum):
            def as_optax(self, theta, num_steps):
                def update(grads, state, params=None, **extra):
                    return jax.tree.map(lambda g: g[..., :1], grads), state
                return optax.GradientTransformationExtraArgs(lambda params: (), update)
        """),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_plugin_with_the_wrong_interface_is_refused_before_anything_starts(project, case):
    kind, where, message, source = BROKEN[case]
    module = f"broken_{list(BROKEN).index(case)}"  # one per case: Python keeps what it imported
    (project / f"{module}.py").write_text(textwrap.dedent(source))
    attribute = {"family": "Family", "optimizer": "Optimizer"}[kind]
    spec = spec_with(tasks=[{"family": f"{module}:{attribute}"}]) if kind == "family" else (
        spec_with(optimizer={"name": f"{module}:{attribute}"}))
    parsed = parse_job_spec(spec)  # parsing imports and builds it; running it is the check's
    with pytest.raises(JobSpecError, match=rf"{where}: .*{message}"):
        check_runnable(parsed)


def metaopt(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it in their folder: its own process (Ray forks)."""
    command = [str(Path(sys.executable).parent / "metaopt"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=project, env=env)


def test_metaopt_train_refuses_a_broken_plugin_and_starts_nothing(project):
    (project / "broken.py").write_text("def Family(**kwargs):\n    return object()\n")
    (project / "job.yaml").write_text(yaml.safe_dump(spec_with(tasks=[{"family": "broken:Family"}])))
    done = metaopt(project, "train", "job.yaml", "--out", "out")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "tasks.0.family: task family 'broken:Family': sample(key) failed: AttributeError" in done.stderr
    assert not (project / "out").exists()  # no run directory, no registry


def test_metaopt_train_meta_trains_plugins_and_the_artifact_needs_them_to_load(project, tmp_path_factory):
    done = metaopt(project, "train", "plugin.yaml", "--out", "out", "--job-id", "plugins",
                   "--max-outer-steps", "3", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    assert summary["outer_steps"] == 3 and summary["artifact"] == "plugin-demo:1"
    manifest = json.loads((project / "out/registry/plugin-demo/1/manifest.json").read_text())
    sha = {m: hashlib.sha256(f"{m}.py".encode() + b"\0" + (project / f"{m}.py").read_bytes() + b"\0")
           .hexdigest() for m in ("my_opts", "my_tasks")}
    assert manifest["optimizer"] == {"name": OPTIMIZER, "hparams": {"init_lr": 0.003},
                                     "plugin": {"import_path": OPTIMIZER, "sha256": sha["my_opts"]}}
    assert manifest["provenance"]["plugins"] == [{"import_path": p, "sha256": sha[p.split(":")[0]]}
                                                 for p in (OPTIMIZER, FAMILY)]
    assert FAMILY in (project / "out/runs/plugins/metrics.jsonl").read_text()  # its tasks were trained on

    use = ("import metaopt, warnings; warnings.simplefilter('error');"
           f"tx = metaopt.load('plugin-demo:1', registry={str(project / 'out/registry')!r}).as_optax(100);"
           "print(type(tx).__name__)")
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # where the plugin cannot be imported
    done = subprocess.run([sys.executable, "-c", use], capture_output=True, text=True, cwd=elsewhere)
    assert done.returncode == 1
    assert (f"plugin-demo:1 was trained with the plugin '{OPTIMIZER}' (source sha256 "
            f"{sha['my_opts'][:12]}…), which this environment cannot import") in done.stderr
    assert "code is never taken from the registry" in done.stderr
    done = subprocess.run([sys.executable, "-c", use], capture_output=True, text=True, cwd=project)
    assert done.returncode == 0 and "GradientTransformation" in done.stdout, done.stderr[-2000:]
    (project / "my_opts.py").write_text((project / "my_opts.py").read_text() + "\n# edited\n")
    done = subprocess.run([sys.executable, "-c", use], capture_output=True, text=True, cwd=project)
    assert done.returncode == 1  # the warning, raised as an error here
    assert f"of source sha256 {sha['my_opts'][:12]}…, but the installed one is" in done.stderr


def test_a_bundle_is_the_same_bytes_for_the_same_sources_and_is_verified_when_fetched(project, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # fetch puts the bundle first on both
    monkeypatch.setenv("PYTHONPATH", "")
    uri = plugins.upload([FAMILY, OPTIMIZER], str(project / "store"))
    assert uri == plugins.bundle_uri(str(project / "store"), plugins.pack([OPTIMIZER, FAMILY]))
    assert uri.startswith("file://") and uri.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(plugins.pack([FAMILY, OPTIMIZER]))) as bundle:
        assert sorted(bundle.namelist()) == ["plugins/my_opts.py", "plugins/my_tasks.py"]
    folder = plugins.fetch(uri)
    assert (folder / "my_tasks.py").read_bytes() == (project / "my_tasks.py").read_bytes()
    assert sys.path[0] == str(folder) and os.environ["PYTHONPATH"] == str(folder)

    path = Path(uri.removeprefix("file://"))
    tampered = path.with_name("f" * 64 + ".zip")
    tampered.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(PluginError, match="does not match the sha256 in its name: it was changed or damaged"):
        plugins.fetch(tampered.as_uri())
    with pytest.raises(PluginError, match="is not a plugin bundle: its name must be SHA256.zip"):
        plugins.fetch((project / "my_tasks.py").as_uri())
    with pytest.raises(PluginError, match="cannot read the plugin bundle"):
        plugins.fetch(path.with_name("0" * 64 + ".zip").as_uri())


@pytest.mark.slow  # default run: test_submit ships a bundle to Ray; metaopt train meta-trains plugins
def test_a_learner_and_a_worker_elsewhere_fetch_the_job_s_plugins(project, tmp_path_factory):
    """As in their pods (the Helm chart): the spec names plugins that only the bundle holds."""
    done = metaopt(project, "upload-plugins", "job.yaml")
    assert done.returncode == 2 and "no job spec at job.yaml" in done.stderr
    spec = spec_with(storage={"root": str(project / "store")}, stop={"max_outer_steps": 2})
    (project / "job.yaml").write_text(yaml.safe_dump(spec))
    done = metaopt(project, "upload-plugins", "job.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    bundle = done.stdout.strip()
    pod = tmp_path_factory.mktemp("pod")  # where neither module is
    shutil.copy(project / "job.yaml", pod / "job.yaml")
    (pod / "token").write_text("t0k3n")
    learner = subprocess.Popen(
        [str(Path(sys.executable).parent / "metaopt"), "serve-learner", "job.yaml", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--token-file", "token", "--out", "out", "--job-id", "pods",
         "--plugins", bundle, "--json"], cwd=pod, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = learner.stderr.readline()
        address = re.search(r"listening on (\S+),", line)
        assert address, line + learner.stderr.read()[-2000:]
        worker = metaopt(pod, "worker", "job.yaml", "--learner", address.group(1), "--job-id", "pods",
                         "--token-file", "token", "--plugins", bundle, "--json")
        assert worker.returncode == 0, worker.stderr[-2000:]
        out, err = learner.communicate(timeout=120)
    finally:
        learner.kill()
    assert learner.returncode == 0, err[-2000:]
    assert last_json(out)["outer_steps"] == 2
    done = metaopt(pod, "worker", "job.yaml", "--learner", address.group(1), "--job-id", "pods",
                   "--plugins", bundle.replace(".zip", "0.zip"))
    assert done.returncode == 2 and "is not a plugin bundle" in done.stderr


def test_submit_k8s_puts_the_bundle_in_the_rayjob(project):
    spec = spec_with(storage={"root": str(project / "store")})
    (project / "job.yaml").write_text(yaml.safe_dump(spec))
    done = metaopt(project, "submit", "job.yaml", "--k8s", "--image", "img", "--dry-run", "--job-id", "k")
    assert done.returncode == 0, done.stderr[-2000:]
    runtime_env = yaml.safe_load(yaml.safe_load(done.stdout)["spec"]["runtimeEnvYAML"])
    expected = plugins.bundle_uri(str(project / "store"), plugins.pack([FAMILY, OPTIMIZER]))
    assert runtime_env["working_dir"] == expected
    assert not (project / "store").exists()  # a dry run uploads nothing
    (project / "job.yaml").write_text(yaml.safe_dump(spec_with()))
    done = metaopt(project, "submit", "job.yaml", "--k8s", "--image", "img", "--dry-run")
    assert done.returncode == 2 and "set storage.root" in done.stderr
