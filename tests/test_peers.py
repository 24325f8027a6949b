"""benchmarks/peers/run.py, the peer harness, on its quick form: the report's shape, the
alternation of rounds, and the path without a peer checkout. The two runs of the whole harness
compile PES in three processes (minutes on 2 cores), so they are in the slow suite; the fast test
drives the same rounds and report with in-process fakes. The peer here is always a FAKE
(tests/fake_peer_side.py) that speaks the peer side's protocol and measures nothing; the real
peer, google/learned_optimization in its own pinned environment, is run by hand
(docs/performance.md)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from tests.jsonout import last_json

ROOT = pathlib.Path(__file__).resolve().parent.parent
HARNESS = ROOT / "benchmarks" / "peers" / "run.py"
FAKE_PEER = ROOT / "tests" / "fake_peer_side.py"
SHORT = ["--quick", "--json", "--rounds", "2", "--sizes", "10000", "--pes-seconds", "0.3"]


def _harness(*args: str, tmp_path: pathlib.Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, str(HARNESS), *SHORT, "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json(done.stdout)
    assert json.loads((tmp_path / "peers.json").read_text()) == report
    return report, done.stdout


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_order(report: dict, systems: tuple[str, ...]) -> None:
    """Each item runs on every system back to back; who goes first alternates by round."""
    items = ["pes_one_process", "pes_pinned", "step_10000"]
    expected = []
    for r in range(report["rounds"]):
        names = systems if r % 2 == 0 else systems[::-1]
        expected += [{"round": r, "system": s, "item": i} for i in items for s in names]
    assert report["order"] == expected
    for system in systems:
        assert all(len(report["per_round"][system][i]) == report["rounds"] for i in items)


class _FakeSystem:
    """Answers every measurement with fixed figures and logs the calls (names say it is fake)."""

    def __init__(self, name: str, rate: float, ms: dict, log: list):
        self.name, self.rate, self.ms, self.log = name, rate, ms, log

    def pes_one_process(self) -> float:
        self.log.append((self.name, "pes_one_process"))
        return self.rate

    def pes_pinned(self) -> float:
        self.log.append((self.name, "pes_pinned"))
        return 2 * self.rate

    def step_ms(self, n: int, repeats: int) -> dict:
        self.log.append((self.name, f"step_{n}"))
        return dict(self.ms)


def test_rounds_alternate_and_the_report_divides_the_right_figures_with_fake_systems():
    from benchmarks.peers import run

    log: list = []
    ours = {"small_fc": 1.0, "adafac_mlp": 2.0, "adam": 0.5}
    theirs = {"adafac_mlp": 3.0, "mlp": 4.0, "adam": 0.25}
    systems = {"metaopt": _FakeSystem("metaopt", 3000.0, ours, log),
               "peer": _FakeSystem("peer", 1000.0, theirs, log)}
    results, order = run._rounds(systems, (10000,), rounds=3, repeats=1)
    assert [(o["system"], o["item"]) for o in order] == log  # the order recorded is the order run
    report = {"rounds": 3, "order": order, "per_round": results}
    _check_order(report, ("metaopt", "peer"))
    report = run._report(results, order, {"measured": True}, (10000,), 3, True, 2)
    assert report["pes_ratio_one_process"] == 3.0 and report["pes_ratio_best_layout"] == 3.0
    assert report["step_ratio"]["10000"] == {"small_fc": 3.0, "adafac_mlp": 1.5, "adam": 0.5}
    alone = run._report({"metaopt": results["metaopt"]}, order, {"measured": False}, (10000,), 3, True, 2)
    assert alone["pes_ratio_one_process"] is None and alone["step_ratio"] is None


@pytest.mark.slow
def test_harness_quick_with_a_fake_peer(tmp_path):
    (tmp_path / "checkout" / "learned_optimization").mkdir(parents=True)  # the fake reads none of it
    report, out = _harness("--lo-src", str(tmp_path / "checkout"), "--peer-python", sys.executable,
                           "--peer-script", str(FAKE_PEER), tmp_path=tmp_path / "out")
    assert report["peer"]["measured"] is True and report["peer"]["fake"] is True
    assert report["rounds"] == 2 and report["cores"] >= 1
    for system in ("metaopt", "peer"):
        figures = report["pes_inner_steps_per_s"][system]
        assert _positive(figures["one_process"]) and _positive(figures["pinned"])
        assert figures["best_layout"] in ("one_process", "pinned")
    # The fake answers 1000/s per process: the ratios are metaopt's measured rate over it.
    assert report["pes_inner_steps_per_s"]["peer"]["pinned"] == 1000.0 * report["cores"]
    ours = report["pes_inner_steps_per_s"]["metaopt"]
    assert report["pes_ratio_one_process"] == ours["one_process"] / 1000.0
    assert _positive(report["pes_ratio_one_process"]) and _positive(report["pes_ratio_best_layout"])
    (row,) = report["steps"]
    assert row["size"] == 10000 and abs(row["n_params"] - 10000) <= 100
    assert set(row["metaopt_ms"]) == {"small_fc", "adafac_mlp", "adam"}
    assert set(row["peer_ms"]) == {"adafac_mlp", "mlp", "adam"}
    assert all(_positive(v) for v in (*row["metaopt_ms"].values(), *row["peer_ms"].values()))
    ratios = report["step_ratio"]["10000"]
    assert set(ratios) == {"small_fc", "adafac_mlp", "adam"} and all(_positive(v) for v in ratios.values())
    assert ratios["small_fc"] == row["peer_ms"]["adafac_mlp"] / row["metaopt_ms"]["small_fc"]
    _check_order(report, ("metaopt", "peer"))
    assert "metaopt / peer" in out


@pytest.mark.slow
def test_harness_without_a_checkout_says_the_peer_was_not_measured(tmp_path):
    report, out = _harness(tmp_path=tmp_path)
    assert report["peer"]["measured"] is False and "not measured" in report["peer"]["reason"]
    assert report["pes_ratio_one_process"] is None and report["pes_ratio_best_layout"] is None
    assert report["step_ratio"] is None
    assert set(report["pes_inner_steps_per_s"]) == {"metaopt"}
    assert all("peer_ms" not in row for row in report["steps"])
    assert _positive(report["pes_inner_steps_per_s"]["metaopt"]["pinned"])
    _check_order(report, ("metaopt",))
    assert "peer: not measured" in out


def test_harness_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    done = subprocess.run([sys.executable, str(HARNESS), "--quick", "--lo-src", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and "learned_optimization" in done.stderr
