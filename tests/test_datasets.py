"""Datasets of training runs (metaopt/datasets.py, workers/recording.py): a PES worker against a
real gRPC learner records its inner runs at truncation boundaries; the shards and their export
read back bit for bit; a record's losses are the task's at its parameters; a corrupt shard and a
shard of another schema are refused with their names; the CLI exports, lists and inspects."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from metaopt import datasets, evaluation, optimizers, storage, task_zoo
from metaopt.cli import app
from metaopt.evaluation import LOSS_KEY, held_out_loss
from metaopt.jobspec import JobSpecError, OuterSpec, parse_job_spec
from metaopt.learner.core import Learner, LearnerConfig
from metaopt.learner.server import make_server
from metaopt.task_zoo.base import TRAIN
from metaopt.workers.actor import PESWorker
from tests.inrun_spec import TINY_SUITE
from tests.ports import free_port

JOB = "job-rec"
STEPS = 12  # outer steps of one estimate each: 12 truncations, 6 of them recorded, 2 runs each
SPEC = {
    "name": "rec",
    "tasks": [{"family": "mlp",
               "kwargs": {"widths": [8], "depths": [1], "activations": ["tanh"], "batch_sizes": [16]}}],
    "optimizer": {"name": "nominal_mlp", "hparams": {"hidden": 4}},
    "estimator": {"num_particles": 2, "truncation_length": 5, "inner_horizon": 20},
    "outer": {"meta_batch_size": 1}, "stop": {"max_outer_steps": STEPS},
    "record": {"every_truncations": 2, "runs": 2, "per_shard": 5},
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> str:
    """A storage root where one worker recorded a 12-truncation job; returns the root."""
    root = str(tmp_path_factory.mktemp("root"))
    spec = parse_job_spec({**SPEC, "storage": {"root": root}})
    theta0 = optimizers.make("nominal_mlp", hidden=4).init(jax.random.key(0))
    learner = Learner(LearnerConfig(JOB, max_outer_steps=STEPS, outer=OuterSpec(meta_batch_size=1)), theta0)
    port = free_port()
    server, _ = make_server(learner, "127.0.0.1", port)
    worker = PESWorker(spec, f"127.0.0.1:{port}", "worker-0", JOB)
    try:
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        thread.join(timeout=180)
        assert not thread.is_alive(), "the worker did not finish its job"
    finally:
        server.stop(grace=None)
    return root


def _same(a: datasets.Record, b: datasets.Record) -> bool:
    return a.meta == b.meta and a.params.keys() == b.params.keys() and all(
        a.params[k].dtype == b.params[k].dtype and a.params[k].tobytes() == b.params[k].tobytes()
        for k in a.params)


def test_a_worker_records_its_runs_at_truncation_boundaries(recorded):
    """Runs of 20 steps (2 pairs; a new task and new runs every 4 truncations), each recorded at
    steps 10 and 20 (every 2 truncations of 5 steps) and at step 0 (rebuilt from its key when first
    recorded): at least 6 runs in 12 truncations (more when the learner refuses a stale estimate);
    shards of 5 records but the last; each record's training and held-out losses
    are the task's at its parameters, on the batches its run's key gives; step 0 is the task's init
    from the run's key."""
    uri = datasets.recording_uri(recorded, JOB)
    names = datasets.shard_names(uri)
    records = list(datasets.records(uri))
    sizes = [len(datasets.read_shard(f"{uri}/shards/{name}")) for name in names]
    assert sizes[:-1] == [5] * (len(sizes) - 1) and 1 <= sizes[-1] <= 5 and sum(sizes) == len(records)
    by_run = {}
    for r in records:
        by_run.setdefault(r.meta["run"], []).append(r.meta["step"])
    assert len(by_run) >= 6 and all(sorted(steps) in ([0, 10], [0, 10, 20]) for steps in by_run.values())
    assert sum(sorted(steps) == [0, 10, 20] for steps in by_run.values()) >= 6
    for record in records[:4]:
        meta = record.meta
        assert (meta["optimizer"]["name"], meta["horizon"], meta["worker"]) == ("nominal_mlp", 20, "worker-0")
        task = task_zoo.task(task_zoo.TaskSpec(meta["task"]["name"], meta["task"]["kwargs"]))
        key_data = np.frombuffer(bytes.fromhex(meta["run"].rsplit("-", 1)[1]), np.uint32)
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), LOSS_KEY)
        batch_key, loss_key, held_key = jax.random.split(key, 3)
        params = record.tree
        loss = task.loss(params, loss_key, task.batch(batch_key, TRAIN))
        assert float(loss) == pytest.approx(meta["loss"], rel=1e-5)
        assert float(held_out_loss(task, params, held_key)) == pytest.approx(meta["held_out_loss"], rel=1e-5)
        if meta["step"] == 0:
            run_key = jax.random.wrap_key_data(key_data)
            initial = storage.flatten_tree(task.init(jax.random.fold_in(run_key, 0)))
            for k in initial:  # to float32 rounding: the worker's init is jitted and vmapped, this one eager
                np.testing.assert_allclose(initial[k], record.params[k], rtol=1e-6, atol=1e-7)
        assert {k: v.shape for k, v in record.params.items()} == {
            k: v.shape for k, v in storage.flatten_tree(task.init(jax.random.key(0))).items()}


def test_the_export_reads_back_bit_for_bit_and_the_cli_lists_and_inspects_it(recorded, tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["dataset", "export", JOB, "--root", recorded, "--json"])
    assert done.exit_code == 0, done.output
    index = json.loads(done.output)
    dest = datasets.export_uri(recorded, JOB)
    source = datasets.recording_uri(recorded, JOB)
    recorded_records = list(datasets.records(source))
    assert index["uri"] == dest and index["records"] == len(recorded_records)
    assert [s["name"] for s in index["shards"]] == datasets.shard_names(source)
    for name in datasets.shard_names(source):
        a, _ = storage.read_committed(f"{source}/shards/{name}")
        b, _ = storage.read_committed(f"{dest}/shards/{name}")
        assert a == b
    assert all(_same(a, b) for a, b in zip(datasets.records(source), datasets.records(dest), strict=True))
    assert datasets.load_index(dest)["records"] == len(recorded_records)

    listed = json.loads(runner.invoke(app, ["dataset", "list", "--root", recorded, "--json"]).output)
    rows = {(r["kind"], r["name"], r["shards"]) for r in listed}
    shards = len(index["shards"])
    assert rows == {("exported", JOB, shards), ("recording", JOB, shards)}
    info = runner.invoke(app, ["dataset", "inspect", dest, "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    count = len(recorded_records)
    assert summary["records"] == count and summary["steps"] == [0, 20] and summary["tasks"] == {"mlp": count}
    assert summary["runs"] == len({r.meta["run"] for r in recorded_records})

    again = runner.invoke(app, ["dataset", "export", JOB, "--root", recorded])
    assert again.exit_code == 2 and "already holds a dataset" in again.output
    nothing = runner.invoke(app, ["dataset", "export", "job-none", "--root", recorded])
    assert nothing.exit_code == 2 and "holds no shards" in nothing.output


def _records() -> list[datasets.Record]:
    meta = {"run": "w-1-ab", "step": 10, "horizon": 20, "loss": 0.5, "held_out_loss": 0.75,
            "task": {"name": "mlp", "kwargs": {"width": 8}}, "optimizer": {"name": "adam", "hparams": {}},
            "theta_version": 3, "worker": "w"}
    weird = np.array([np.nan, -0.0, np.inf, 1e-45], np.float32)  # NaN, signed zero, subnormal: bits kept
    first = {"layer_0/w": np.arange(6, dtype=np.float32).reshape(2, 3), "scale": weird}
    second = {"b": np.array(3.5, np.float32), "n": np.array([1, 2], np.int32)}
    return [datasets.Record(meta, first), datasets.Record({**meta, "step": 20}, second)]


def test_a_shard_round_trips_bit_for_bit():
    back = datasets.decode_shard(datasets.encode_shard(_records()), "memory")
    assert len(back) == 2 and all(_same(a, b) for a, b in zip(_records(), back, strict=True))
    assert back[1].params["b"].shape == ()


def test_a_corrupt_shard_is_refused_with_its_name(tmp_path):
    uri = str(tmp_path / "rec")
    writer = datasets.ShardWriter(uri, "w-1", per_shard=1)
    for record in _records():
        writer.add(record)
    shard = tmp_path / "rec" / "shards" / "w-1-00001" / datasets.SHARD_FILE
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(storage.CorruptArtifactError, match="w-1-00001/records.safetensors"):
        list(datasets.records(uri))
    with pytest.raises(storage.CorruptArtifactError, match="w-1-00001"):
        datasets.export(uri, str(tmp_path / "out"))
    done = CliRunner().invoke(app, ["dataset", "inspect", uri])
    assert done.exit_code == 1 and "w-1-00001/records.safetensors" in done.output


@pytest.mark.parametrize(("break_it", "why"), [
    (lambda m: {**m, "schema": "other/9"}, "schema 'other/9'"),
    (lambda m: {**m, "records": json.dumps([{"run": "x"}])}, r"record 0 lacks \['held_out_loss'"),
    (lambda m: {**m, "records": m["records"].replace('"step": 10', '"step": true')}, "'step' is True"),
    (lambda m: {**m, "records": m["records"].replace('"scale"', '"absent"')}, "does not hold"),
])
def test_a_shard_of_another_schema_is_refused_with_its_name(tmp_path, break_it, why):
    import safetensors.numpy

    good = datasets.encode_shard(_records()[:1])
    metadata = json.loads(good[8:8 + int.from_bytes(good[:8], "little")])["__metadata__"]
    tensors = {f"r00000/{k}": v for k, v in _records()[0].params.items()}
    bad = safetensors.numpy.save(tensors, metadata=break_it(metadata))
    uri = str(tmp_path / "rec" / "shards" / "w-9-00000")
    storage.write_committed(uri, {datasets.SHARD_FILE: bad}, {})
    with pytest.raises(datasets.DatasetError, match=why):
        datasets.read_shard(uri)
    done = CliRunner().invoke(app, ["dataset", "inspect", str(tmp_path / "rec")])
    assert done.exit_code == 2 and "w-9-00000" in done.output


def test_the_job_spec_refuses_a_record_it_cannot_keep():
    with pytest.raises(JobSpecError, match=r"record.runs \(3\) exceeds estimator.num_particles \(2\)"):
        parse_job_spec({**SPEC, "record": {"runs": 3}})
    with pytest.raises(JobSpecError, match="record keeps inner runs of a learned optimizer"):
        parse_job_spec({**{k: v for k, v in SPEC.items() if k != "optimizer"},
                        "meta_objective": {"name": "adam_schedule"}})
    with pytest.raises(JobSpecError, match="every_truncations"):
        parse_job_spec({**SPEC, "record": {"every_truncations": 0}})
    with pytest.raises(ValueError, match="record` needs storage.root"):
        PESWorker(parse_job_spec(SPEC), "127.0.0.1:1", "worker-0", JOB)


# --- evaluations record too ----------------------------------------------------------------------

def test_an_evaluation_run_keeps_the_parameters_its_curve_was_measured_at():
    """A recorded evaluation run (2 seeds, 40 steps, test points every 15): parameters at steps 0,
    15, 30 and 40; its curves are those of the run that does not record; step 0 is the task's init
    from the seed; at step i (< 40) the recorded parameters give, with step i's keys, the training
    loss the curve holds for step i (so they are the parameters the run had there); and each
    record's losses are `run_losses` at its parameters, computed eagerly."""
    task = task_zoo.task(task_zoo.TaskSpec("quadratic", {"dim": 8, "log10_condition": 1.0, "noise": 0.1,
                                                         "seed": 21}))
    seed_keys = jax.vmap(jax.random.key)(np.array([0, 1]))
    hparams = {"learning_rate": 0.05}
    plain = evaluation._train(task, "adam", hparams, {}, 40, seed_keys, 15)
    *curves, (params, loss, held_out) = evaluation._train(task, "adam", hparams, {}, 40, seed_keys, 15,
                                                         record=True)
    assert evaluation.recorded_steps(40, 15) == [0, 15, 30, 40]
    for a, b in zip(plain, curves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True)
    assert loss.shape == held_out.shape == (2, 4)
    for s in range(2):
        k_init, k_steps, _ = jax.random.split(seed_keys[s], 3)
        step_keys = jax.random.split(k_steps, 40)
        at = [jax.tree.map(lambda x, s=s, p=p: x[s, p], params) for p in range(4)]
        np.testing.assert_array_equal(at[0]["x"], task.init(k_init)["x"])
        for p, step in enumerate([0, 15, 30]):
            k_batch, k_loss, _ = jax.random.split(step_keys[step], 3)
            value = task.loss(at[p], k_loss, task.batch(k_batch, TRAIN))
            assert float(value) == pytest.approx(curves[0][s, step], rel=1e-5)
        for p in range(4):
            truth = evaluation.run_losses(task, at[p], seed_keys[s])
            assert (float(truth[0]), float(truth[1])) == pytest.approx((loss[s, p], held_out[s, p]), rel=1e-5)
    assert not np.allclose(at[0]["x"], at[3]["x"])  # the run moved


def test_metaopt_eval_records_the_runs_of_the_optimizer_and_its_baselines(tmp_path):
    """`metaopt eval --record DIR` on the tiny suite (2 tasks, 40 steps, test points every 20, seed
    0): adam as REF and tuned adam as baseline, each recorded at steps 0, 20 and 40 on both tasks;
    a destination that cannot be written is refused before any training."""
    out = tmp_path / "dataset"
    runner = CliRunner()
    done = runner.invoke(app, ["eval", "sgd", "--suite", str(TINY_SUITE), "--record", str(out), "--json",
                               "--out", str(tmp_path / "report")])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1])["recorded"] == str(out)
    records = list(datasets.records(str(out)))
    assert len(records) == 2 * 2 * 3  # optimizers × tasks × recorded steps (1 seed)
    runs = {}
    for r in records:
        runs.setdefault(r.meta["run"], []).append(r.meta["step"])
        assert (r.meta["worker"], r.meta["horizon"], r.meta["theta_version"]) == ("eval", 40, -1)
        assert np.isfinite(r.meta["loss"]) and set(r.params) == {"x"}
    assert runs == {f"eval/{o}/tiny/quadratic_{t}/seed-0": [0, 20, 40] for o in ("sgd", "adam") for t in "ab"}
    assert {r.meta["optimizer"]["name"] for r in records} == {"sgd", "adam"}
    info = json.loads(runner.invoke(app, ["dataset", "inspect", str(out), "--json"]).output)
    assert info["records"] == 12 and info["optimizers"] == ["adam", "sgd"]

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    refused = runner.invoke(app, ["eval", "sgd", "--suite", str(TINY_SUITE), "--record", str(blocked / "d")])
    assert refused.exit_code == 2 and f"cannot record to {blocked / 'd'}" in refused.output
