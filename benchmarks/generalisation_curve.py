"""How much meta-training generalisation costs: a run's saved checkpoints evaluated afterwards on
several suites, wins and geometric-mean final-loss ratio against minutes of meta-training.

Minute 0 is the untrained θ (the optimizer's `init` at the job's seed, as the learner starts);
then, for every `--every-minutes`, the newest checkpoint saved by then (minutes counted from the
run's first outer step in metrics.jsonl). Every point is a full `metaopt eval` of that θ
(the suites' seeds, tuned Adam as the baseline); baselines are tuned once and kept in
`--baseline-cache`. Keep the run's checkpoints (`checkpoints_kept` in the job spec): the
default keeps only the newest three.

    python benchmarks/generalisation_curve.py RUN_DIR [--suites a,b] [--every-minutes 10]
        [--seeds N] [--out DIR] [--baseline-cache DIR] [--json]

`--seeds N` evaluates on seeds 0..N-1 instead of each suite's own (the design suite lists one).

Writes OUT/curve.json (one record per point and suite), OUT/curve.png, every point's full
`metaopt eval` report in OUT/reports/POINT-SUITE/, and OUT/selection.json: the best trained
checkpoint on the FIRST suite by in-run evaluation's rule (most wins, then the lowest geometric-mean
ratio), what `publishing.publish_checkpoint(..., selection=...)` records when a run's best
checkpoint is published instead of its last. Choose on a suite you then do not report on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

from metaopt import evaluation, optimizers, publishing
from metaopt.inrun_eval import SELECTION_RULE, best_evaluation, checkpoint_ref
from metaopt.run_report import read_metrics
from metaopt.storage import CHECKPOINT_DIR_RE

DEFAULT_SUITES = "in_distribution,out_of_distribution,long_horizon,shifted"


def checkpoints_by_minute(run_dir: pathlib.Path, every_minutes: float) -> list[tuple[float, pathlib.Path]]:
    """[(minutes, checkpoint dir)]: for every multiple of `every_minutes`, the newest checkpoint
    whose step was reached by then, and the last checkpoint; each checkpoint once."""
    steps = read_metrics(run_dir / "metrics.jsonl", "outer_step")
    if not steps:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no outer steps: is {run_dir} a run directory?")
    start = steps[0]["time"]
    minute_of = {s["step"]: (s["time"] - start) / 60 for s in steps}
    folder = run_dir / "checkpoints"
    saved = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else ())
                   if (m := CHECKPOINT_DIR_RE.fullmatch(p.name)) and int(m.group(1)) in minute_of)
    if not saved:
        raise SystemExit(f"{run_dir}/checkpoints holds no checkpoint of a step in metrics.jsonl")
    chosen: dict[int, tuple[float, pathlib.Path]] = {}
    end, mark = minute_of[saved[-1][0]], every_minutes
    while mark < end:
        before = [(s, p) for s, p in saved if minute_of[s] <= mark]
        if before:
            chosen.setdefault(before[-1][0], (minute_of[before[-1][0]], before[-1][1]))
        mark += every_minutes
    chosen.setdefault(saved[-1][0], (end, saved[-1][1]))
    return [chosen[s] for s in sorted(chosen)]


def untrained_ref(run_dir: pathlib.Path) -> evaluation.OptimizerRef:
    """θ₀ of the run: its optimizer's init at the job's seed, as the learner starts from."""
    spec = json.loads((run_dir / "job.json").read_text())
    opt_spec = spec["optimizer"]
    opt = optimizers.make(opt_spec["name"], **opt_spec.get("hparams", {}))
    theta = jax.tree.map(jnp.asarray, opt.init(jax.random.key(int(spec.get("seed", 0)))))
    return evaluation.OptimizerRef(f"{run_dir.name}@untrained", "builtin-learned", opt.name,
                                   dict(opt.hparams), theta, {"theta": "init(job seed)"})


def plot(records: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wins_ax, ratio_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, suite in enumerate(dict.fromkeys(r["suite"] for r in records)):
        rows = [r for r in records if r["suite"] == suite]
        minutes = [r["minutes"] for r in rows]
        wins_ax.plot(minutes, [r["win_share"] for r in rows], "o-", color=f"C{i}",
                     label=f"{suite} ({rows[0]['num_tasks']} tasks)")
        ratios = [r["geomean_final_loss_ratio"] for r in rows]
        ratio_ax.plot(minutes, ratios, "o-", color=f"C{i}", label=suite)
    wins_ax.set(xlabel="minutes of meta-training", ylabel="share of tasks won vs tuned Adam",
                ylim=(-0.05, 1.05))
    wins_ax.axhline(0.5, color="gray", lw=0.6, ls=":")
    ratio_ax.set(xlabel="minutes of meta-training", ylabel="final train loss / tuned Adam's (geomean)",
                 yscale="log")
    ratio_ax.axhline(1.0, color="black", lw=0.8)
    wins_ax.legend(fontsize=8)
    ratio_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def select(records: list[dict], suite: str) -> dict | None:
    """The best trained checkpoint on `suite` (in-run evaluation's rule), as a provenance record."""
    best = best_evaluation([r for r in records if r["suite"] == suite and r["outer_step"] > 0])
    if best is None:
        return None
    keys = ("suite", "outer_step", "checkpoint", "minutes", "wins", "num_tasks", "geomean_final_loss_ratio")
    return {"rule": SELECTION_RULE, **{k: best[k] for k in keys},
            "evaluations": sum(r["suite"] == suite for r in records)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=pathlib.Path)
    ap.add_argument("--suites", default=DEFAULT_SUITES)
    ap.add_argument("--every-minutes", type=float, default=10.0)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--baseline-cache", type=pathlib.Path, default=None)
    ap.add_argument("--seeds", type=int, default=None, help="evaluate on seeds 0..N-1, not the suites' own")
    ap.add_argument("--json", action="store_true", help="print one JSON line with every record")
    args = ap.parse_args(argv)
    out = args.out or args.run_dir / "generalisation"
    out.mkdir(parents=True, exist_ok=True)
    cache = args.baseline_cache or out / "baselines"
    suites = [evaluation.load_suite(s) for s in args.suites.split(",")]
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds needs at least 1, got {args.seeds}")
        suites = [dataclasses.replace(s, seeds=tuple(range(args.seeds))) for s in suites]
    points = [(0.0, untrained_ref(args.run_dir), None)]
    for minutes, path in checkpoints_by_minute(args.run_dir, args.every_minutes):
        checkpoint = publishing.find_checkpoint(str(path))
        points.append((minutes, checkpoint_ref(checkpoint, args.run_dir.name), checkpoint))
    records = []
    for minutes, ref, checkpoint in points:
        for suite in suites:
            result = evaluation.evaluate(ref, suite, progress=False, baseline_cache=cache)
            evaluation.write_report(result, out / "reports" / f"{ref.ref.split('@')[-1]}-{suite.name}")
            a = result["aggregate"]
            records.append({"minutes": round(minutes, 2), "ref": ref.ref, "suite": suite.name,
                            "wins": a["wins"], "num_tasks": a["num_tasks"], "win_share": a["win_rate"],
                            "geomean_final_loss_ratio": a["geomean_final_loss_ratio"],
                            "diverged_runs": a["diverged_runs"]["ref"],
                            "outer_step": checkpoint.step if checkpoint else 0,
                            "checkpoint": checkpoint.uri if checkpoint else None})
            print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    (out / "curve.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "curve.png", f"{args.run_dir.name}: generalisation against meta-training time")
    selection = select(records, suites[0].name)
    (out / "selection.json").write_text(json.dumps(selection, indent=1))
    summary = {"run": str(args.run_dir), "out": str(out), "records": records, "selection": selection}
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
