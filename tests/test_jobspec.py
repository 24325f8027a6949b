"""The job spec: defaults, overrides, and clear errors that name the field."""

from __future__ import annotations

import pytest

from metaopt.jobspec import JobSpecError, load_job_spec, parse_job_spec

MINIMAL = {"name": "j", "tasks": [{"family": "quadratic"}]}


def test_a_minimal_spec_gets_the_documented_defaults():
    spec = parse_job_spec(MINIMAL)
    assert spec.optimizer.name == "small_fc" and spec.estimator.kind == "pes"
    assert spec.task_balance == "weight" and spec.tasks[0].augment is None
    assert spec.estimator.task_lifetime == 10  # inner_horizon 200 / truncation_length 20
    # Whole inner runs, one per task; the estimator gets the choice.
    assert spec.estimator.stagger is False
    assert spec.stop.max_minutes is None


def test_overrides_are_revalidated():
    spec = parse_job_spec(MINIMAL).with_overrides(**{"stop.max_outer_steps": 7, "workers.count": 3})
    assert spec.stop.max_outer_steps == 7 and spec.workers.count == 3
    with pytest.raises(JobSpecError, match="workers.count"):
        parse_job_spec(MINIMAL).with_overrides(**{"workers.count": 0})
    with pytest.raises(JobSpecError, match="not a section"):
        parse_job_spec(MINIMAL).with_overrides(**{"name.first": "x"})


def test_augmentation_and_cost_balance():
    spec = parse_job_spec({**MINIMAL, "task_balance": "cost", "tasks": [
        {"family": "quadratic", "augment": {"param_scale": [0.1, 10], "grad_noise": [0, 0.1]}}]})
    assert spec.tasks[0].augment.param_scale == (0.1, 10.0)


@pytest.mark.parametrize("change, where", [
    ({"tasks": [{"family": "quadratic", "augment": {"param_scale": [0, 1]}}]}, "tasks.0.augment"),
    ({"task_balance": "flops"}, "task_balance"),
    ({"tasks": [{"family": "quadratic"}, {"family": "quadratic"}]}, "tasks"),
    ({"tasks": [{"family": "quadratic", "kwargs": {"dims": "eight"}}]}, "tasks.0"),
    ({"estimator": {"truncation_length": 300}}, "estimator"),
    ({"optimizer": {"name": "small_fc", "hparams": {"hiden": 3}}}, "optimizer"),
    ({"stop": {"max_outer_steps": 10, "max_minutes": 0}}, "stop.max_minutes"),
    ({"estimator": {"stagger": "sometimes"}}, "estimator.stagger"),
    ({"estimator": {"min_loss_ratio": 20}}, "estimator"),
])
def test_invalid_specs_name_the_field(change, where):
    with pytest.raises(JobSpecError) as err:
        parse_job_spec({**MINIMAL, **change})
    assert f"  {where}" in str(err.value), str(err.value)


def test_unreadable_files_get_a_clear_error(tmp_path):
    with pytest.raises(JobSpecError, match="no job spec at"):
        load_job_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_job_spec(tmp_path / "bad.yaml")
    with pytest.raises(JobSpecError, match="cannot read"):
        load_job_spec(tmp_path)  # a directory
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(JobSpecError, match="mapping"):
        load_job_spec(tmp_path / "list.yaml")
