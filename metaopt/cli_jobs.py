"""`metaopt submit | status | logs | cancel | list-jobs`: jobs on a Ray cluster."""

from __future__ import annotations

import json
import pathlib
from typing import Annotated

import typer

from metaopt.extras import MissingExtraError, require

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # Ray's dashboard on this machine, as for `ray job`

Address = Annotated[str, typer.Option(
    "--address", envvar="RAY_ADDRESS", help="The Ray dashboard, as for `ray job`.")]
JobStoreUrl = Annotated[str | None, typer.Option(
    "--job-store", envvar="METAOPT_JOB_STORE",
    help="redis://USER@HOST:PORT/DB of the jobs' records (password: $METAOPT_REDIS_PASSWORD).")]
JobStorePrefix = Annotated[str, typer.Option(
    "--job-store-prefix", envvar="METAOPT_JOB_STORE_PREFIX", help="The job spec's storage.job_store_prefix.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _address(address: str) -> str:
    if not address.startswith(("http://", "https://")):
        _fail(f"--address must be the Ray dashboard's http:// address, like {DEFAULT_ADDRESS}; "
              f"got {address!r}", code=2)
    return address


def _jobs(verb: str):
    """metaopt.submit; exits 1 naming the extra to install where this environment lacks it."""
    try:
        require("service", f"`metaopt {verb}`")
    except MissingExtraError as err:
        _fail(str(err))
    from metaopt import submit

    return submit


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
        k8s: Annotated[bool, typer.Option(
            "--k8s", help="Create a KubeRay RayJob with the kubernetes client instead (kubeconfig or "
            "in-cluster config).")] = False,
        image: Annotated[str | None, typer.Option("--image", help="--k8s: the metaopt image.")] = None,
        namespace: Annotated[str, typer.Option("--namespace", help="--k8s: the namespace.")] = "default",
        cluster: Annotated[str | None, typer.Option(
            "--cluster", help="--k8s: run on this existing RayCluster (default: the RayJob's own).")] = None,
        env_secret: Annotated[list[str] | None, typer.Option(
            "--env-secret", help="--k8s: a Secret whose keys become the pods' environment (repeatable).")
        ] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="--k8s: print the RayJob as YAML and create nothing.")] = False,
        as_json: AsJson = False,
    ) -> None:
        """Submit a job to a Ray cluster (or, with --k8s, as a KubeRay RayJob); prints its id at once."""
        jobs = _jobs("submit")
        from metaopt.jobspec import JobSpecError, check_job_id, check_runnable, load_job_spec
        from metaopt.train import new_job_id

        try:
            spec = load_job_spec(config)
            if max_outer_steps is not None:
                spec = spec.with_overrides(**{"stop.max_outer_steps": max_outer_steps})
            job_id = check_job_id(job_id) if job_id is not None else new_job_id(spec)
            check_runnable(spec)
        except JobSpecError as err:
            _fail(str(err), code=2)
        if k8s:
            _submit_k8s(spec, job_id, image, namespace, cluster, tuple(env_secret or ()), dry_run)
            return
        try:
            submission_id = jobs.submit(spec, _address(address), job_id)
        except jobs.SubmitError as err:
            _fail(str(err))
        if as_json:
            typer.echo(json.dumps({"job_id": job_id, "submission_id": submission_id, "address": address}))
            return
        typer.echo(job_id)
        resumed = submission_id != job_id
        again = f" as {submission_id}, resuming from the last checkpoint" if resumed else ""
        typer.echo(f"submitted{again}; follow it: metaopt status {job_id}; metaopt logs {job_id} --follow",
                   err=True)

    @app.command("upload-plugins")
    def upload_plugins(
        config: Annotated[pathlib.Path, typer.Argument(help="Job spec YAML naming plugins.")],
    ) -> None:
        """Upload a job's plugins to its storage.root as one bundle and print its URI: the Helm chart's
        job.plugins, and `--plugins` of serve-learner and workers."""
        _jobs("upload-plugins")
        from metaopt.jobspec import JobSpecError, check_runnable, load_job_spec

        try:
            spec = load_job_spec(config)
            check_runnable(spec)
        except JobSpecError as err:
            _fail(str(err), code=2)
        if not spec.plugins or not spec.storage.root:
            _fail("nothing to upload: the job names no plugins" if not spec.plugins else
                  "the plugins travel through the job's object storage: set storage.root", code=2)
        typer.echo(_upload_plugins(spec))

    @app.command()
    def status(
        job_id: Annotated[str | None, typer.Argument(help="Job id (default: the newest job).")] = None,
        address: Address = DEFAULT_ADDRESS,
        job_store: JobStoreUrl = None,
        job_store_prefix: JobStorePrefix = "metaopt",
        as_json: AsJson = False,
    ) -> None:
        """A job's state on the cluster and, with a job store, its progress."""
        jobs = _jobs("status")

        try:
            row = jobs.job_info(_address(address), job_id)
        except jobs.SubmitError as err:
            # A job Ray does not know (one the Helm chart runs, or a cluster out of reach) may
            # still have a record in the job store.
            record = _read_record(job_store, job_store_prefix, job_id) if job_id else None
            if record is None:
                _fail(str(err))
            row = {"job_id": job_id, "submission_id": job_id, "status": "UNKNOWN TO RAY", "message": None}
        else:
            record = _read_record(job_store, job_store_prefix, row["job_id"])
        typer.echo(json.dumps({**row, "record": record}) if as_json else jobs.describe(row, record))

    @app.command()
    def logs(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        address: Address = DEFAULT_ADDRESS,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="Print until the job ends.")] = False,
    ) -> None:
        """The job's output (the learner's log and final summary)."""
        jobs = _jobs("logs")

        try:
            for text in jobs.logs(_address(address), job_id, follow):
                typer.echo(text, nl=False)
        except jobs.SubmitError as err:
            _fail(str(err))
        except KeyboardInterrupt:  # the usual way to stop following
            raise typer.Exit(130) from None

    @app.command()
    def cancel(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        address: Address = DEFAULT_ADDRESS,
    ) -> None:
        """Stop a job; it writes a final checkpoint, so `metaopt submit --job-id` resumes it."""
        jobs = _jobs("cancel")

        try:
            stopped = jobs.cancel(_address(address), job_id)
        except jobs.SubmitError as err:
            _fail(str(err))
        typer.echo(f"job {job_id}: " + ("stopping" if stopped else "had already ended"))

    @app.command("list-jobs")
    def list_jobs(address: Address = DEFAULT_ADDRESS, as_json: AsJson = False) -> None:
        """The cluster's jobs, newest first."""
        jobs = _jobs("list-jobs")

        try:
            rows = jobs.list_jobs(_address(address))
        except jobs.SubmitError as err:
            _fail(str(err))
        if as_json:
            typer.echo(json.dumps(rows))
            return
        for r in rows:
            typer.echo(f"{r['job_id']:<32} {r['status']:<10} {r['submission_id']:<44} {r['message'] or ''}")


def _submit_k8s(spec, job_id: str, image: str | None, namespace: str, cluster: str | None,
                env_secrets: tuple[str, ...], dry_run: bool) -> None:
    import yaml

    from metaopt import k8s, plugins
    from metaopt.submit import SubmitError, check_storage

    if image is None:
        _fail("--k8s needs --image, the metaopt image the pods run (deploy/Dockerfile)", code=2)
    bundle = None
    if spec.plugins:  # their sources, zipped into the job's object storage (not on a dry run)
        if not spec.storage.root:
            _fail("the job's plugins travel through its object storage: set storage.root", code=2)
        bundle = (plugins.bundle_uri(spec.storage.root, plugins.pack(spec.plugins)) if dry_run else
                  _upload_plugins(spec))
    manifest = k8s.rayjob(spec, job_id, image, namespace, cluster, env_secrets, bundle)
    if dry_run:
        typer.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)
        return
    try:
        check_storage(spec)
        k8s.create(manifest)
    except SubmitError as err:
        _fail(str(err))
    typer.echo(job_id)
    typer.echo(f"created RayJob {job_id}; follow it: kubectl get rayjob {job_id} -n {namespace}", err=True)


def _upload_plugins(spec) -> str:
    from metaopt import plugins
    from metaopt.submit import check_storage

    try:
        check_storage(spec)
        return plugins.upload(spec.plugins, spec.storage.root)
    except Exception as err:  # noqa: BLE001 - fsspec backends raise their own types
        _fail(f"cannot upload the job's plugins to {spec.storage.root}: {err}", code=1)


def _read_record(url: str | None, prefix: str, job_id: str) -> dict | None:
    """The job store's record of the job, or None without a store; a store that cannot be read
    is reported but does not hide Ray's answer."""
    if not url:
        return None
    from metaopt.jobstore import JobStoreError, open_job_store

    try:
        store = open_job_store(url, prefix)
        try:
            return store.get(job_id)
        finally:
            store.close()
    except JobStoreError as err:
        typer.echo(f"warning: cannot read the job store: {err}", err=True)
        return None
