"""benchmarks/generalisation_curve.py picks the checkpoints to evaluate from a run's own record:
for every mark, the newest checkpoint saved by then, each once, and always the last; and selects
the best trained one on the first suite by in-run evaluation's rule."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from generalisation_curve import checkpoints_by_minute, plot, select  # noqa: E402


def _run(tmp_path: pathlib.Path, step_minutes: dict[int, float], saved: list[int]) -> pathlib.Path:
    lines = [json.dumps({"kind": "outer_step", "step": s, "time": 1000.0 + 60 * m, "estimates": 1})
             for s, m in step_minutes.items()]
    lines.append(json.dumps({"kind": "eval", "outer_step": 3, "wins": 1}))  # other lines are skipped
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for step in saved:
        (tmp_path / "checkpoints" / f"ckpt-{step:09d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "not-a-checkpoint").mkdir(parents=True)
    return tmp_path


def test_the_newest_checkpoint_of_each_mark_once_and_the_last(tmp_path):
    minutes = {1: 0.0, 10: 4.0, 20: 9.0, 30: 14.0, 40: 21.0, 50: 26.0}
    run = _run(tmp_path, minutes, saved=[10, 20, 30, 40, 50])
    chosen = checkpoints_by_minute(run, every_minutes=10)
    # mark 10 -> step 20 (9 min), mark 20 -> step 30 (14 min), then the last (step 50, 26 min).
    assert [(m, p.name) for m, p in chosen] == [(9.0, "ckpt-000000020"), (14.0, "ckpt-000000030"),
                                                (26.0, "ckpt-000000050")]
    # Marks closer than checkpoints: each checkpoint still appears once.
    assert [p.name for _, p in checkpoints_by_minute(run, every_minutes=1)] == [
        f"ckpt-{s:09d}" for s in (10, 20, 30, 40, 50)]


def test_a_run_without_steps_or_checkpoints_is_refused_with_what_to_check(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="has no outer steps"):
        checkpoints_by_minute(tmp_path, 10)
    run = _run(tmp_path, {1: 0.0, 2: 1.0}, saved=[])
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        checkpoints_by_minute(run, 10)


def test_the_plot_is_written(tmp_path):
    records = [{"minutes": m, "suite": s, "win_share": w, "num_tasks": 4, "geomean_final_loss_ratio": r}
               for s in ("a", "b") for m, w, r in ((0, 0.25, 2.0), (10, 0.5, 0.9))]
    plot(records, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_the_best_trained_checkpoint_on_the_selection_suite_never_the_untrained_one():
    def rec(suite, step, wins, ratio):
        return {"suite": suite, "outer_step": step, "checkpoint": f"ck-{step}" if step else None,
                "minutes": step / 10, "wins": wins, "num_tasks": 8, "geomean_final_loss_ratio": ratio}

    records = [rec("in", 0, 8, 0.1),  # the untrained θ: best figures, but nothing to publish
               rec("in", 30, 8, 0.4), rec("in", 60, 8, 0.2), rec("in", 90, 7, 0.01),
               rec("other", 90, 9, 0.001)]  # another suite never chooses
    chosen = select(records, "in")
    assert (chosen["outer_step"], chosen["checkpoint"], chosen["wins"]) == (60, "ck-60", 8)
    assert chosen["evaluations"] == 4 and chosen["suite"] == "in" and "most wins" in chosen["rule"]
    assert select([rec("in", 0, 8, 0.1)], "in") is None
