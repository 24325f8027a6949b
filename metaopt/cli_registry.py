"""The registry's command line: `metaopt publish`, `metaopt pull`, `metaopt registry list|alias`.

Exit codes as everywhere in `metaopt`: 0 success, 1 failure (damaged artifact or checkpoint,
storage error), 2 bad input (unknown name, version or alias, a path that is no run). The
registry is `--registry`, else $METAOPT_REGISTRY, else runs/registry (where `metaopt train`
publishes under its default --out runs).
"""

from __future__ import annotations

import json
import pathlib
from typing import Annotated, NoReturn

import typer

from metaopt.registry import DEFAULT_REGISTRY

REGISTRY_OPTION = typer.Option(
    "--registry", envvar="METAOPT_REGISTRY",
    help="Registry root: a path or fsspec URI (default: $METAOPT_REGISTRY, else runs/registry).",
)
RegistryUri = Annotated[str, REGISTRY_OPTION]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]

registry_app = typer.Typer(help="Inspect a registry and move aliases.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `publish`, `pull` and the `registry` group to the `metaopt` app."""
    app.command("publish")(publish)
    app.command("pull")(pull)
    app.add_typer(registry_app, name="registry")


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(action):
    """action(), with the registry's errors turned into exit codes and messages."""
    from metaopt.storage import CorruptArtifactError

    try:
        return action()
    except CorruptArtifactError as err:  # a ValueError too: first
        _fail(str(err), code=1)
    except (ValueError, LookupError) as err:
        _fail(str(err))
    except OSError as err:  # FileExistsError included: a publish that lost every race
        _fail(str(err), code=1)


def publish(
    source: Annotated[str, typer.Argument(
        metavar="RUN_OR_CHECKPOINT",
        help="A run directory (its newest good checkpoint is published) or one checkpoint directory; "
             "a path or fsspec URI.")],
    name: Annotated[str | None, typer.Option(
        "--name", help="Registry name (default: the job spec's artifact_name, else its name).")] = None,
    registry_uri: RegistryUri = DEFAULT_REGISTRY,
    alias: Annotated[list[str] | None, typer.Option(
        "--alias", help="Also point this alias at the new version (repeatable), e.g. champion.")] = None,
    eval_report: Annotated[pathlib.Path | None, typer.Option(
        "--eval", help="A `metaopt eval` report (its result.json) to record in the provenance.")] = None,
    as_json: AsJson = False,
) -> None:
    """Publish a run's trained optimizer as the next version of NAME (versions never change)."""
    from metaopt import publishing, registry

    evaluation = None
    if eval_report is not None:
        try:
            evaluation = json.loads(eval_report.read_text())
        except (OSError, ValueError) as err:
            _fail(f"cannot read the evaluation report {eval_report}: {err}")
    ref = _run(lambda: publishing.publish_checkpoint(source, registry_uri, name, evaluation=evaluation,
                                                     aliases=alias or ()))
    name_, version = registry.parse_ref(ref)
    manifest = _run(lambda: registry.read_manifest(registry_uri, name_, version))
    prov = manifest["provenance"]
    moved = sorted(a for a, v in _run(lambda: registry.aliases(registry_uri, name_)).items() if v == version)
    digest = _run(lambda: registry.digest(registry_uri, name_, version))
    if as_json:
        typer.echo(json.dumps({
            "ref": ref, "name": name_, "version": version, "digest": digest, "registry": registry_uri,
            "aliases": moved,
            "checkpoint": prov["checkpoint"]["uri"], "job_id": prov["job_id"],
            "outer_steps": prov["outer_steps"], "meta_loss_first": prov["meta_loss_first"],
            "meta_loss_last": prov["meta_loss_last"],
        }))
        return
    typer.echo(
        f"published {ref} to {registry_uri} (aliases: {', '.join(moved)})\n"
        f"digest {digest}: {name_}@{digest} pins exactly this content\n"
        f"from {prov['checkpoint']['uri']}: job {prov['job_id']}, {prov['outer_steps']} outer steps, "
        f"meta-loss {_num(prov['meta_loss_first'])} -> {_num(prov['meta_loss_last'])}\n"
        f"use it: metaopt pull {ref} --registry {registry_uri}, or "
        f"metaopt.load({ref!r}, registry={registry_uri!r}).as_optax(num_steps=1000)"
    )


def pull(
    ref: Annotated[str, typer.Argument(
        help="NAME, NAME:VERSION, NAME@ALIAS or NAME@sha256:DIGEST (default: the newest).")],
    registry_uri: RegistryUri = DEFAULT_REGISTRY,
    dest: Annotated[
        pathlib.Path | None, typer.Option("--dest", help="Local directory (default: the cache).")
    ] = None,
) -> None:
    """Copy a trained optimizer out of a registry, verifying the sha256 of every file; print its path."""
    from metaopt import registry

    typer.echo(_run(lambda: registry.pull(ref, registry_uri, str(dest) if dest else None)))


@registry_app.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="List this name's versions (default: all).")] = None,
    registry_uri: RegistryUri = DEFAULT_REGISTRY,
    as_json: AsJson = False,
) -> None:
    """Names with their newest version and aliases; with NAME, its versions and their provenance."""
    rows = _run(lambda: _name_rows(registry_uri) if name is None else _version_rows(registry_uri, name))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no trained optimizers in {registry_uri}", err=True)
        return
    if name is None:
        table = [["NAME", "NEWEST", "VERSIONS", "ALIASES"]]
        table += [[r["name"], str(r["newest"]), str(r["versions"]), _aliases_text(r["aliases"])]
                  for r in rows]
    else:
        table = [["VERSION", "CREATED", "JOB", "OUTER STEPS", "FINAL META-LOSS", "ALIASES", "DIGEST"]]
        table += [[str(r["version"]), r["created_at"][:19].replace("T", " "), str(r["job_id"]),
                   str(r["outer_steps"]), _num(r["meta_loss_last"]), ", ".join(r["aliases"]), r["digest"]]
                  for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@registry_app.command("alias")
def alias_(
    name: Annotated[str, typer.Argument(help="Registry name.")],
    version: Annotated[int, typer.Argument(help="Existing version to point the alias at.", min=1)],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. champion ('latest' moves by itself).")],
    registry_uri: RegistryUri = DEFAULT_REGISTRY,
    as_json: AsJson = False,
) -> None:
    """Point NAME@ALIAS at VERSION (aliases move; versions never change)."""
    from metaopt import registry

    previous = _run(lambda: registry.set_alias(registry_uri, name, version, alias))
    if as_json:
        typer.echo(json.dumps({"name": name, "alias": alias, "version": version, "previous": previous}))
        return
    was = f" (was {name}:{previous})" if previous is not None else ""
    typer.echo(f"{name}@{alias} -> {name}:{version}{was}")


def _name_rows(registry_uri: str) -> list[dict]:
    from metaopt import registry

    rows = []
    for name in registry.list_names(registry_uri):
        versions = registry.list_versions(registry_uri, name)
        rows.append({"name": name, "newest": versions[-1], "versions": len(versions),
                     "aliases": registry.aliases(registry_uri, name)})
    return rows


def _version_rows(registry_uri: str, name: str) -> list[dict]:
    from metaopt import registry

    versions = registry.list_versions(registry_uri, name)
    if not versions:
        raise registry.ArtifactNotFoundError(
            f"no published optimizer named {name!r} in {registry_uri}; "
            f"available names: {registry.list_names(registry_uri) or 'none'}")
    by_version: dict[int, list[str]] = {}
    for alias, version in sorted(registry.aliases(registry_uri, name).items()):
        by_version.setdefault(version, []).append(alias)
    rows = []
    for version in versions:
        manifest = registry.read_manifest(registry_uri, name, version)
        prov = manifest.get("provenance", {})
        rows.append({
            "version": version, "created_at": manifest.get("created_at", ""),
            "job_id": prov.get("job_id"), "outer_steps": prov.get("outer_steps"),
            "meta_loss_last": prov.get("meta_loss_last", prov.get("meta_loss")),
            "optimizer": manifest.get("optimizer", {}).get("name"),
            "evaluated": "evaluation" in prov, "aliases": by_version.get(version, []),
            "digest": registry.digest(registry_uri, name, version),
        })
    return rows


def _aliases_text(table: dict[str, int]) -> str:
    return ", ".join(f"{a}={v}" for a, v in sorted(table.items()))


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, int | float) else str(x)
