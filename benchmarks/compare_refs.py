"""Optimizers side by side on suites, against one cache of tuned baselines: every REF (an optimizer
name, a registry reference with --registry, or a learner checkpoint directory) is evaluated on
every suite by `metaopt eval`'s protocol, and one table per suite shows each REF's wins, its
geometric-mean final-loss ratio to the best tuned baseline of each task (the suite's baselines,
tuned Adam in the shipped ones, or `--baselines`) and its ratio on every task; its last row names
that baseline.

    python benchmarks/compare_refs.py REF [REF ...] --suites a,b [--label REF=NAME ...]
        [--baselines adam,adam_cosine] [--registry DIR] [--baseline-cache DIR] [--out DIR] [--json]

Writes OUT/comparison.json ({"suites", "refs", "baselines", "results": [{"ref", "label", "suite",
"wins", "num_tasks", "geomean_final_loss_ratio", "diverged_runs", "final_loss_ratio": {task: ratio},
"best_baseline": {task: name}, "final_train_loss": {task: {"ref" | baseline: loss}},
"tuned_hparams": {task: {baseline: hparams}}}]}) and every evaluation's full report in OUT/reports/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from metaopt import evaluation, publishing
from metaopt.inrun_eval import checkpoint_ref


def resolve(ref: str, registry: str | None) -> evaluation.OptimizerRef:
    """A checkpoint directory's θ (named JOB@step-N), else `metaopt eval`'s resolution of REF."""
    if pathlib.Path(ref).is_dir():
        checkpoint = publishing.find_checkpoint(ref)
        return checkpoint_ref(checkpoint, checkpoint.meta.get("job_id", "checkpoint"))
    return evaluation.resolve_ref(ref, registry)


def table(rows: list[dict]) -> str:
    """A Markdown table of one suite: a row per REF, a column per task, and a last row naming each
    task's best tuned baseline (the one the ratios are to)."""
    tasks = list(rows[0]["final_loss_ratio"])
    lines = ["| optimizer | wins | geomean | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 3)]
    for r in rows:
        cells = [f"**{v:.3g}×**" if v < 1 else f"{v:.3g}×" for v in r["final_loss_ratio"].values()]
        head = f"| {r['label']} | {r['wins']}/{r['num_tasks']} | {r['geomean_final_loss_ratio']:.3g}× | "
        lines.append(head + " | ".join(cells) + " |")
    best = rows[-1]["best_baseline"]
    lines.append("| best tuned baseline | | | " + " | ".join(best[t] for t in tasks) + " |")
    return "\n".join(lines)


def summarise(result: dict, label: str) -> dict:
    """One evaluation's row of comparison.json: REF's wins and ratios, and per task every
    optimizer's final training loss and the hyperparameters each baseline was tuned to."""
    a, tasks = result["aggregate"], result["tasks"]
    ran = {t["name"]: {b: r for b, r in t["baselines"].items() if "refused" not in r} for t in tasks}
    return {"ref": result["ref"], "label": label, "suite": result["suite"],
            "wins": a["wins"], "num_tasks": a["num_tasks"],
            "geomean_final_loss_ratio": a["geomean_final_loss_ratio"],
            "diverged_runs": a["diverged_runs"]["ref"],
            "final_loss_ratio": {t["name"]: t["final_loss_ratio"] for t in tasks},
            "best_baseline": {t["name"]: t["best_baseline"] for t in tasks},
            "final_train_loss": {t["name"]: {"ref": t["ref"]["final_train_loss"],
                                             **{b: r["final_train_loss"] for b, r in ran[t["name"]].items()}}
                                 for t in tasks},
            "tuned_hparams": {name: {b: r["hparams"] for b, r in runs.items()} for name, runs in ran.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("refs", nargs="+")
    ap.add_argument("--suites", required=True, help="comma-separated suite names or YAML files")
    ap.add_argument("--label", action="append", default=[], help="REF=NAME: the name REF has in the tables")
    ap.add_argument("--baselines", default=None,
                    help="comma-separated tuned baselines (default: each suite's)")
    ap.add_argument("--registry", default=None)
    ap.add_argument("--baseline-cache", type=pathlib.Path, default=None)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("comparison"))
    ap.add_argument("--json", action="store_true", help="print one JSON line with every result")
    args = ap.parse_args(argv)
    labels = dict(item.split("=", 1) for item in args.label)
    suites = [evaluation.load_suite(s) for s in args.suites.split(",")]
    baselines = None if args.baselines is None else evaluation.check_baselines(args.baselines)
    refs = [(ref, resolve(ref, args.registry)) for ref in args.refs]  # every REF checked before any run
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.baseline_cache or args.out / "baselines"
    results = []
    for suite in suites:
        for i, (given, ref) in enumerate(refs):
            result = evaluation.evaluate(ref, suite, baselines=baselines, progress=False,
                                         baseline_cache=cache)
            evaluation.write_report(result, args.out / "reports" / f"{i}-{suite.name}")
            results.append(summarise(result, labels.get(given, ref.ref)))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    summary = {"suites": [s.name for s in suites], "refs": args.refs, "baselines": baselines,
               "results": results}
    (args.out / "comparison.json").write_text(json.dumps(summary, indent=1))
    for suite in suites:
        print(f"\n{suite.name}:\n\n" + table([r for r in results if r["suite"] == suite.name]))
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
