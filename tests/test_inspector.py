"""`metaopt inspect` (metaopt/inspector.py): its probes recover what is known of hand-designed
optimizers (momentum's β, a clip threshold, Adam's scale invariance, SGD's constant rate), the
ablation of a learned optimizer's feature groups, and the command's report and refusals."""

from __future__ import annotations

import dataclasses
import json

import jax
import optax
import pytest
from typer.testing import CliRunner

from metaopt import inspector, optimizers
from metaopt.cli import app


def _tx(name, **hparams):
    return inspector._tx(optimizers.make(name, **hparams), {}, inspector.HORIZON)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_impulse_recovers_the_momentum_of_heavy_ball(beta):
    found = inspector.impulse(_tx("momentum", momentum=beta), jax.random.key(0))
    assert found["beta"] == pytest.approx(beta, abs=0.01)
    assert found["memory"] == pytest.approx(1 / (1 - beta), rel=0.03)  # Σ β^t over 40 steps


def test_sgd_is_linear_memoryless_scale_linear_and_its_rate_constant():
    tx = _tx("sgd", learning_rate=0.05)
    response = inspector.response(tx, jax.random.key(0))
    assert response["shape"] == "linear" and response["small_gradient_slope"] == pytest.approx(0.05, rel=1e-4)
    assert inspector.impulse(tx, jax.random.key(0))["beta"] == 0.0
    sgd = optimizers.make("sgd", learning_rate=0.05)
    assert inspector.scale_exponent(sgd, {}, jax.random.key(0))["exponent"] == pytest.approx(1.0, abs=1e-3)
    run = inspector.schedule(sgd, {}, jax.random.key(0), steps=40)
    assert run["constant"] and run["peak_rate"] == pytest.approx(0.05, rel=1e-4)


def test_adam_has_beta1_momentum_no_clip_and_is_scale_invariant():
    tx = _tx("adam")
    assert inspector.impulse(tx, jax.random.key(0))["beta"] == pytest.approx(0.9, abs=0.02)
    assert inspector.response(tx, jax.random.key(0))["shape"] not in ("clipped", "linear")
    assert abs(inspector.scale_exponent(optimizers.make("adam"), {}, jax.random.key(0))["exponent"]) < 0.01


@dataclasses.dataclass(frozen=True)
class ClippedSGD:
    """Per-coordinate clipped SGD: the truth for the clip probe."""

    clip: float
    learning_rate: float = 0.1
    name = "clipped_sgd"
    description = "test only"
    learned = False

    @property
    def hparams(self):
        return dataclasses.asdict(self)

    def as_optax(self, theta, num_steps):
        return optax.chain(optax.clip(self.clip), optax.sgd(self.learning_rate))


@pytest.mark.parametrize("clip", [0.3, 3.0])
def test_response_finds_a_clipped_sgds_threshold(clip):
    found = inspector.response(inspector._tx(ClippedSGD(clip), {}, 100), jax.random.key(0))
    assert found["shape"] == "clipped" and found["clip"] == pytest.approx(clip, rel=0.02)


def test_ablation_measures_each_feature_group_of_nominal_mlp_and_refuses_unknown_ones():
    opt = optimizers.make("nominal_mlp")
    theta = opt.init(jax.random.key(0))
    untrained = inspector.ablation(opt, theta, jax.random.key(1))
    assert set(untrained) == set(opt.feature_groups) and max(untrained.values()) < 1e-6  # θ₀: no learned part
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    trained = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape)
                                           for x, k in zip(leaves, keys, strict=True)])
    assert min(inspector.ablation(opt, trained, jax.random.key(1)).values()) > 1e-4
    with pytest.raises(ValueError, match="cannot ablate.*feature groups are"):
        opt.as_optax(theta, 10, ablate=("momentum",))
    assert inspector.ablation(optimizers.make("adam"), {}, jax.random.key(1)) is None


def test_a_curvature_optimizer_is_probed_on_the_training_run_only():
    result = inspector.inspect(optimizers.make("kfac"), {}, compare=False, run_steps=30)
    assert "per-layer statistics" in result["synthetic"] and "response" not in result
    assert len(result["schedule"]["effective_rate"]) == 30
    assert any("per-layer statistics" in line for line in inspector.summary(result))


def test_metaopt_inspect_writes_the_report_and_refuses_a_bad_ref(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "sgd", "--out", str(tmp_path / "sgd"), "--json"])
    assert result.exit_code == 0, result.output
    probes = json.loads(result.output.strip().splitlines()[-1])
    assert probes["response"]["shape"] == "linear" and probes["adam"]["impulse"]["beta"] > 0.8
    assert {p.name for p in (tmp_path / "sgd").iterdir()} == {"inspect.json", "inspect.md", "inspect.png"}
    assert "linear" in (tmp_path / "sgd" / "inspect.md").read_text()
    bad = runner.invoke(app, ["inspect", "no_such_optimizer", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "is not a registered optimizer" in bad.output
    assert not (tmp_path / "bad").exists()
