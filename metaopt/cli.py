"""The `metaopt` command line. Exit codes: 0 success, 1 failure, 2 bad input."""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from typing import Annotated

import typer

from metaopt import cli_datasets, cli_jobs, cli_registry
from metaopt.extras import MissingExtraError, require

app = typer.Typer(
    help="Meta-train learned optimizers and use the trained ones.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _use_of(spec) -> tuple[str, str]:
    """(kind, the call that uses it) of what the job trains: `metaopt.load(ref).<call>`."""
    if spec.meta_objective is None:
        return "optimizer", "as_optax(num_steps=1000)"
    from metaopt import learnables

    learned = learnables.make(spec.meta_objective.name, **spec.meta_objective.hparams)
    return learned.kind, getattr(learned, "usage", f"as_{learned.kind}(...)")


def _needs(extra: str, verb: str) -> None:
    """Exit 1 naming the pip extra to install where `metaopt VERB` cannot run in this environment."""
    try:
        require(extra, f"`metaopt {verb}`")
    except MissingExtraError as err:
        _fail(str(err), code=1)


@app.command()
def train(
    config: Annotated[str, typer.Argument(
        help="Job spec YAML, e.g. examples/quickstart.yaml (or `base64:` and its base64: a RayJob's).")],
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
    metrics_port: Annotated[int, typer.Option("--metrics-port", min=0, max=65535,
                                              help="Prometheus /metrics port (0: any free one).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary line at the end.")] = False,
) -> None:
    """Meta-train locally: learner, Ray workers, checkpoints, registry, all on this machine."""
    _needs("service", "train")
    from metaopt.jobspec import JobSpecError, check_job_id, load_job_spec

    try:
        spec = load_job_spec(config)
        overrides = {"stop.max_outer_steps": max_outer_steps, "stop.max_minutes": max_minutes,
                     "workers.count": workers}
        spec = spec.with_overrides(**{k: v for k, v in overrides.items() if v is not None})
        if job_id is not None:
            check_job_id(job_id)
    except JobSpecError as err:
        _fail(str(err))
    from metaopt.jobstore import JobStoreError
    from metaopt.train import WorkerFailed, new_job_id
    from metaopt.train import train as run_training

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("metaopt.train").setLevel(logging.INFO)  # where the learner and metrics are
    logging.getLogger("metaopt.learner.checkpointing").setLevel(logging.INFO)  # where it resumed
    logging.getLogger("metaopt.inrun_eval").setLevel(logging.INFO)  # each evaluation, and skipped ticks
    show_progress = sys.stderr.isatty() or not as_json
    job_id = job_id or new_job_id(spec)
    try:
        result = run_training(spec, out=str(out), job_id=job_id, progress=show_progress,
                              metrics_port=metrics_port)
    except JobSpecError as err:  # a plugin that fails its check: bad input, nothing started
        _fail(str(err))
    except (WorkerFailed, JobStoreError, ValueError, OSError) as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        _fail(f"interrupted; the last checkpoint is kept: resume with --job-id {job_id}", code=130)
    if as_json:
        typer.echo(json.dumps(result.summary()))
    else:
        kind, usage = _use_of(spec)
        typer.echo(
            f"job {result.job_id}: {result.outer_steps} outer steps, meta-loss "
            f"{result.meta_loss_first:.4g} -> {result.meta_loss_last:.4g}\n"
            f"run directory: {result.run_dir} (metrics.jsonl, meta_loss.png)\n"
            f"trained {kind}: {result.artifact} ({result.artifact_digest}) in {result.registry}\n"
            f"use it: metaopt.load({result.artifact!r}, registry={result.registry!r}).{usage}, "
            "or pinned to this content: "
            f"{result.artifact.partition(':')[0]}@{result.artifact_digest}"
        )


PluginsUri = Annotated[str | None, typer.Option(
    "--plugins", help="URI of the job's plugin bundle (`metaopt upload-plugins`), fetched and verified.")]


def _fetch_plugins(uri: str | None) -> None:
    """Make the bundle's plugins importable before the spec that names them is read."""
    if uri:
        from metaopt.plugins import PluginError, fetch

        try:
            fetch(uri)
        except PluginError as err:
            _fail(str(err))


def _tls_options(cert: pathlib.Path | None, key: pathlib.Path | None):
    """A certificate without its key (or the reverse) is a mistake."""
    if (cert is None) != (key is None):
        _fail("--tls-cert and --tls-key go together")


@app.command("serve-learner")
def serve_learner(
    config: Annotated[pathlib.Path, typer.Argument(help="Job spec YAML (the same as the workers').")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="gRPC port (0: any free).")] = 50051,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "0.0.0.0",
    metrics_port: Annotated[int, typer.Option("--metrics-port", min=0, max=65535,
                                              help="Prometheus /metrics port (0: any free one).")] = 9090,
    health_port: Annotated[int | None, typer.Option(
        "--health-port", min=0, max=65535,
        help="Also serve gRPC health checks alone, in plaintext, here (probes that cannot do TLS).")] = None,
    token_file: Annotated[pathlib.Path | None, typer.Option(
        "--token-file", help="File holding the job's bearer token; every worker must send it.")] = None,
    tls_cert: Annotated[pathlib.Path | None, typer.Option("--tls-cert", help="Certificate (PEM).")] = None,
    tls_key: Annotated[pathlib.Path | None, typer.Option("--tls-key", help="Its private key (PEM).")] = None,
    tls_client_ca: Annotated[pathlib.Path | None, typer.Option(
        "--tls-client-ca", help="CA of the workers' certificates: mutual TLS.")] = None,
    out: Annotated[pathlib.Path, typer.Option("--out", help="Root for run directories and the registry.")] = (
        pathlib.Path("runs")),
    job_id: Annotated[str | None, typer.Option(
        "--job-id", help="Job id (workers need it); an existing one resumes from its checkpoint.")] = None,
    max_outer_steps: Annotated[
        int | None, typer.Option("--max-outer-steps", min=1, help="Override stop.max_outer_steps.")] = None,
    plugins_uri: PluginsUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary line at the end.")] = False,
) -> None:
    """Run a job's learner alone, as in its own pod; workers elsewhere join with `metaopt worker`."""
    _needs("service", "serve-learner")
    _fetch_plugins(plugins_uri)
    from metaopt.jobspec import JobSpecError, check_job_id, load_job_spec
    from metaopt.learner.security import TLSConfig, read_token

    _tls_options(tls_cert, tls_key)
    if tls_client_ca is not None and tls_cert is None:
        _fail("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    try:
        spec = load_job_spec(config)
        if max_outer_steps is not None:
            spec = spec.with_overrides(**{"stop.max_outer_steps": max_outer_steps})
        if job_id is not None:
            check_job_id(job_id)
        token = read_token(token_file) if token_file else None
    except (JobSpecError, ValueError, OSError) as err:
        _fail(str(err))
    client_ca = str(tls_client_ca) if tls_client_ca else None
    tls = TLSConfig(str(tls_cert), str(tls_key), client_ca) if tls_cert else None
    from metaopt.train import new_job_id
    from metaopt.train import serve_learner as run_learner

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("metaopt.learner.checkpointing").setLevel(logging.INFO)  # where it resumed
    logging.getLogger("metaopt.inrun_eval").setLevel(logging.INFO)  # each evaluation, and skipped ticks
    job_id = job_id or new_job_id(spec)

    def listening(address: str, metrics_url: str) -> None:
        typer.echo(f"job {job_id}: learner listening on {address}, metrics at {metrics_url}", err=True)

    try:
        summary = run_learner(spec, str(out), job_id, host, port, token, tls, metrics_port, listening,
                              progress=sys.stderr.isatty() or not as_json, health_port=health_port)
    except JobSpecError as err:  # a plugin that fails its check: bad input, nothing started
        _fail(str(err))
    except (ValueError, OSError, RuntimeError) as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        _fail(f"interrupted; the last checkpoint is kept: resume with --job-id {job_id}", code=130)
    typer.echo(json.dumps(summary) if as_json else
               f"job {job_id}: {summary['outer_steps']} outer steps; trained optimizer "
               f"{summary['artifact']} in {summary['registry']}")


# Options `worker` and `workers` share: how to reach the learner.
WorkerSpec = Annotated[pathlib.Path, typer.Argument(help="Job spec YAML (the same as the learner's).")]
LearnerAddress = Annotated[str, typer.Option("--learner", help="The learner's address, HOST:PORT.")]
LearnerJobId = Annotated[str, typer.Option("--job-id", help="The job id the learner serves.")]
TokenFile = Annotated[pathlib.Path | None, typer.Option(
    "--token-file", help="File holding the job's bearer token.")]
TlsCa = Annotated[pathlib.Path | None, typer.Option(
    "--tls-ca", help="CA of the learner's certificate: connect with TLS.")]
TlsCert = Annotated[pathlib.Path | None, typer.Option(
    "--tls-cert", help="The workers' certificate, for mutual TLS (for `workers`: on every Ray node).")]
TlsKey = Annotated[pathlib.Path | None, typer.Option("--tls-key", help="Its private key.")]
TlsServerName = Annotated[str | None, typer.Option(
    "--tls-server-name", help="Name in the learner's certificate, if not the address's host.")]
StatsJson = Annotated[bool, typer.Option("--json", help="Print one JSON line of stats at the end.")]


def _worker_setup(config, token_file, tls_ca, tls_cert, tls_key, tls_server_name, plugins_uri):
    """(spec, token, ClientTLS or None) for `worker` and `workers`; bad input exits 2."""
    from metaopt.jobspec import JobSpecError, load_job_spec
    from metaopt.learner.security import read_token

    _fetch_plugins(plugins_uri)

    _tls_options(tls_cert, tls_key)
    if tls_cert is not None and tls_ca is None:
        _fail("--tls-cert needs --tls-ca (mutual TLS is TLS first)")
    try:
        spec = load_job_spec(config)
        token = read_token(token_file) if token_file else None
    except (JobSpecError, ValueError, OSError) as err:
        _fail(str(err))
    from metaopt.workers.client import ClientTLS

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tls = (ClientTLS(str(tls_ca), str(tls_cert) if tls_cert else None, str(tls_key) if tls_key else None,
                     tls_server_name) if tls_ca else None)
    return spec, token, tls


@app.command()
def worker(
    config: WorkerSpec,
    learner: LearnerAddress,
    job_id: LearnerJobId,
    worker_id: Annotated[str | None, typer.Option("--worker-id", help="Default: HOSTNAME-PID.")] = None,
    token_file: TokenFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_server_name: TlsServerName = None,
    bfloat16: Annotated[bool, typer.Option(
        "--bfloat16", help="Send estimates as bfloat16: half the bytes, relative error <= 2^-8.")] = False,
    plugins_uri: PluginsUri = None,
    as_json: StatsJson = False,
) -> None:
    """Run one PES worker against a learner started elsewhere (`metaopt serve-learner`)."""
    import os
    import socket

    _needs("service", "worker")
    from metaopt.train import dump_stacks_on_sigusr1

    dump_stacks_on_sigusr1()
    spec, token, tls = _worker_setup(config, token_file, tls_ca, tls_cert, tls_key, tls_server_name,
                                     plugins_uri)
    from metaopt._proto import learner_pb2 as pb
    from metaopt.workers.actor import PESWorker

    encoding = pb.ENCODING_BFLOAT16_LE if bfloat16 else pb.ENCODING_FLOAT32_LE
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        stats = PESWorker(spec, learner, worker_id, job_id, token, tls, encoding, own_process=True).run()
    except RuntimeError as err:
        _fail(str(err), code=1)
    typer.echo(json.dumps(stats) if as_json else
               f"worker {worker_id}: {stats['accepted']} estimates accepted, {stats['rejected']} rejected")


@app.command()
def workers(
    config: WorkerSpec,
    learner: LearnerAddress,
    job_id: LearnerJobId,
    count: Annotated[int | None, typer.Option(
        "--count", min=1, help="How many (default: the spec's workers.count).")] = None,
    token_file: TokenFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_server_name: TlsServerName = None,
    plugins_uri: PluginsUri = None,
    as_json: StatsJson = False,
) -> None:
    """Start a job's workers as Ray actors on this Ray cluster, against a learner served elsewhere."""
    _needs("service", "workers")
    spec, token, tls = _worker_setup(config, token_file, tls_ca, tls_cert, tls_key, tls_server_name,
                                     plugins_uri)
    from metaopt.train import WorkerFailed, run_workers

    try:
        stats = run_workers(spec, learner, job_id, token, tls, count)
    except WorkerFailed as err:
        _fail(str(err), code=1)
    accepted = sum(s.get("accepted", 0) for s in stats)  # a worker never placed has none
    typer.echo(json.dumps({"accepted": accepted, "workers": stats}) if as_json else
               f"{len(stats)} workers: {accepted} estimates accepted")


cli_registry.register(app)  # publish, pull, registry list|alias


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
    baseline_cache: Annotated[
        pathlib.Path | None,
        typer.Option("--baseline-cache", help="Folder that keeps tuned baselines for later evaluations."),
    ] = None,
    record_to: Annotated[
        str | None,
        typer.Option("--record", help="Also keep the runs' parameters at the test points as a dataset of "
                                      "training runs in this folder or URI (docs/datasets.md)."),
    ] = None,
) -> None:
    """Evaluate an optimizer on a task suite against tuned baselines; writes JSON and plots."""
    _needs("eval", "eval")
    from metaopt import evaluation, storage

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
    if record_to:
        try:  # before any training: an evaluation is not lost to a destination that cannot be written
            fs, path = storage.fresh_fs(record_to)
            if not storage.is_object_store(fs):  # there, makedirs would create a bucket
                fs.makedirs(f"{path.rstrip('/')}/shards", exist_ok=True)
        except (OSError, ValueError) as err:
            _fail(f"cannot record to {record_to}: {err}")
    show_progress = sys.stderr.isatty() or not as_json
    recording = evaluation.RunRecording.into(record_to) if record_to else None
    try:
        result = evaluation.evaluate(ref, spec, registry=registry_uri, seeds=seed_list, baselines=base_list,
                                     trials=trials, progress=show_progress, baseline_cache=baseline_cache,
                                     record=recording)
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
        if record_to:
            typer.echo(f"runs recorded in {record_to} (metaopt dataset inspect {record_to})")
        return
    typer.echo(json.dumps({"ref": result["ref"], "suite": result["suite"], "seeds": result["seeds"],
                           "baselines": result["baselines"], **result["aggregate"], "out": str(out_dir),
                           **({"recorded": record_to} if record_to else {})}))


@app.command("inspect")
def inspect_(
    ref: Annotated[
        str, typer.Argument(help="A registry ref NAME[:VERSION] (with --registry) or an optimizer name.")
    ],
    out: Annotated[
        pathlib.Path | None, typer.Option("--out", help="Report directory (default: runs/inspect/REF).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON line.")] = False,
    registry_uri: Annotated[
        str | None, typer.Option("--registry", help="Registry root for a registry ref: a path or fsspec URI.")
    ] = None,
) -> None:
    """Probe what an optimizer does (update shape, momentum, scale, schedule, features); a report."""
    _needs("eval", "inspect")
    from metaopt import evaluation, inspector, optimizers

    try:
        resolved = evaluation.resolve_ref(ref, registry_uri)
    except evaluation.EvalInputError as err:
        _fail(str(err))
    optimizer = optimizers.make(resolved.optimizer_name, **resolved.hparams)
    result = inspector.inspect(optimizer, resolved.theta, label=resolved.ref)
    out_dir = out or pathlib.Path("runs") / "inspect" / ref.replace(":", "_").replace("/", "_")
    try:
        written = inspector.write_report(result, out_dir)
    except OSError as err:
        _fail(f"cannot write the report to {out_dir}: {err}", code=1)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo("\n".join(inspector.summary(result)))
    typer.echo(f"report: {written['md']} (plots: {written['png']}, data: {written['json']})")


cli_jobs.register(app)  # submit, status, logs, cancel, list-jobs
cli_datasets.register(app)  # dataset export, list, inspect

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
    _needs("eval", "list tasks")
    from metaopt import task_zoo

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


@list_app.command("objectives")
def list_objectives(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """What a job can meta-learn besides an optimizer (its meta_objective): `metaopt list objectives`."""
    import jax

    from metaopt import learnables

    rows = []
    for name in learnables.names():
        learnable = learnables.make(name)
        size = sum(x.size for x in jax.tree.leaves(learnable.init_theta(jax.random.key(0))))
        rows.append({"name": name, "description": f"{learnable.description} ({learnable.kind})",
                     "kind": learnable.kind, "meta_parameters": int(size)})
    _print_rows(rows, as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
