"""Every benchmark runs in its quick form and prints its figures as JSON (slow: `pytest -m slow`)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tests.jsonout import last_json

# The scripts with a quick form; the modules beside them that only hold parts of a benchmark have no
# __main__, and generalisation_curve.py evaluates a run that must exist first (tested below).
BENCHMARKS = sorted(p for p in (pathlib.Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
                    if "__main__" in p.read_text() and "--quick" in p.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_quick_json(script, tmp_path):
    done = subprocess.run([sys.executable, str(script), "--quick", "--json", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json(done.stdout)
    assert isinstance(result, dict) and result
    assert any(tmp_path.iterdir()), "nothing written to --out"
