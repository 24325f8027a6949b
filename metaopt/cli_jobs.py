"""`metaopt submit | status | logs | cancel | list-jobs`: jobs on a Ray cluster."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Annotated

import typer

from metaopt.submit import DEFAULT_ADDRESS, SubmitError

Address = Annotated[str, typer.Option(
    "--address", envvar="RAY_ADDRESS", help="The Ray dashboard, as for `ray job`.")]
JobStore = Annotated[str | None, typer.Option(
    "--job-store", envvar="METAOPT_JOB_STORE",
    help="redis://USER@HOST:PORT/DB of the jobs' records (password: $METAOPT_REDIS_PASSWORD).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _address(address: str) -> str:
    if not address.startswith(("http://", "https://")):
        _fail(f"--address must be the Ray dashboard's http:// address, like {DEFAULT_ADDRESS}; "
              f"got {address!r}", code=2)
    return address


def register(app: typer.Typer) -> None:
    """Add the job verbs to the `metaopt` command line."""

    @app.command()
    def submit(
        config: Annotated[pathlib.Path, typer.Argument(help="Job spec YAML, as for `metaopt train`.")],
        address: Address = DEFAULT_ADDRESS,
        job_id: Annotated[str | None, typer.Option(
            "--job-id", help="Job id (default: NAME-TIMESTAMP); an existing one resumes from its checkpoint.")
        ] = None,
        max_outer_steps: Annotated[int | None, typer.Option(
            "--max-outer-steps", min=1, help="Override stop.max_outer_steps.")] = None,
        as_json: AsJson = False,
    ) -> None:
        """Submit a meta-training job to a Ray cluster; prints its id at once."""
        from metaopt import submit as jobs
        from metaopt.jobspec import JobSpecError, load_job_spec
        from metaopt.train import new_job_id

        try:
            spec = load_job_spec(config)
            if max_outer_steps is not None:
                spec = spec.with_overrides(**{"stop.max_outer_steps": max_outer_steps})
        except JobSpecError as err:
            _fail(str(err), code=2)
        job_id = job_id or new_job_id(spec)
        try:
            jobs.submit(spec, _address(address), job_id)
        except SubmitError as err:
            _fail(str(err))
        typer.echo(json.dumps({"job_id": job_id, "address": address}) if as_json else job_id)
        if not as_json:
            typer.echo(f"follow it: metaopt status {job_id}; metaopt logs {job_id} --follow", err=True)

    @app.command()
    def status(
        job_id: Annotated[str | None, typer.Argument(help="Job id (default: the newest job).")] = None,
        address: Address = DEFAULT_ADDRESS,
        job_store: JobStore = None,
        as_json: AsJson = False,
    ) -> None:
        """A job's state on the cluster and, with a job store, its progress."""
        from metaopt import submit as jobs

        try:
            job_id = job_id or jobs.latest_job(_address(address))
            row = jobs.job_info(_address(address), job_id)
        except SubmitError as err:
            _fail(str(err))
        record = _record(job_store, job_id)
        typer.echo(json.dumps({**row, "record": record}) if as_json else jobs.describe(row, record))

    @app.command()
    def logs(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        address: Address = DEFAULT_ADDRESS,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="Print until the job ends.")] = False,
    ) -> None:
        """The job's output (the learner's log and final summary)."""
        from metaopt import submit as jobs

        try:
            for text in jobs.logs(_address(address), job_id, follow):
                typer.echo(text, nl=False)
        except SubmitError as err:
            _fail(str(err))

    @app.command()
    def cancel(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        address: Address = DEFAULT_ADDRESS,
    ) -> None:
        """Stop a job; it writes a final checkpoint, so `metaopt submit --job-id` resumes it."""
        from metaopt import submit as jobs

        try:
            stopped = jobs.cancel(_address(address), job_id)
        except SubmitError as err:
            _fail(str(err))
        typer.echo(f"job {job_id}: " + ("stopping" if stopped else "had already ended"))

    @app.command("list-jobs")
    def list_jobs(address: Address = DEFAULT_ADDRESS, as_json: AsJson = False) -> None:
        """The cluster's jobs, newest first."""
        from metaopt import submit as jobs

        try:
            rows = jobs.list_jobs(_address(address))
        except SubmitError as err:
            _fail(str(err))
        if as_json:
            typer.echo(json.dumps(rows))
            return
        for r in rows:
            typer.echo(f"{r['job_id']:<40} {r['status']:<10} {r['message'] or ''}")


def _record(url: str | None, job_id: str) -> dict | None:
    """The job store's record of the job, or None without a store; a store that cannot be read
    is reported but does not hide Ray's answer."""
    if not url:
        return None
    from metaopt.jobstore import JobStoreError, open_job_store

    try:
        return open_job_store(url, os.environ.get("METAOPT_JOB_STORE_PREFIX", "metaopt")).get(job_id)
    except JobStoreError as err:
        typer.echo(f"warning: cannot read the job store: {err}", err=True)
        return None
