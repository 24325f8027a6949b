"""Publishing from runs and checkpoints (metaopt.publishing) and the registry's command line:
`metaopt publish`, `metaopt pull`, `metaopt registry list|alias`, with their exit codes.

The run directory is a real one: a small learner takes two outer steps and its checkpointer
writes them, as `metaopt train` does, beside the job spec in job.json."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import uuid
from importlib import metadata

import fsspec
import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from metaopt import optimizers, publishing, registry, storage, wire
from metaopt._proto import learner_pb2 as pb
from metaopt.cli import app
from metaopt.jobspec import OuterSpec, parse_job_spec
from metaopt.learner.checkpointing import Checkpointer
from metaopt.learner.core import Learner, LearnerConfig
from metaopt.storage import CorruptArtifactError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SPEC = parse_job_spec({"name": "demo", "seed": 3, "tasks": [{"family": "quadratic"}],
                       "optimizer": {"name": "small_fc"}, "artifact_name": "demo-opt"})
JOB_ID = "demo-20260101-000000"
LOSSES = [2.0, 1.5]  # the meta-loss of each outer step


def _estimate(learner: Learner, sequence: int, loss: float) -> pb.GradientEstimate:
    values = np.random.default_rng(sequence).normal(size=learner.size).astype(np.float32)
    data, n, crc = wire.encode(values)
    return pb.GradientEstimate(
        job_id=JOB_ID, worker_id="w", run_id="r", theta_version=learner.version, sequence=sequence,
        task=pb.TaskSpec(name="quadratic", kwargs_json="{}"), num_particles=2, inner_steps=3,
        mean_loss=loss, encoding=pb.ENCODING_FLOAT32_LE, values=data, length=n, crc32=crc,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN/job.json and RUN/checkpoints/ckpt-00000000{1,2}; yields (run dir, θ tree per step)."""
    run_dir = tmp_path_factory.mktemp("out") / "runs" / JOB_ID
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text(json.dumps(SPEC.model_dump(mode="json"), indent=2))
    opt = optimizers.make(SPEC.optimizer.name, **SPEC.optimizer.hparams)
    learner = Learner(LearnerConfig(job_id=JOB_ID, max_outer_steps=10, outer=OuterSpec(meta_batch_size=1)),
                      opt.init(jax.random.key(SPEC.seed)))
    checkpointer = Checkpointer(learner, str(run_dir / "checkpoints"))
    thetas = {}
    try:
        for step, loss in enumerate(LOSSES, start=1):
            assert learner.submit(_estimate(learner, step, loss)).accepted
            assert learner.wait_idle() and learner.version == step
            checkpointer.save()
            thetas[step] = learner.theta_tree()
    finally:
        learner.stop()
    return run_dir, thetas


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _assert_theta(trained: registry.TrainedOptimizer, expected) -> None:
    jax.tree.map(np.testing.assert_array_equal, trained.theta, jax.tree.map(np.asarray, expected))


# --- metaopt.publishing ---------------------------------------------------------------------


def test_publish_a_run_records_its_provenance(run, tmp_path):
    run_dir, thetas = run
    reg = str(tmp_path / "reg")
    assert publishing.publish_checkpoint(str(run_dir), reg) == "demo-opt:1"  # the spec's artifact name
    trained = registry.load("demo-opt:1", reg)
    assert trained.optimizer_name == "small_fc"
    assert trained.hparams == dict(optimizers.make("small_fc").hparams)
    _assert_theta(trained, thetas[2])  # the newest checkpoint
    prov = trained.manifest["provenance"]
    assert prov["job_id"] == JOB_ID and prov["outer_steps"] == 2
    assert (prov["meta_loss_first"], prov["meta_loss_last"]) == tuple(LOSSES)
    assert prov["spec"] == SPEC.model_dump(mode="json") and prov["task_families"] == ["quadratic"]
    assert prov["estimator"]["kind"] == "pes" and "evaluation" not in prov
    assert prov["code_version"] == "unknown"  # this checkpoint's meta does not record it
    assert prov["checkpoint"] == {"uri": f"{run_dir}/checkpoints/ckpt-000000002", "step": 2}
    # ... and a newer publish of the same run is the next version, under any name.
    assert publishing.publish_checkpoint(f"{run_dir}/checkpoints/ckpt-000000001", reg) == "demo-opt:2"
    assert registry.load("demo-opt:2", reg).manifest["provenance"]["outer_steps"] == 1
    _assert_theta(registry.load("demo-opt:2", reg), thetas[1])
    assert publishing.publish_checkpoint(f"{run_dir}/checkpoints", reg, "other") == "other:1"
    assert "selection" not in registry.load("other:1", reg).manifest["provenance"]
    # A checkpoint chosen over the run's last says how (benchmarks/generalisation_curve.py's record).
    chosen = {"rule": "most wins", "suite": "in_distribution", "outer_step": 1, "wins": 8}
    assert publishing.publish_checkpoint(f"{run_dir}/checkpoints/ckpt-000000001", reg, "other",
                                         selection=chosen) == "other:2"
    assert registry.load("other:2", reg).manifest["provenance"]["selection"] == chosen


def test_spec_and_code_version_in_the_checkpoint_meta_need_no_job_json(run, tmp_path):
    run_dir, thetas = run
    step, arrays, meta = storage.latest_checkpoint(str(run_dir / "checkpoints"))
    meta = meta | {"spec": SPEC.model_dump(mode="json"), "code_version": "1.2.3"}
    bare = storage.save_checkpoint(str(tmp_path / "elsewhere"), step, arrays, meta)
    reg = str(tmp_path / "reg")
    assert publishing.publish_checkpoint(bare, reg, aliases=["champion"]) == "demo-opt:1"
    trained = registry.load("demo-opt@champion", reg)
    assert trained.manifest["provenance"]["code_version"] == "1.2.3"
    _assert_theta(trained, thetas[2])


def test_publish_from_an_fsspec_uri(run, tmp_path):
    run_dir, thetas = run
    remote = f"memory://publish-tests-{uuid.uuid4().hex}/run"
    fs = fsspec.filesystem("memory")
    fs.put(str(run_dir), remote.removeprefix("memory://"), recursive=True)
    try:
        assert publishing.publish_checkpoint(remote, str(tmp_path / "reg"), "remote") == "remote:1"
    finally:
        fs.rm(remote.removeprefix("memory://"), recursive=True)
    _assert_theta(registry.load("remote:1", str(tmp_path / "reg")), thetas[2])


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, tmp_path):
    run_dir, thetas = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    arrays = copy / "checkpoints" / "ckpt-000000002" / "arrays.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:-4])
    reg = str(tmp_path / "reg")
    assert publishing.publish_checkpoint(str(copy), reg) == "demo-opt:1"
    _assert_theta(registry.load("demo-opt:1", reg), thetas[1])
    with pytest.raises(CorruptArtifactError, match="ckpt-000000002 is corrupt.*arrays.safetensors"):
        publishing.publish_checkpoint(str(copy / "checkpoints" / "ckpt-000000002"), reg)
    (copy / "checkpoints" / "ckpt-000000001" / "COMMIT.json").unlink()
    with pytest.raises(CorruptArtifactError, match="no good checkpoint.*all 2 are damaged"):
        publishing.publish_checkpoint(str(copy), reg)
    with pytest.raises(CorruptArtifactError, match="unfinished"):
        publishing.publish_checkpoint(str(copy / "checkpoints" / "ckpt-000000001"), reg)
    assert registry.list_versions(reg, "demo-opt") == [1]


def test_paths_that_are_no_run_say_what_to_give(run, tmp_path):
    run_dir, _ = run
    reg = str(tmp_path / "reg")
    with pytest.raises(publishing.NotACheckpointError, match="does not exist"):
        publishing.publish_checkpoint(str(tmp_path / "nope"), reg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(publishing.NotACheckpointError, match="not a run directory or a checkpoint"):
        publishing.publish_checkpoint(str(tmp_path / "empty"), reg)
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    with pytest.raises(publishing.NotACheckpointError, match="no checkpoint yet"):
        publishing.publish_checkpoint(str(fresh), reg)
    orphan = tmp_path / "orphan"
    shutil.copytree(run_dir / "checkpoints", orphan / "checkpoints")  # no job.json beside it
    with pytest.raises(publishing.NotACheckpointError, match="job.json does not exist"):
        publishing.publish_checkpoint(str(orphan), reg)
    registry.publish(reg, "art", "adam", {}, {}, {})
    with pytest.raises(publishing.NotACheckpointError, match="not a learner checkpoint"):
        publishing.publish_checkpoint(f"{reg}/art/1", reg)
    with pytest.raises(ValueError, match="invalid optimizer name"):
        publishing.publish_checkpoint(str(run_dir), reg, "Bad Name")


def _report(optimizer: str = "small_fc") -> dict:
    """The parts of a `metaopt eval` result.json that a manifest keeps."""
    return {
        "ref": "demo-opt:1", "ref_optimizer": optimizer, "suite": "smoke", "seeds": [0, 1],
        "baselines": ["adam"], "trials": 4, "elapsed_s": 12.0,
        "aggregate": {"num_tasks": 1, "wins": 1, "win_rate": 1.0, "geomean_speedup": 1.5},
        "tasks": [{"name": "q", "target_loss": 0.2, "final_loss_ratio": 0.5, "win": True,
                   "ref": {"final_train_loss": 0.1, "auc": 0.3}, "baselines": {"adam": {}}}],
    }


def test_an_evaluation_report_is_summarised_into_the_provenance(run, tmp_path):
    run_dir, _ = run
    reg = str(tmp_path / "reg")
    publishing.publish_checkpoint(str(run_dir), reg, evaluation=_report())
    summary = registry.load("demo-opt", reg).manifest["provenance"]["evaluation"]
    assert summary == {
        "ref": "demo-opt:1", "suite": "smoke", "seeds": [0, 1], "baselines": ["adam"], "trials": 4,
        "aggregate": _report()["aggregate"],
        "tasks": {"q": {"final_train_loss": 0.1, "target_loss": 0.2, "final_loss_ratio": 0.5, "win": True}},
    }
    assert publishing.evaluation_summary(summary) == summary
    with pytest.raises(ValueError, match="of optimizer 'adam'"):
        publishing.publish_checkpoint(str(run_dir), reg, evaluation=_report("adam"))
    with pytest.raises(ValueError, match="not a `metaopt eval` report"):
        publishing.publish_checkpoint(str(run_dir), reg, evaluation={"hello": 1})
    assert registry.list_versions(reg, "demo-opt") == [1]


def test_provenance_takes_job_specs_and_history_records_alike():
    from metaopt.learner.core import OuterStep

    history = [OuterStep(step=1, meta_loss=3.0, gradient_norm=1.0, estimates=2, inner_steps=4, time=0.0),
               OuterStep(step=2, meta_loss=float("nan"), gradient_norm=1.0, estimates=2, inner_steps=4,
                         time=1.0)]
    record = publishing.provenance(SPEC, "job", history, 2, code_version="abc")
    assert record == publishing.provenance(SPEC.model_dump(mode="json"), "job",
                                           [{"meta_loss": 3.0}, {"meta_loss": float("nan")}], 2,
                                           code_version="abc")
    assert (record["meta_loss_first"], record["meta_loss_last"]) == (3.0, None)  # JSON has no NaN
    assert record["code_version"] == "abc" and record["outer_steps"] == 2 and record["job_id"] == "job"
    assert publishing.provenance(SPEC, "job", [], 0)["code_version"] == publishing.installed_code_version()


# --- the command line -----------------------------------------------------------------------


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def test_cli_publish_pull_list_alias(run, tmp_path, cache):
    run_dir, thetas = run
    reg = str(tmp_path / "reg")
    done = invoke("publish", str(run_dir), "--name", "demo", "--registry", reg, "--json")
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert out | {"checkpoint": None} == {
        "ref": "demo:1", "name": "demo", "version": 1, "registry": reg, "aliases": ["latest"],
        "checkpoint": None, "job_id": JOB_ID, "outer_steps": 2, "meta_loss_first": 2.0, "meta_loss_last": 1.5,
        "digest": registry.digest(reg, "demo", 1),
    }
    report = tmp_path / "result.json"
    report.write_text(json.dumps(_report()))
    done = invoke("publish", str(run_dir), "--name", "demo", "--registry", reg, "--alias", "champion",
                  "--alias", "candidate", "--eval", str(report))
    assert done.exit_code == 0, done.output
    assert "published demo:2" in done.stdout and "candidate, champion, latest" in done.stdout
    assert registry.load("demo@champion", reg).manifest["provenance"]["evaluation"]["suite"] == "smoke"

    done = invoke("pull", "demo:1", "--registry", reg)
    assert done.exit_code == 0, done.output
    path = done.stdout.strip()
    assert path.startswith(str(cache)) and os.path.isdir(path)
    _assert_theta(registry.load_path(path), thetas[2])
    dest = tmp_path / "dest"
    done = invoke("pull", "demo@champion", "--registry", reg, "--dest", str(dest))
    assert done.exit_code == 0 and done.stdout.strip() == str(dest)

    done = invoke("registry", "alias", "demo", "1", "champion", "--registry", reg, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"name": "demo", "alias": "champion", "version": 1, "previous": 2}
    done = invoke("registry", "alias", "demo", "2", "stable", "--registry", reg)
    assert done.exit_code == 0 and done.stdout.strip() == "demo@stable -> demo:2"

    done = invoke("registry", "list", "--registry", reg, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == [{"name": "demo", "newest": 2, "versions": 2, "aliases": {
        "candidate": 2, "champion": 1, "latest": 2, "stable": 2}}]
    text = invoke("registry", "list", "--registry", reg).stdout
    assert text.splitlines()[0].split() == ["NAME", "NEWEST", "VERSIONS", "ALIASES"]
    assert "champion=1" in text and "latest=2" in text
    done = invoke("registry", "list", "demo", "--registry", reg, "--json")
    rows = json.loads(done.stdout)
    assert [(r["version"], r["job_id"], r["outer_steps"], r["meta_loss_last"], r["aliases"])
            for r in rows] == [(1, JOB_ID, 2, 1.5, ["champion"]),
                               (2, JOB_ID, 2, 1.5, ["candidate", "latest", "stable"])]
    assert all(r["created_at"] for r in rows) and [r["evaluated"] for r in rows] == [False, True]
    text = invoke("registry", "list", "demo", "--registry", reg).stdout.splitlines()
    assert text[0].split()[:2] == ["VERSION", "CREATED"] and JOB_ID in text[1] and "1.5" in text[1]
    # Each version's digest, shown in full, pins it: `pull NAME@sha256:…` fetches that content.
    assert [r["digest"] for r in rows] == [registry.digest(reg, "demo", v) for v in (1, 2)]
    assert rows[0]["digest"] in text[1] and rows[1]["digest"] in text[2]
    done = invoke("pull", f"demo@{rows[0]['digest']}", "--registry", reg)
    assert done.exit_code == 0 and registry.load_path(done.stdout.strip()).version == 1
    done = invoke("pull", "demo@sha256:" + "0" * 64, "--registry", reg)
    assert done.exit_code != 0 and "no version of 'demo'" in done.output and rows[1]["digest"] in done.output


def test_cli_registry_defaults_to_the_environment(run, tmp_path, cache):
    run_dir, _ = run
    env = {"METAOPT_REGISTRY": str(tmp_path / "env-reg")}
    assert invoke("publish", str(run_dir), env=env).exit_code == 0
    assert registry.list_names(str(tmp_path / "env-reg")) == ["demo-opt"]
    done = invoke("registry", "list", "--json", env=env)
    assert done.exit_code == 0 and json.loads(done.stdout)[0]["name"] == "demo-opt"
    done = invoke("registry", "list", "--registry", str(tmp_path / "empty"))
    assert done.exit_code == 0 and "no trained optimizers" in done.stderr


def test_cli_bad_input_exits_2_and_damage_exits_1(run, tmp_path, cache):
    run_dir, _ = run
    reg = str(tmp_path / "reg")
    registry.publish(reg, "opt", "adam", {}, {"w": np.zeros(2, np.float32)}, {"job_id": "j"})
    cases = [
        (("publish", str(tmp_path / "nope"), "--registry", reg), 2, "does not exist"),
        (("publish", str(tmp_path), "--registry", reg), 2, "not a run directory"),
        (("publish", str(run_dir), "--name", "Bad Name", "--registry", reg), 2, "invalid optimizer name"),
        (("publish", str(run_dir), "--alias", "latest", "--registry", reg), 2, "moves by itself"),
        (("publish", str(run_dir), "--eval", str(tmp_path / "none.json"), "--registry", reg), 2,
         "cannot read the evaluation report"),
        (("pull", "missing", "--registry", reg), 2, "no published optimizer named 'missing'"),
        (("pull", "opt:7", "--registry", reg), 2, r"available versions: [1]"),
        (("pull", "opt@best", "--registry", reg), 2, "no alias 'best'"),
        (("pull", "Opt", "--registry", reg), 2, "accepted forms"),
        (("registry", "list", "missing", "--registry", reg), 2, "no published optimizer named 'missing'"),
        (("registry", "alias", "opt", "3", "champion", "--registry", reg), 2, "available versions: [1]"),
        (("registry", "alias", "opt", "1", "latest", "--registry", reg), 2, "moves by itself"),
        (("registry", "alias", "opt", "1", "Bad!", "--registry", reg), 2, "invalid alias"),
        (("registry", "alias", "opt", "one", "champion", "--registry", reg), 2, "valid integer"),
        (("registry", "alias", "nope", "1", "champion", "--registry", reg), 2, "no published optimizer"),
    ]
    for args, code, needle in cases:
        done = invoke(*args)
        assert done.exit_code == code, (args, done.output)
        assert needle in done.stderr, (args, done.stderr)
    assert registry.list_names(reg) == ["opt"]  # none of those published anything
    theta = tmp_path / "reg" / "opt" / "1" / "theta.safetensors"
    data = theta.read_bytes()
    theta.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    done = invoke("pull", "opt", "--registry", reg)
    assert done.exit_code == 1 and "theta.safetensors does not match" in done.stderr
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    arrays = broken / "checkpoints" / "ckpt-000000002" / "arrays.safetensors"
    arrays.write_bytes(b"junk")
    done = invoke("publish", str(broken / "checkpoints" / "ckpt-000000002"), "--registry", reg)
    assert done.exit_code == 1 and "is corrupt" in done.stderr


def test_the_commands_run_as_a_user_runs_them(run, tmp_path):
    """One real process per command: the console entry point's wiring, exit codes and output."""
    run_dir, _ = run
    env = os.environ | {"METAOPT_REGISTRY": str(tmp_path / "reg"),
                        "METAOPT_REGISTRY_CACHE": str(tmp_path / "c")}

    def metaopt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "metaopt.cli", *args], capture_output=True, text=True,
                              timeout=120, env=env)

    done = metaopt("publish", str(run_dir), "--alias", "champion", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ref"] == "demo-opt:1"
    done = metaopt("pull", "demo-opt@champion")
    assert done.returncode == 0 and done.stdout.strip().startswith(str(tmp_path / "c")), done.stderr
    done = metaopt("registry", "alias", "demo-opt", "2", "champion")
    assert done.returncode == 2 and "available versions: [1]" in done.stderr


def _commit_all(repo: pathlib.Path) -> str:
    """`git init` and commit everything under `repo`; its commit, abbreviated as code_version does."""
    def git(*args: str) -> str:
        who = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
        return subprocess.run(["git", "-C", str(repo), *who, *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "a commit of its own")
    return git("rev-parse", "--short=12", "HEAD")


def _package(folder: pathlib.Path, pyproject_name: str | None = None) -> pathlib.Path:
    """A `metaopt` package folder under `folder`, with a pyproject.toml of that name beside it."""
    (folder / "metaopt").mkdir(parents=True)
    (folder / "metaopt" / "__init__.py").write_text("")
    if pyproject_name:
        (folder / "pyproject.toml").write_text(f'[project]\nname = "{pyproject_name}"\nversion = "0.1.0"\n')
    return folder / "metaopt"


def test_a_metaopt_inside_a_users_repository_does_not_record_the_users_commit(tmp_path):
    user = tmp_path / "user-project"
    planted = {
        "installed": _package(user / ".venv" / "lib" / "python3.11" / "site-packages"),
        "vendored": _package(user / "third_party" / "metaopt-src", "metaopt"),  # not the git top
        "copied": _package(user, "user-project"),  # the top, but of another project
    }
    users_commit = _commit_all(user)
    for how, package_dir in planted.items():
        version = publishing.code_version(package_dir)
        assert users_commit not in version and version == metadata.version("metaopt"), (how, version)


def test_metaopts_own_checkout_records_its_commit(tmp_path):
    package_dir = _package(tmp_path / "metaopt-src", "metaopt")
    commit = _commit_all(tmp_path / "metaopt-src")
    assert publishing.code_version(package_dir) == f"{metadata.version('metaopt')}+git.{commit}"
    (package_dir / "__init__.py").write_text("# changed since the commit\n")
    assert publishing.code_version(package_dir) == f"{metadata.version('metaopt')}+git.{commit}.dirty"


def test_the_code_version_names_the_git_commit_it_runs_from():
    version = publishing.installed_code_version()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert version.startswith(f"{metadata.version('metaopt')}+git.{head.stdout.strip()}")
