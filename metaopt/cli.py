"""The `metaopt` command line. Exit codes: 0 success, 1 failure, 2 bad input."""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from typing import Annotated

import typer

app = typer.Typer(
    help="Meta-train learned optimizers and use the trained ones.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def train(
    config: Annotated[pathlib.Path, typer.Argument(help="Job spec YAML, e.g. examples/quickstart.yaml.")],
    max_outer_steps: Annotated[
        int | None, typer.Option("--max-outer-steps", min=1, help="Override stop.max_outer_steps.")
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option("--max-minutes", min=0.001, help="Override stop.max_minutes (wall clock).")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Override workers.count.")] = None,
    out: Annotated[pathlib.Path, typer.Option("--out", help="Root for run directories and the registry.")] = (
        pathlib.Path("runs")
    ),
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Job id; an existing one resumes from its last checkpoint.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary line at the end.")] = False,
) -> None:
    """Meta-train locally: learner, Ray workers, checkpoints, registry, all on this machine."""
    from metaopt.jobspec import JobSpecError, load_job_spec

    try:
        spec = load_job_spec(config)
        overrides = {"stop.max_outer_steps": max_outer_steps, "stop.max_minutes": max_minutes,
                     "workers.count": workers}
        spec = spec.with_overrides(**{k: v for k, v in overrides.items() if v is not None})
    except JobSpecError as err:
        _fail(str(err))
    from metaopt.train import WorkerFailed, new_job_id
    from metaopt.train import train as run_training

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    show_progress = sys.stderr.isatty() or not as_json
    job_id = job_id or new_job_id(spec)
    try:
        result = run_training(spec, out=str(out), job_id=job_id, progress=show_progress)
    except (WorkerFailed, ValueError, OSError) as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        _fail(f"interrupted; the last checkpoint is kept: resume with --job-id {job_id}", code=130)
    if as_json:
        typer.echo(json.dumps(result.summary()))
    else:
        typer.echo(
            f"job {result.job_id}: {result.outer_steps} outer steps, meta-loss "
            f"{result.meta_loss_first:.4g} -> {result.meta_loss_last:.4g}\n"
            f"run directory: {result.run_dir} (metrics.jsonl, meta_loss.png)\n"
            f"trained optimizer: {result.artifact} in {result.registry}\n"
            f"use it: metaopt.load({result.artifact!r}, registry={result.registry!r})"
            ".as_optax(num_steps=1000)"
        )


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@ALIAS (default: newest).")],
    registry_uri: Annotated[str, typer.Option("--registry", help="Registry root: a path or fsspec URI.")],
    dest: Annotated[
        pathlib.Path | None, typer.Option("--dest", help="Local directory (default: the cache).")
    ] = None,
) -> None:
    """Copy a trained optimizer out of a registry, verifying the sha256 of every file."""
    from metaopt import registry
    from metaopt.storage import CorruptArtifactError

    try:
        path = registry.pull(ref, registry_uri, str(dest) if dest else None)
    except (CorruptArtifactError, OSError) as err:
        _fail(str(err), code=1)
    except (ValueError, LookupError) as err:
        _fail(str(err))
    typer.echo(path)


@app.command("eval")
def eval_(
    ref: Annotated[
        str, typer.Argument(help="A registry ref NAME[:VERSION] (with --registry) or an optimizer name.")
    ],
    suite: Annotated[
        str, typer.Option("--suite", help="Suite name (smoke, in_distribution, ...) or YAML path.")
    ],
    seeds: Annotated[
        int | None, typer.Option("--seeds", min=1, help="Evaluate on the first K seeds of the suite.")
    ] = None,
    out: Annotated[
        pathlib.Path | None, typer.Option("--out", help="Report directory (default: runs/eval/REF-SUITE).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary line at the end.")] = False,
    registry_uri: Annotated[
        str | None, typer.Option("--registry", help="Registry root for a registry ref: a path or fsspec URI.")
    ] = None,
    baselines: Annotated[
        str | None,
        typer.Option("--baselines", help="Comma-separated tuned baselines (default: the suite's)."),
    ] = None,
    trials: Annotated[
        int | None, typer.Option("--trials", min=1, help="Random-search trials per baseline per task.")
    ] = None,
) -> None:
    """Evaluate an optimizer on a task suite against tuned baselines; writes JSON and plots."""
    from metaopt import evaluation

    try:
        spec = evaluation.load_suite(suite)
        seed_list = None
        if seeds is not None:
            seed_list = list(spec.seeds[:seeds])
            if len(seed_list) < seeds:  # more seeds than the suite lists: continue past its largest
                extra = (s for s in range(max(spec.seeds) + 1, 2**31) if s != spec.tuning_seed)
                seed_list += [next(extra) for _ in range(seeds - len(seed_list))]
        base_list = evaluation.check_baselines(baselines) if baselines is not None else None
        evaluation.resolve_ref(ref, registry_uri)  # bad input fails here, before any training
    except evaluation.EvalInputError as err:
        _fail(str(err))
    show_progress = sys.stderr.isatty() or not as_json
    try:
        result = evaluation.evaluate(ref, spec, registry=registry_uri, seeds=seed_list, baselines=base_list,
                                     trials=trials, progress=show_progress)
    except evaluation.EvalInputError as err:
        _fail(str(err))
    except (ValueError, OSError) as err:
        _fail(str(err), code=1)
    out_dir = out or pathlib.Path("runs") / "eval" / f"{ref.replace(':', '_').replace('/', '_')}-{spec.name}"
    try:
        written = evaluation.write_report(result, out_dir)
    except OSError as err:
        _fail(f"cannot write the report to {out_dir}: {err}", code=1)
    if not as_json:
        typer.echo(evaluation.format_table(result))
        typer.echo(f"report: {written['json']}, plots in {out_dir} (summary.png, tasks/*.png)")
        return
    typer.echo(json.dumps({"ref": result["ref"], "suite": result["suite"], "seeds": result["seeds"],
                           "baselines": result["baselines"], **result["aggregate"], "out": str(out_dir)}))


list_app = typer.Typer(help="List what the registries hold.", no_args_is_help=True)
app.add_typer(list_app, name="list")


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rows))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        learned = r.get("kind") == "learned"
        extra = f" [learned, {r['meta_parameters']} meta-parameters]" if learned else ""
        typer.echo(f"{r['name']:<{width}}  {r['description']}{extra}")


@list_app.command("tasks")
def list_tasks(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False) -> None:
    """Task families: `metaopt list tasks [--json]`."""
    import task_zoo

    _print_rows([{"name": n, "description": task_zoo.family(n).description} for n in task_zoo.families()],
                as_json)


@list_app.command("optimizers")
def list_optimizers(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """Optimizers, learned and hand-designed: `metaopt list optimizers [--json]`."""
    import jax

    from metaopt import optimizers

    rows = []
    for name in optimizers.names():
        opt = optimizers.make(name)
        theta = opt.init(jax.random.key(0))
        rows.append({
            "name": name, "description": opt.description,
            "kind": "learned" if opt.learned else "hand-designed",
            "meta_parameters": int(sum(x.size for x in jax.tree.leaves(theta))),
        })
    _print_rows(rows, as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
