"""benchmarks/compare_refs.py: optimizers side by side on a suite with one cache of tuned
baselines (a suite of two tiny quadratics, one seed); a learner checkpoint directory is a REF too, and
a bad REF is refused before anything runs."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from metaopt import optimizers, storage, wire
from tests.test_design_screen import SUITE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from compare_refs import main, resolve, table  # noqa: E402

# test_design_screen's one-quadratic suite, and a second quadratic.
TINY = SUITE + """  - name: quadratic_4
    spec: {name: quadratic, kwargs: {dim: 4, log10_condition: 1.0, noise: 0.1, seed: 12}}
    steps: 40
"""


def test_refs_side_by_side_on_one_cache_of_baselines(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    summary = main(["sgd", "adam", "--suites", str(tmp_path / "tiny.yaml"), "--label", "sgd=plain SGD",
                    "--baselines", "adam,adam_cosine", "--out", str(tmp_path / "out"), "--json"])
    rows = summary["results"]
    assert [(r["label"], r["suite"]) for r in rows] == [("plain SGD", "tiny"), ("adam", "tiny")]
    assert all(set(r["final_loss_ratio"]) == {"quadratic_8", "quadratic_4"} for r in rows)
    assert json.loads((tmp_path / "out" / "comparison.json").read_text()) == summary
    assert len(list((tmp_path / "out" / "baselines").iterdir())) == 4  # once per task and baseline
    assert all(set(r["best_baseline"].values()) <= {"adam", "adam_cosine"} for r in rows)
    for r in rows:  # every ratio is REF's loss over its task's best baseline's
        for task, losses in r["final_train_loss"].items():
            best = losses[r["best_baseline"][task]]
            assert losses["ref"] / best == pytest.approx(r["final_loss_ratio"][task])
            assert set(r["tuned_hparams"][task]["adam_cosine"]) >= {"learning_rate", "b2"}
    printed = capsys.readouterr().out
    assert "| plain SGD | " in printed
    assert "| optimizer | wins | geomean | quadratic_8 | quadratic_4 |" in printed
    assert "| best tuned baseline | | | " in printed


def test_a_checkpoint_directory_is_a_ref_and_a_bad_ref_is_refused_before_any_run(tmp_path):
    opt = optimizers.make("nominal_mlp")
    theta = opt.init(jax.random.key(0))
    spec = {"name": "cmp", "tasks": [{"family": "quadratic", "kwargs": {"dims": [4]}}],
            "optimizer": {"name": "nominal_mlp", "hparams": {}}}
    digest = wire.structure_digest(wire.theta_structure(theta))
    meta = {"job_id": "cmp-1", "version": 7, "structure_digest": digest, "history": [], "spec": spec}
    uri = storage.save_checkpoint(str(tmp_path / "run" / "checkpoints"), 7,
                                  {"theta": np.asarray(wire.flatten(theta))}, meta)
    ref = resolve(uri, None)
    assert ref.ref == "cmp-1@step-7" and ref.optimizer_name == "nominal_mlp"
    with pytest.raises(Exception, match="neither a registered optimizer"):
        main(["adam", "no/such:ref", "--suites", "smoke", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x" / "baselines").exists()


def test_the_table_marks_wins():
    rows = [{"label": "a", "wins": 1, "num_tasks": 2, "geomean_final_loss_ratio": 0.5,
             "final_loss_ratio": {"t1": 0.25, "t2": 1.0}, "best_baseline": {"t1": "adam", "t2": "sgd"}}]
    assert table(rows).splitlines()[-2:] == ["| a | 1/2 | 0.5× | **0.25×** | 1× |",
                                             "| best tuned baseline | | | adam | sgd |"]
