"""Datasets of training runs on the command line: `metaopt dataset export|list|inspect`.

A job whose spec has `record` leaves its workers' shards under ROOT/runs/JOB/dataset;
`export` verifies them and packages them with an index under ROOT/datasets/JOB (or --out).
ROOT is the job's storage root: `--root`, default runs (`metaopt train`'s default --out).
Exit codes as everywhere in `metaopt`: 0 success, 1 a damaged shard or a storage error, 2 bad
input (no such recording, a shard of another schema, an existing destination).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from metaopt import cli_registry

RootOption = Annotated[str, typer.Option("--root", help="The job's storage root: a path or fsspec URI.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]

dataset_app = typer.Typer(help="Datasets of training runs: export, list and inspect them.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")


def _run(action):
    """action(), with a dataset's errors turned into exit codes and messages as the registry's
    are; a destination that exists, or a recording that does not, is bad input (exit 2)."""

    def bad_paths_are_bad_input():
        try:
            return action()
        except (FileExistsError, FileNotFoundError) as err:
            raise ValueError(str(err)) from None

    return cli_registry._run(bad_paths_are_bad_input)


@dataset_app.command("export")
def export(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="The job whose workers recorded runs.")],
    root: RootOption = "runs",
    out: Annotated[str | None, typer.Option(
        "--out", help="Where to write it (default ROOT/datasets/JOB).")] = None,
    as_json: AsJson = False,
) -> None:
    """Verify every shard a job recorded and package them, with an index, as a dataset."""
    from metaopt import datasets
    from metaopt.jobspec import check_job_id

    _run(lambda: check_job_id(job_id))
    dest = out or datasets.export_uri(root, job_id)
    index = _run(lambda: datasets.export(datasets.recording_uri(root, job_id), dest))
    if as_json:
        typer.echo(json.dumps({"uri": dest, **index}))
        return
    typer.echo(f"exported {index['records']} records in {len(index['shards'])} shards to {dest}")


@dataset_app.command("list")
def list_(root: RootOption = "runs", as_json: AsJson = False) -> None:
    """The exported datasets and the jobs' recordings under a storage root."""
    from metaopt import datasets

    rows = _run(lambda: datasets.list_datasets(root))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no datasets or recordings under {root}", err=True)
        return
    for r in rows:
        typer.echo(f"{r['kind']:<9}  {r['name']}  {r['shards']} shards  {r['uri']}")


@dataset_app.command("inspect")
def inspect_(
    uri: Annotated[str, typer.Argument(
        help="An exported dataset or a job's recording (ROOT/runs/JOB/dataset).")],
    as_json: AsJson = False,
) -> None:
    """Read and verify every shard; print what the dataset holds."""
    from metaopt import datasets

    def read():
        fs, path = datasets.storage.fresh_fs(uri)
        if fs.exists(f"{path.rstrip('/')}/{datasets.INDEX_FILE}"):
            datasets.load_index(uri)  # an exported dataset: its index must match its shards
        return datasets.summary(uri)

    info = _run(read)
    if as_json:
        typer.echo(json.dumps(info))
        return
    for key, value in info.items():
        typer.echo(f"{key:<18} {value}")
