"""Every benchmark runs in its quick form and prints its figures as JSON (slow: `pytest -m slow`),
and the figures each promises are there, finite and positive (`figure_problems`, tested fast)."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest

from tests.jsonout import last_json

# The scripts with a quick form; the modules beside them that only hold parts of a benchmark have no
# __main__, and generalisation_curve.py evaluates a run that must exist first (tested below).
BENCHMARKS = sorted(p for p in (pathlib.Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
                    if "__main__" in p.read_text() and "--quick" in p.read_text())

# Per script, the figures its docstring promises that must be finite and positive in any honest
# run: rates, ratios and counts of what was done. `*` is every item of a list or value of a dict
# (at least one), a number one item of a list. A figure renamed or dropped, or a NaN, fails the
# slow test.
PROMISED = {
    "chaos": ("fuzz_messages", "learner_kills", "resumes"),
    "chaos_fuzz": ("fuzz_messages",),
    "chaos_inputs": ("spec_cases", "artifact_cases"),
    "chaos_head": ("workers_before", "accepted_during_outage", "second_driver_attached", "accepted",
                   "outer_steps", "head_restart_s"),
    "chaos_learner": ("learner_kills", "resumes"),
    "chaos_load": ("streams", "accepted", "accepted_per_s", "outer_steps"),
    "chaos_nodes": ("node_kills", "workers_lost", "restarted_on_survivors", "placed_on_new_node",
                    "worker_incarnations", "accepted", "kill_to_first_restart_s", "join_to_its_worker_s"),
    "chaos_services": ("redis_outages", "object_store_outages"),
    "chaos_workers": ("worker_incarnations", "outer_steps_per_s_calm", "outer_steps_per_s_kills",
                      "throughput_kept"),
    "dmd_step": ("sizes.*.ms.adam", "sizes.*.ms.nominal_mlp", "sizes.*.dmd_over_without.*",
                 "truncations.*.ratio", "truncation_ratio_of_sums"),
    "estimator_commits": ("seconds_per_truncation.this", "seconds_per_truncation.other", "this_vs_other"),
    "estimators": ("problems.closed_form.reference_norm", "problems.quadratic.reference_norm",
                   "problems.*.estimators.*.relative_std"),
    "hand_designed": ("summary.*.tasks", "tasks.*.optimizers.*.step_time_ratio", "eval_elapsed_s"),
    "in_context_learning": ("runs.*.meta_training.outer_steps", "runs.*.meta_test.64",
                            "runs.*.training_tasks.64", "logistic_regression.*.accuracy"),
    "learner_ingest": ("ingest_ratio", "raw_grpc_mb_per_s", "learner_mb_per_s", "accepted_per_s"),
    "lopt_step": ("sizes.*.adam_ms", "sizes.*.small_fc_ms", "sizes.*.ratio"),
    "loss_vs_ce": ("meta_training.inner_steps", "learned_vs_cross_entropy.median_ratio",
                   "held_out.*.learned.cross_entropy", "held_out.*.cross_entropy.cross_entropy"),
    "meta_training": ("runs.*.estimates_per_s", "runs.*.inner_steps_per_s", "runs.*.outer_steps_per_s"),
    "pes_profile": ("peak_flops_per_s", "inner_step_ms", "parts.loss_and_grad.fraction_of_peak",
                    "parts.lopt_update.fraction_of_peak", "mlp_within_update.fraction_of_peak",
                    "step_over_floor"),
    "schedule_search": ("meta_training.inner_steps", "search.*.trials", "learned_vs.*.tasks"),
    "sparse": ("accuracy.*.accuracy", "storage.*.step_time_ratio", "storage.*.memory_ratio"),
    "torch_numerics": ("rows.*.worst", "rows.*.errors.*"),
    "torch_step": ("rows.*.seconds.adam", "rows.*.vs_adam.small_fc", "rows.*.vs_adam.nominal_mlp",
                   "rows.0.vs_adam.small_fc_compiled", "rows.0.vs_adam.nominal_mlp_compiled",  # 0: torch
                   "threshold.*.compiled_vs_eager"),
    "worker_throughput": ("rows.*.adam_steps_per_s", "rows.*.lopt_steps_per_s",
                          "rows.*.pes_inner_steps_per_s", "rows.*.estimates_per_s", "rows.*.pes_vs_adam"),
    "zoo": ("optimizers.*.ms_per_update", "optimizers.*.ratio_to_adam", "tasks.*.seconds_per_step"),
}

_MISSING = object()


def _values(node, keys: list[str], where: str):
    """(path, value) of every figure at `keys` under `node`; `_MISSING` where there is none."""
    if not keys:
        yield where, node
        return
    key, rest = keys[0], keys[1:]
    if key == "*":
        items = (list(node.items()) if isinstance(node, dict)
                 else list(enumerate(node)) if isinstance(node, list) else [])
        if not items:
            yield f"{where}.*", _MISSING
        for name, child in items:
            yield from _values(child, rest, f"{where}.{name}")
    elif isinstance(node, dict) and key in node:
        yield from _values(node[key], rest, f"{where}.{key}")
    elif isinstance(node, list) and key.isdigit() and int(key) < len(node):  # a list's item by index
        yield from _values(node[int(key)], rest, f"{where}.{key}")
    else:
        yield f"{where}.{key}", _MISSING


def figure_problems(result: dict, promised: tuple[str, ...]) -> list[str]:
    """What is wrong with the promised figures of `result`, one line each; empty if nothing."""
    problems = []
    for path in promised:
        for where, value in _values(result, path.split("."), ""):
            where = where.lstrip(".")
            if value is _MISSING:
                problems.append(f"{where}: missing")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"{where}: {value!r} is not a number")
            elif not math.isfinite(value) or value <= 0:
                problems.append(f"{where}: {value!r} is not finite and positive")
    return problems


def test_every_benchmark_promises_figures():
    assert {p.stem for p in BENCHMARKS} == set(PROMISED)


def test_honest_figures_pass():
    result = {"sizes": [{"adam_ms": 0.5, "small_fc_ms": 2.0, "ratio": 4.0}] * 3, "backend": "cpu"}
    assert figure_problems(result, PROMISED["lopt_step"]) == []


@pytest.mark.parametrize("planted, problem", [
    ({"ratio": float("nan")}, "sizes.1.ratio: nan is not finite and positive"),
    ({"ratio": float("inf")}, "sizes.1.ratio: inf is not finite and positive"),
    ({"ratio": 0.0}, "sizes.1.ratio: 0.0 is not finite and positive"),
    ({"ratio": None}, "sizes.1.ratio: None is not a number"),
    ({"ratio": True}, "sizes.1.ratio: True is not a number"),
    ({"ratio": "4.0"}, "sizes.1.ratio: '4.0' is not a number"),
])
def test_a_planted_bad_figure_is_rejected(planted, problem):
    row = {"adam_ms": 0.5, "small_fc_ms": 2.0, "ratio": 4.0}
    result = {"sizes": [row, row | planted, row]}
    assert figure_problems(result, PROMISED["lopt_step"]) == [problem]


def test_a_missing_figure_or_empty_list_is_rejected():
    renamed = {"sizes": [{"adam_ms": 0.5, "small_fc_ms": 2.0, "speedup": 4.0}]}
    assert figure_problems(renamed, PROMISED["lopt_step"]) == ["sizes.0.ratio: missing"]
    assert figure_problems({"sizes": []}, ("sizes.*.ratio",)) == ["sizes.*: missing"]
    assert figure_problems({}, ("problems.quadratic.reference_norm",)) == ["problems: missing"]


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_quick_json(script, tmp_path):
    done = subprocess.run([sys.executable, str(script), "--quick", "--json", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json(done.stdout)
    assert figure_problems(result, PROMISED[script.stem]) == [], f"{script.stem}: {result}"
    assert any(tmp_path.iterdir()), "nothing written to --out"
