"""Bad input at metaopt's edges (`benchmarks/chaos_inputs.py`: hypothesis, seeded, a few cases of
each kind). Invalid job specs are refused by `metaopt train` and `metaopt submit` with exit 2, a
message that names the problem, and nothing started; tampered artifacts are refused on pull and
load, never reach the cache, and an intact version still pulls after a refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from benchmarks.chaos_artifacts import ARTIFACT_KINDS
from benchmarks.chaos_inputs import fuzz_artifacts, fuzz_job_specs
from benchmarks.chaos_specs import BASE, SPEC_KINDS
from metaopt import registry
from metaopt.cli import app
from metaopt.storage import CorruptArtifactError

PER_KIND = 10  # cases of each kind, in each part (fewer where a kind has fewer distinct cases)


def _failing(by_kind: dict) -> str:
    """The failing examples, for the assertion message (a string: pytest shows it whole)."""
    return json.dumps({kind: s["examples"] for kind, s in by_kind.items() if s["failures"]}, indent=1)


def _tried_each(by_kind: dict, kinds) -> bool:
    return set(by_kind) == set(kinds) and all(1 <= s["tried"] <= PER_KIND for s in by_kind.values())


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict:
    return fuzz_job_specs(PER_KIND * len(SPEC_KINDS), seed=0, workdir=tmp_path_factory.mktemp("specs"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("artifacts")
    return fuzz_artifacts(PER_KIND * len(ARTIFACT_KINDS), seed=0, workdir=workdir)


def test_every_kind_of_invalid_spec_is_tried(specs):
    assert _tried_each(specs["spec_by_kind"], SPEC_KINDS)
    assert specs["spec_cases"] > (PER_KIND - 1) * len(SPEC_KINDS)


def test_no_invalid_spec_starts_training_or_reaches_the_cluster(specs):
    assert specs["training_reached"] == 0 and specs["cluster_contacts"] == 0, _failing(specs["spec_by_kind"])
    assert specs["spec_started"] == 0, _failing(specs["spec_by_kind"])


def test_every_invalid_spec_exits_2_with_a_message_naming_the_problem(specs):
    assert specs["spec_unclear"] == 0, _failing(specs["spec_by_kind"])


def test_a_password_in_the_job_store_url_is_never_echoed(specs):
    assert specs["secrets_echoed"] == 0, _failing(specs["spec_by_kind"])


def test_every_kind_of_tampering_is_tried(artifacts):
    assert _tried_each(artifacts["artifact_by_kind"], ARTIFACT_KINDS)
    assert artifacts["artifact_cases"] > (PER_KIND - 1) * len(ARTIFACT_KINDS)


def test_no_tampered_artifact_is_pulled_or_loaded(artifacts):
    assert artifacts["artifact_accepted"] == 0, _failing(artifacts["artifact_by_kind"])


def test_a_refused_artifact_never_lands_in_the_cache_and_a_damaged_cache_copy_is_replaced(artifacts):
    assert artifacts["cache_poisoned"] == 0, _failing(artifacts["artifact_by_kind"])


def test_refusals_name_the_damage_and_the_intact_version_still_pulls(artifacts):
    assert artifacts["artifact_unclear"] == 0, _failing(artifacts["artifact_by_kind"])
    assert artifacts["intact_failed"] == 0, _failing(artifacts["artifact_by_kind"])


def test_a_consistent_rewrite_of_every_hash_is_undetectable_by_design(artifacts):
    """Nothing signs COMMIT.json: whoever may write the registry may publish. The figure says so."""
    assert artifacts["undetectable_accepted"] == artifacts["artifact_by_kind"]["consistent_rewrite"]["tried"]


def test_a_negative_particle_count_is_named_and_nothing_is_written(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(BASE | {"estimator": BASE["estimator"] | {"num_particles": -1}}))
    done = CliRunner().invoke(app, ["train", str(spec), "--out", str(tmp_path / "out")])
    assert done.exit_code == 2, done.output
    assert "estimator.num_particles: Input should be greater than or equal to 1" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_truncated_theta_is_refused_on_pull_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    reg = str(tmp_path / "registry")
    registry.publish(reg, "opt", "small_fc", {}, {"w": np.arange(64, dtype=np.float32)}, {"job_id": "j"})
    theta = tmp_path / "registry" / "opt" / "1" / registry.THETA_FILE
    theta.write_bytes(theta.read_bytes()[:100])
    done = CliRunner().invoke(app, ["pull", "opt:1", "--registry", reg])
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert f"opt/1/{registry.THETA_FILE} does not match its sha256" in done.stderr
    with pytest.raises(CorruptArtifactError, match=registry.THETA_FILE):
        registry.pull("opt:1", reg)
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
