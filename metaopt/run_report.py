"""A run's metrics.jsonl and its plot (RUN_DIR/meta_loss.png).

`metaopt train` writes one JSON line per outer step, {"kind": "outer_step", and the fields of
learner.core.OuterStep: step, meta_loss, family_losses, ...}, and with in-run evaluation one per
evaluation, {"kind": "eval", ...} (metaopt.inrun_eval). Lines written before lines had a kind
are outer steps. Read them with `read_metrics`, which keeps one kind (or `iter_metrics`, which
reads as it goes: a run of days has many lines). The file is the run's record: the learner
keeps only its last outer steps in memory, so plots and reports read this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

OUTER_STEP, EVAL = "outer_step", "eval"
ALL_FAMILIES = "all families"  # outer steps recorded before per-family losses were


def outer_step_line(record) -> str:
    """The metrics.jsonl line of an OuterStep."""
    return json.dumps({"kind": OUTER_STEP, **dataclasses.asdict(record)}) + "\n"


def read_metrics(path: str | pathlib.Path, kind: str = OUTER_STEP) -> list[dict[str, Any]]:
    """The lines of one kind of a metrics.jsonl, in order. A last line still being written (no
    closing brace yet) is left out."""
    return list(iter_metrics(path, kind))


def iter_metrics(path: str | pathlib.Path, kind: str = OUTER_STEP) -> Iterator[dict[str, Any]]:
    """`read_metrics`, one line at a time: the file is never held whole."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    with path.open() as lines:
        for line in lines:
            line = line.rstrip("\n")
            if line.endswith("}") and (row := json.loads(line)).get("kind", OUTER_STEP) == kind:
                yield row


def keep_outer_steps(path: str | pathlib.Path, through_step: int) -> int:
    """Keep a metrics.jsonl's outer steps up to `through_step`, in order, and drop every other
    line: a resumed run redoes the steps after its checkpoint and writes its evaluations anew.
    Copied line by line to a new file that then replaces the old. Returns the last step kept (0:
    none, or no file)."""
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    kept, last = path.with_name(path.name + ".resumed"), 0
    with kept.open("w") as sink:
        for row in iter_metrics(path):
            if row["step"] <= through_step:
                sink.write(json.dumps(row) + "\n")
                last = row["step"]
    os.replace(kept, path)
    return last


def running_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start), one per value."""
    values = np.asarray(values, np.float64)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def family_series(history: Iterable) -> dict[str, tuple[list[int], list[float]]]:
    """{task family: (outer steps, that family's mean meta-loss in each)} of OuterSteps (or their
    dicts, as `iter_metrics` reads them); steps recorded without per-family losses count under
    ALL_FAMILIES."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for h in history:
        h = h if isinstance(h, dict) else dataclasses.asdict(h)
        for family, loss in (h.get("family_losses") or {ALL_FAMILIES: h["meta_loss"]}).items():
            steps, losses = series.setdefault(family, ([], []))
            steps.append(h["step"])
            losses.append(loss)
    return series


def _log_scale_fits(values) -> bool:
    """Positive values that span a decade or more read best on a log axis."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    return values.size > 0 and bool(np.all(values > 0)) and values.max() / values.min() >= 10


def plot_metrics(metrics_path: str | pathlib.Path, path: pathlib.Path, title: str,
                 normalization: str = "initial") -> None:
    """`plot_run` of a run's metrics.jsonl: its outer steps and in-run evaluations."""
    plot_run(iter_metrics(metrics_path), read_metrics(metrics_path, EVAL), path, title, normalization)


def plot_run(history: Iterable, evaluations: Sequence[dict[str, Any]], path: pathlib.Path, title: str,
             normalization: str = "initial") -> None:
    """The run as a PNG: meta-loss per task family by outer step (each meta-batch's family mean,
    faint, and a running mean over ~5% of the family's points) and, with in-run `evaluations`, a
    second panel: wins on the suite and the geometric-mean final-loss ratio against its tuned
    baselines, at the outer step of each evaluated checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if evaluations else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 4 if rows == 1 else 7.5), sharex=True, squeeze=False)
    ax = axes[0][0]
    plotted = []
    for i, (family, (steps, losses)) in enumerate(sorted(family_series(history).items())):
        color = f"C{i % 10}"
        ax.plot(steps, losses, ".", ms=3, alpha=0.3, color=color)
        window = max(5, len(losses) // 20)
        ax.plot(steps, running_mean(losses, window), lw=2, color=color,
                label=f"{family} (running mean of {window})")
        plotted += losses
    ax.set(ylabel=f"meta-loss ({normalization})", title=title)
    if _log_scale_fits(plotted):  # "initial" and "none"; the "log" meta-loss is mostly negative
        ax.set_yscale("log")
    if plotted:
        ax.legend(fontsize=8, title="task family", title_fontsize=8)
    if evaluations:
        _plot_evaluations(axes[1][0], sorted(evaluations, key=lambda r: r["outer_step"]))
    axes[-1][0].set_xlabel("outer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_evaluations(ax, evaluations: list[dict[str, Any]]) -> None:
    from matplotlib.ticker import FuncFormatter

    last = evaluations[-1]
    steps = [r["outer_step"] for r in evaluations]
    ratios = [np.nan if r["geomean_final_loss_ratio"] is None else r["geomean_final_loss_ratio"]
              for r in evaluations]
    wins_line = ax.plot(steps, [r["wins"] for r in evaluations], "o-", color="C0", label="wins")
    ax.set_ylim(-0.3, last["num_tasks"] + 0.3)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"wins (of {last['num_tasks']} tasks)", color="C0")
    right = ax.twinx()
    ratio_line = right.plot(steps, ratios, "s--", color="C3", label="geomean final-loss ratio")
    right.axhline(1.0, color="C3", lw=0.7, ls=":")
    right.set_ylabel("final loss / tuned baseline (geomean)", color="C3")
    finite = [r for r in ratios if math.isfinite(r)]
    if finite and min(finite) > 0:  # a ratio reads on a log axis: 0.5 and 2 are as far from 1
        right.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        right.yaxis.set_major_formatter(plain)
        right.yaxis.set_minor_formatter(plain)
    seeds = len(last.get("seeds", []))
    baselines = ", ".join(last.get("baselines", [])) or "baselines"
    ax.set_title(f"in-run evaluation on {last['suite']} ({seeds} seed{'s' * (seeds != 1)}) "
                 f"vs tuned {baselines}; below 1: better", fontsize=10)
    lines = wins_line + ratio_line
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
