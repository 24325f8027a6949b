"""End to end: `metaopt train` as a user runs it (real Ray actors, real gRPC server, real
checkpoints and registry, in-run evaluation in its own process), then the trained optimizer
pulled, loaded and used."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections import Counter

import jax
import matplotlib.image
import numpy as np
import optax
import pytest
import safetensors.numpy

import metaopt
from metaopt import datasets, publishing, registry, task_zoo, wire
from metaopt.run_report import read_metrics
from tests.inrun_spec import e2e_with_eval
from tests.jsonout import last_json

DATA = pathlib.Path(__file__).parent / "data"
METAOPT = [sys.executable, "-m", "metaopt.cli"]
RECORD = {"every_truncations": 4, "runs": 1, "per_shard": 8}


def metaopt_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*METAOPT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tests/data/e2e.yaml with in-run evaluation every 6 s, `publish: best`, and a recording of
    the inner runs."""
    out = tmp_path_factory.mktemp("out")
    spec = e2e_with_eval(tmp_path_factory.mktemp("spec"), publish="best", record=RECORD)
    done = metaopt_cli("train", spec, "--out", out, "--json", "--job-id", "e2e-1")
    assert done.returncode == 0, done.stderr[-3000:]
    return last_json(done.stdout), out


def test_run_finishes_with_everything_on_disk(run):
    result, out = run
    assert result["outer_steps"] == 40 and result["job_id"] == "e2e-1"
    assert result["artifact"] == "e2e:1"
    assert result["artifact_digest"] == registry.digest(result["registry"], "e2e", 1)
    run_dir = pathlib.Path(result["run_dir"])
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 41))
    assert all(row["estimates"] == 2 for row in rows)  # the meta-batch size
    assert all(set(row["family_losses"]) == {"quadratic"} for row in rows)
    assert all(row["family_losses"]["quadratic"] == pytest.approx(row["meta_loss"]) for row in rows)
    assert (run_dir / "meta_loss.png").stat().st_size > 10_000
    assert any((run_dir / "checkpoints").glob("ckpt-*/COMMIT.json"))
    workers = json.loads((run_dir / "workers.json").read_text())
    assert len(workers) == 2 and not any("error" in w for w in workers), workers
    if len(os.sched_getaffinity(0)) >= 2:  # each CPU worker pinned itself to a core of its own
        assert [len(w["cores"]) for w in workers] == [1, 1], workers
        assert workers[0]["cores"] != workers[1]["cores"], workers
    # The learner accepts no more than the 40 steps need; acks still in flight when it says
    # Stop are not counted by the worker.
    assert 70 <= sum(w["accepted"] for w in workers) <= 80


def test_meta_loss_falls(run):
    result, _ = run
    losses = [row["meta_loss"] for row in read_metrics(pathlib.Path(result["run_dir"]) / "metrics.jsonl")]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.9 * first, (first, last)


def test_in_run_evaluations_are_in_metrics_jsonl_with_their_reports(run):
    result, _ = run
    run_dir = pathlib.Path(result["run_dir"])
    evaluations = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    assert evaluations and evaluations[-1]["outer_step"] == 40, evaluations  # the final θ, at the end
    steps = [e["outer_step"] for e in evaluations]
    assert steps == sorted(set(steps))  # one checkpoint at a time, none twice
    tuned = set()
    for e in evaluations:
        assert (e["suite"], e["num_tasks"], e["seeds"], e["baselines"]) == ("tiny", 2, [0], ["adam"])
        assert e["win_share"] == e["wins"] / 2 and e["elapsed_s"] > 0
        report = json.loads(pathlib.Path(e["report"]).read_text())
        ratios = [t["ref"]["final_train_loss"] / t["target_loss"] for t in report["tasks"]]
        assert e["wins"] == sum(r < 1 for r in ratios)
        assert e["geomean_final_loss_ratio"] == pytest.approx(np.exp(np.mean(np.log(ratios))), rel=1e-9)
        tuned.add(json.dumps([t["baselines"]["adam"]["hparams"] for t in report["tasks"]]))
    assert len(tuned) == 1  # the baselines were tuned once, in the run directory
    assert len(list((run_dir / "eval_baselines").glob("*.json"))) == 2  # one per task
    # The plot's two panels (meta-loss per family, then the evaluations): 7.5 inches at 120 dpi.
    assert matplotlib.image.imread(run_dir / "meta_loss.png").shape[0] == 900


def test_the_dataset_holds_the_workers_and_the_evaluations_runs(run):
    """Both workers' runs, and every in-run evaluation's: θ's runs on the tiny suite's 2 tasks at
    steps 0, 20 and 40, marked with the evaluated outer step, and the tuned baseline's once."""
    result, out = run
    records = list(datasets.records(datasets.recording_uri(str(out), "e2e-1")))
    workers = Counter(r.meta["worker"] for r in records)
    assert set(workers) == {"worker-0", "worker-1", "eval"}, workers
    metrics = pathlib.Path(result["run_dir"]) / "metrics.jsonl"
    evaluated = [e["outer_step"] for e in read_metrics(metrics, kind="eval")]
    ours = [r.meta for r in records if r.meta["worker"] == "eval" and r.meta["optimizer"]["name"] != "adam"]
    assert Counter(m["theta_version"] for m in ours) == {step: 2 * 3 for step in evaluated}
    assert all(m["step"] in (0, 20, 40) and m["horizon"] == 40 for m in ours)
    adam = Counter((r.meta["run"], r.meta["step"]) for r in records if r.meta["optimizer"]["name"] == "adam")
    assert len(adam) == 2 * 3 and set(adam.values()) == {1}


def test_the_published_optimizer_is_the_best_evaluated_checkpoint(run):
    result, _ = run
    run_dir = pathlib.Path(result["run_dir"])
    evaluations = [e for e in read_metrics(run_dir / "metrics.jsonl", kind="eval") if e["outer_step"] > 0]
    best = max(evaluations, key=lambda e: (e["wins"], -e["geomean_final_loss_ratio"], e["outer_step"]))
    provenance = metaopt.load(result["artifact"], registry=result["registry"]).manifest["provenance"]
    selection = provenance["selection"]
    assert (selection["outer_step"], selection["checkpoint"], selection["suite"]) == (
        best["outer_step"], best["checkpoint"], "tiny")
    assert selection["evaluations"] == len(read_metrics(run_dir / "metrics.jsonl", kind="eval"))
    assert provenance["outer_steps"] == best["outer_step"]
    assert "evaluation" not in provenance  # the suite that chose it does not report on it
    kept = safetensors.numpy.load_file(run_dir / "eval" / f"theta-{best['outer_step']:09d}.safetensors")
    theta = metaopt.load(result["artifact"], registry=result["registry"]).theta
    np.testing.assert_array_equal(wire.flatten(theta), kept["theta"])
    assert len(list((run_dir / "eval").glob("theta-*"))) == 1  # only the best θ is kept


def test_artifact_loads_and_trains_a_fresh_quadratic(run):
    result, _ = run
    trained = metaopt.load(result["artifact"], registry=result["registry"])
    assert trained.manifest["provenance"]["job_id"] == "e2e-1"
    assert trained.manifest["provenance"]["code_version"] == publishing.installed_code_version()
    family = task_zoo.family("quadratic", dims=[8], noise=[0.0, 0.0])
    task = family.task_fn(family.sample(jax.random.key(123)))  # a quadratic it never saw
    tx = trained.as_optax(num_steps=50)
    params = task.init(jax.random.key(0))
    state = tx.init(params)
    batch = task.batch(jax.random.key(1), task_zoo.TEST)
    initial = float(task.loss(params, None, batch))

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(task.loss)(params, None, batch)
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(50):
        params, state = step(params, state)
    assert float(task.loss(params, None, batch)) < 0.5 * initial


def test_pull_verifies_and_refuses_a_tampered_artifact(run, tmp_path):
    result, _ = run
    copy = tmp_path / "registry"
    shutil.copytree(result["registry"], copy)
    done = metaopt_cli("pull", result["artifact"], "--registry", copy, "--dest", tmp_path / "a")
    assert done.returncode == 0, done.stderr
    theta_file = copy / "e2e" / "1" / "theta.safetensors"
    data = bytearray(theta_file.read_bytes())
    data[-1] ^= 0xFF
    theta_file.write_bytes(bytes(data))
    done = metaopt_cli("pull", result["artifact"], "--registry", copy, "--dest", tmp_path / "b")
    assert done.returncode == 1
    assert "theta.safetensors" in done.stderr and "re-publish" in done.stderr
    assert not (tmp_path / "b" / "theta.safetensors").exists()


@pytest.mark.slow  # default run: test_chaos_learner resumes again and again
def test_same_job_id_resumes_from_its_checkpoint(run):
    result, out = run
    done = metaopt_cli("train", DATA / "e2e.yaml", "--out", out, "--json", "--job-id", "e2e-1",
                       "--max-outer-steps", "44")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = last_json(done.stdout)
    assert resumed["outer_steps"] == 44
    assert resumed["meta_loss_first"] == result["meta_loss_first"]  # history came back too
    steps = [row["step"] for row in read_metrics(pathlib.Path(result["run_dir"]) / "metrics.jsonl")]
    assert steps == list(range(1, 45))


def test_a_bad_job_spec_is_refused_and_starts_nothing(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: Bad Name\ntasks:\n  - family: nosuchfamily\nestimator: {sigma: -1}\n")
    done = metaopt_cli("train", spec, "--out", tmp_path / "out", timeout=60)
    assert done.returncode == 2
    for expected in ("name", "tasks.0", "nosuchfamily", "quadratic", "estimator.sigma"):
        assert expected in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_the_usage_example_runs_on_the_trained_optimizer(run, tmp_path):
    result, _ = run
    example = pathlib.Path(__file__).parent.parent / "examples" / "use_trained_optimizer.py"
    task = '{"name": "quadratic", "kwargs": {"dim": 8, "log10_condition": 1, "noise": 0, "seed": 3}}'
    done = subprocess.run(
        [sys.executable, str(example), "--ref", result["artifact"], "--registry", result["registry"],
         "--task", task, "--steps", "30", "--plot", str(tmp_path / "curves.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "e2e:1 (learned): final training loss" in done.stdout
    assert (tmp_path / "curves.png").stat().st_size > 10_000
