"""The G.pt-style model of updates (metaopt/update_model.py): its noise schedule against the
closed form, the training pairs a dataset gives, a training run that lowers its loss on a tiny
exported dataset of real Adam runs, and a sampler that recovers a known update."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

from metaopt import datasets, storage, task_zoo, update_model
from metaopt.task_zoo.base import TRAIN


def test_the_noise_schedule_matches_its_closed_form():
    beta, alpha_bar = update_model.noise_schedule(100)
    assert beta[0] == pytest.approx(1e-4) and beta[-1] == pytest.approx(update_model.BETA_MAX)
    assert alpha_bar[49] == pytest.approx(math.prod(1 - float(b) for b in beta[:50]), rel=1e-5)
    assert np.all(np.diff(alpha_bar) < 0) and alpha_bar[0] > 0.9998 and alpha_bar[-1] < 1e-4


TASK = {"name": "mlp", "kwargs": {"width": 4, "depth": 1, "activation": "tanh", "batch_size": 16, "seed": 1}}


def _record(run: str, step: int, loss: float, params: dict) -> datasets.Record:
    meta = {"run": run, "step": step, "horizon": 30, "loss": loss, "held_out_loss": loss,
            "task": TASK, "optimizer": {"name": "adam", "hparams": {}},
            "theta_version": 0, "worker": "w"}
    return datasets.Record(meta, {k: np.asarray(v, np.float32) for k, v in params.items()})


def test_pairs_are_every_later_record_of_a_run_and_one_architecture_only():
    recs = [_record("a", s, 1.0 / (1 + s), {"w": np.full(3, s)}) for s in (0, 10, 20)]
    recs += [_record("b", s, 1.0, {"w": np.full(3, 5.0 + s)}) for s in (0, 10)]
    data = update_model.pairs(recs)
    assert data.theta.shape == (4, 3)  # a: 3 pairs, b: 1
    np.testing.assert_array_equal(data.delta[:, 0], [10, 20, 10, 10])
    np.testing.assert_allclose(data.log_target[:3], np.log([1 / 11, 1 / 21, 1 / 21]), rtol=1e-6)
    with pytest.raises(ValueError, match="one architecture"):
        update_model.pairs(recs + [_record("c", 0, 1.0, {"w": np.zeros(4)})])
    with pytest.raises(ValueError, match="no run has two records"):
        update_model.pairs([_record("a", 0, 1.0, {"w": np.zeros(3)})])


def _adam_runs(tmp_path, runs: int = 6, steps: int = 30, every: int = 5) -> str:
    """A tiny exported dataset: Adam training a 1-layer MLP from `runs` initialisations,
    recorded every `every` steps."""
    task = task_zoo.task(task_zoo.TaskSpec(TASK["name"], TASK["kwargs"]))
    writer = datasets.ShardWriter(str(tmp_path / "rec"), "w-0", per_shard=16)
    tx = optax.adam(0.03)
    batch = task.batch(jax.random.key(7), TRAIN)
    loss_grad = jax.jit(jax.value_and_grad(lambda p: task.loss(p, jax.random.key(0), batch)))
    for r in range(runs):
        params = task.init(jax.random.key(r))
        state = tx.init(params)
        for step in range(steps + 1):
            loss, grads = loss_grad(params)
            if step % every == 0:
                writer.add(_record(f"run{r}", step, float(loss), storage.flatten_tree(params)))
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    writer.flush()
    datasets.export(str(tmp_path / "rec"), str(tmp_path / "exported"))
    return str(tmp_path / "exported")


def test_training_lowers_its_loss_on_a_tiny_exported_dataset_and_proposals_are_parameters(tmp_path):
    data = update_model.pairs(datasets.records(_adam_runs(tmp_path)))
    assert data.theta.shape[0] == 6 * 21  # 7 records a run: 21 pairs
    model, history = update_model.fit(data, steps=400, key=jax.random.key(0), hidden=64, batch=64)
    assert history.shape == (400,) and np.all(np.isfinite(history))
    # Predicting no noise scores 1; the model learns what of the noise it can tell from the data.
    assert history[-50:].mean() < 0.95 * history[:50].mean()
    record = next(iter(datasets.records(_adam_runs(tmp_path / "again", runs=1))))
    loss = record.meta["loss"]
    proposals = model.propose(record.params, loss, 0.5 * loss, jax.random.key(1), samples=3)
    assert len(proposals) == 3 and all(p.keys() == record.params.keys() for p in proposals)
    for proposal in proposals:
        assert all(np.all(np.isfinite(v)) and v.shape == record.params[k].shape for k, v in proposal.items())


def test_the_sampler_recovers_a_known_distribution_of_updates_given_the_start():
    """Every run ends near (1, -2) wherever it starts: Δ = (1, -2) - θ + N(0, 0.3²). Prompted at
    θ = (0.5, 0.5), 64 samples of the trained model have a mean within 0.15 of (0.5, -2.5) (the
    standard error is 0.04) and a spread between 0.15 and 0.6: the model reads θ."""
    rng = np.random.default_rng(0)
    recs = []
    for r in range(256):
        start = rng.normal(size=2)
        end = np.array([1.0, -2.0]) + rng.normal(scale=0.3, size=2)
        recs += [_record(f"r{r}", 0, 1.0, {"w": start}), _record(f"r{r}", 5, 0.5, {"w": end})]
    data = update_model.pairs(recs)
    model, _ = update_model.fit(data, steps=1500, key=jax.random.key(0), hidden=64, batch=64)
    out = model.propose({"w": np.full(2, 0.5)}, 1.0, 0.5, jax.random.key(3), samples=64)
    deltas = np.stack([p["w"] for p in out]) - 0.5
    assert np.all(np.isfinite(deltas))
    np.testing.assert_allclose(deltas.mean(0), [0.5, -2.5], atol=0.15)
    assert np.all((deltas.std(0) > 0.15) & (deltas.std(0) < 0.6))


@pytest.mark.slow  # default run: the model's own tests above; this adds the benchmark's Adam curves
def test_the_benchmark_prompts_unseen_initialisations_and_finds_where_adam_matches(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    from update_model import ADAM_STEPS, main  # the benchmark script, not metaopt.update_model

    summary = main([_adam_runs(tmp_path, runs=4), "--steps", "50", "--hidden", "16", "--inits", "2",
                    "--samples", "2", "--out", str(tmp_path / "out")])
    assert summary["records"] == 4 * 7 and summary["parameters"] == 64 * 4 + 4 + 4 * 10 + 10
    assert len(summary["adam"]) == len(ADAM_STEPS) and len(summary["inits"]) == 2
    assert summary["adam"][-1] < summary["start"]  # Adam at its tuned rate trains the task
    matched = summary["adam_steps_to_match"]
    assert matched is None or summary["adam"][ADAM_STEPS.index(matched)] <= summary["model"]
    assert json.loads((tmp_path / "out" / "update_model.json").read_text())["model"] == summary["model"]
