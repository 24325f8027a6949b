"""Publishing trained optimizers: from a finished run, a run directory or one checkpoint.

A run directory is what the learner writes (`metaopt train`, `metaopt serve-learner`):

    RUN/job.json                        the job spec, as JSON
    RUN/checkpoints/ckpt-000000123/     committed checkpoints (metaopt.storage.save_checkpoint):
                                        arrays {"theta": flat float32, "rng", "outer_state/i"},
                                        meta {"job_id", "version", "structure_digest", "history"
                                        (the last outer steps), and, when the learner records
                                        them, "totals", "spec", "code_version"}

`publish_checkpoint` turns the newest good checkpoint of a run (or a checkpoint named directly)
into the next version of a registry name; `provenance` is the record every published artifact
carries, whoever publishes it (the end of a run does the same).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import subprocess
import tomllib
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from metaopt import plugins, registry, storage
from metaopt.storage import ARRAYS_FILE, CHECKPOINT_DIR_RE, CorruptArtifactError, basename, fresh_fs

__all__ = [
    "Checkpoint",
    "NotACheckpointError",
    "checkpoint_theta",
    "evaluation_summary",
    "find_checkpoint",
    "code_version",
    "installed_code_version",
    "provenance",
    "publish_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
JOB_FILE = "job.json"


class NotACheckpointError(ValueError):
    """The path is neither a run directory nor a checkpoint, or it holds no checkpoint at all."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A learner checkpoint read back and verified, with the run directory it belongs to."""

    uri: str
    run_dir: str | None  # the parent of its checkpoints/ folder, if it sits in one
    step: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]  # job_id, version, structure_digest, history, maybe spec, code_version


@functools.cache
def installed_code_version() -> str:
    """This metaopt's code version: `code_version` of the folder this module is in."""
    return code_version(pathlib.Path(__file__).resolve().parent)


def code_version(package_dir: pathlib.Path) -> str:
    """The installed metaopt's version ("unknown" when it is not installed as a package), with
    the git commit it runs from when `package_dir` (the `metaopt` package folder) sits in
    metaopt's own git checkout ("0.1.0+git.1a2b3c4d5e6f", and ".dirty" when files differ from
    that commit): the package version alone does not change from one commit to the next.

    Only metaopt's own checkout counts: the package folder's parent must hold metaopt's
    pyproject.toml and be the top of its git tree. A metaopt installed or vendored inside a
    user's own repository would otherwise record the user's commit as metaopt's."""
    try:
        version = metadata.version("metaopt")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = package_dir.resolve().parent
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):  # installed as a package: no source tree
        return version
    if project.get("name") != "metaopt":
        return version

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no git here
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    toplevel = git("rev-parse", "--show-toplevel")
    if toplevel is None or pathlib.Path(toplevel).resolve() != root:  # not a checkout of its own
        return version
    commit = git("describe", "--always", "--abbrev=12", "--dirty=.dirty", "--exclude=*")
    return f"{version}+git.{commit}" if commit else version


def _spec_dict(spec: Any) -> dict[str, Any]:
    if hasattr(spec, "model_dump"):  # a JobSpec
        return spec.model_dump(mode="json")
    if not isinstance(spec, dict):
        raise TypeError(f"spec must be a JobSpec or its JSON dict, got {type(spec).__name__}")
    return spec


def _meta_loss(record: Any) -> float | None:
    return _finite(record["meta_loss"] if isinstance(record, dict) else record.meta_loss)


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN


def provenance(spec: Any, job_id: str, history: Sequence[Any], outer_steps: int,
               evaluation: dict[str, Any] | None = None, *, code_version: str | None = None,
               meta_loss_first: float | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance of a published optimizer, as its manifest records it.

    spec: the JobSpec (or its JSON dict); history: the learner's outer steps (OuterStep records
    or their dicts, oldest first); outer_steps: θ's version; evaluation: a `metaopt eval` report
    (result.json) or its summary; code_version: of the code that trained θ (default: this
    installation's); meta_loss_first: outer step 1's, where `history` no longer begins there (the
    learner keeps a window of its last steps). Keys: job_id, code_version, task_families,
    outer_steps, meta_loss_first, meta_loss_last (None without history), estimator, spec,
    [plugins] (import path and source sha256 of each plugin the spec names), [evaluation], and
    `extra`.
    """
    spec = _spec_dict(spec)
    record = {
        "job_id": job_id,
        "code_version": code_version or installed_code_version(),
        "task_families": [t["family"] for t in spec.get("tasks", [])],
        "outer_steps": int(outer_steps),
        "meta_loss_first": (_finite(meta_loss_first) if meta_loss_first is not None
                            else _meta_loss(history[0]) if history else None),
        "meta_loss_last": _meta_loss(history[-1]) if history else None,
        "estimator": spec.get("estimator"),
        "spec": spec,
    }
    used = {t["family"] for t in spec.get("tasks", [])} | {spec.get("optimizer", {}).get("name")}
    if any(plugins.is_import_path(p) for p in used):  # the sources they were trained with
        record["plugins"] = [plugins.record(p) for p in sorted(filter(plugins.is_import_path, used))]
    if evaluation is not None:
        record["evaluation"] = evaluation_summary(evaluation)
    return record | extra


def evaluation_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What a manifest keeps of a `metaopt eval` report: the suite, seeds, baselines, aggregate
    and per task the final training loss, the baseline's target and whether REF won."""
    if not isinstance(report, dict) or not {"suite", "aggregate", "tasks"} <= set(report):
        got = sorted(report) if isinstance(report, dict) else type(report).__name__
        raise ValueError(f"not a `metaopt eval` report: expected the keys suite, aggregate, tasks "
                         f"(result.json in the report directory), got {got}")
    tasks = report["tasks"]
    if isinstance(tasks, list):  # a full report; a summary already has them by name
        tasks = {t["name"]: {"final_train_loss": t["ref"]["final_train_loss"],
                             "target_loss": t["target_loss"], "final_loss_ratio": t["final_loss_ratio"],
                             "win": t["win"]} for t in tasks}
    keep = ("ref", "command", "suite", "seeds", "baselines", "trials")
    return {k: report[k] for k in keep if k in report} | {"aggregate": report["aggregate"], "tasks": tasks}


# --------------------------------------------------------------------------------------------
# Finding and reading checkpoints


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def _read_checkpoint(uri: str) -> Checkpoint:
    try:
        files, wrapped = storage.read_committed(uri)
    except CorruptArtifactError as e:
        raise CorruptArtifactError(f"checkpoint {uri} is corrupt: {e}") from e
    if wrapped.get("kind") != "metaopt.checkpoint" or ARRAYS_FILE not in files:
        raise NotACheckpointError(f"{uri} is a committed directory but not a learner checkpoint "
                                  f"(its COMMIT.json says kind {wrapped.get('kind')!r})")
    try:
        arrays = safetensors.numpy.load(files[ARRAYS_FILE])
    except SafetensorError as e:
        raise CorruptArtifactError(f"checkpoint {uri}/{ARRAYS_FILE} is unreadable: {e}") from e
    return _checked(uri, int(wrapped.get("step", -1)), arrays, wrapped.get("meta", {}))


def _checked(uri: str, step: int, arrays: dict, meta: dict) -> Checkpoint:
    missing = [k for k in ("job_id", "version", "structure_digest", "history") if k not in meta]
    if "theta" not in arrays or missing:
        raise CorruptArtifactError(
            f"checkpoint {uri} is not a learner's: it lacks {['theta'] if 'theta' not in arrays else []}"
            f"{' and meta ' + str(missing) if missing else ''}; it was written by another program"
        )
    parent = _parent(uri)
    run_dir = _parent(parent) if basename(parent) == CHECKPOINTS_DIR else None
    return Checkpoint(uri, run_dir, step, arrays, meta)


def _ckpt_dirs(uri: str) -> list[str]:
    return [d for d in storage.list_subdirs(uri) if CHECKPOINT_DIR_RE.fullmatch(d)]


def _newest_good(root: str, run_dir: str | None) -> Checkpoint:
    found = storage.latest_checkpoint(root)  # skips damaged or unfinished ones, with a warning
    if found is None:
        raise CorruptArtifactError(
            f"no good checkpoint in {root}: all {len(_ckpt_dirs(root))} are damaged or unfinished "
            "(see the warnings above); publish an older copy or resume the run to write a new one"
        )
    step, arrays, meta = found
    checkpoint = _checked(f"{root.rstrip('/')}/ckpt-{step:09d}", step, arrays, meta)
    return dataclasses.replace(checkpoint, run_dir=run_dir)


def find_checkpoint(uri: str) -> Checkpoint:
    """The checkpoint `uri` names: a checkpoint directory itself, or the newest good checkpoint
    of a run directory (in its checkpoints/) or of a checkpoints/ folder. Local paths or fsspec
    URIs. NotACheckpointError if it is none of these; CorruptArtifactError if the checkpoint is
    damaged, or if every checkpoint of the run is."""
    fs, path = fresh_fs(uri)
    if not fs.exists(path):
        raise NotACheckpointError(f"{uri} does not exist; give a run directory (RUN with "
                                  f"{CHECKPOINTS_DIR}/ inside) or one of its checkpoints")
    if storage.is_committed(uri):
        return _read_checkpoint(uri)
    if CHECKPOINT_DIR_RE.fullmatch(basename(uri)):
        raise CorruptArtifactError(f"checkpoint {uri} is unfinished (no COMMIT.json): its write was "
                                   "interrupted; publish another checkpoint of the run")
    checkpoints = f"{uri.rstrip('/')}/{CHECKPOINTS_DIR}"
    if _ckpt_dirs(checkpoints):
        return _newest_good(checkpoints, uri.rstrip("/"))
    if _ckpt_dirs(uri):
        parent = _parent(uri)
        return _newest_good(uri, parent if basename(uri) == CHECKPOINTS_DIR else None)
    if fs.exists(f"{path.rstrip('/')}/{CHECKPOINTS_DIR}") or fs.exists(f"{path.rstrip('/')}/{JOB_FILE}"):
        raise NotACheckpointError(f"run {uri} has no checkpoint yet (nothing in {CHECKPOINTS_DIR}/): "
                                  "it wrote none before it stopped; resume it to write one")
    raise NotACheckpointError(
        f"{uri} is not a run directory or a checkpoint: it has no {CHECKPOINTS_DIR}/ckpt-* "
        "inside and no COMMIT.json; give the run's directory (e.g. runs/runs/JOB_ID) or a "
        "checkpoint in it (RUN/checkpoints/ckpt-000000123)"
    )


def _job_spec(checkpoint: Checkpoint) -> dict[str, Any]:
    if isinstance(checkpoint.meta.get("spec"), dict):
        return checkpoint.meta["spec"]
    if checkpoint.run_dir is None:
        raise NotACheckpointError(
            f"cannot tell which optimizer {checkpoint.uri} holds: its meta has no job spec and it "
            f"is not in a run directory's {CHECKPOINTS_DIR}/ beside a {JOB_FILE}"
        )
    job = f"{checkpoint.run_dir}/{JOB_FILE}"
    fs, path = fresh_fs(job)
    try:
        spec = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise NotACheckpointError(f"cannot tell which optimizer {checkpoint.uri} holds: its meta has "
                                  f"no job spec and {job} does not exist") from None
    except ValueError as e:
        raise CorruptArtifactError(f"{job} is not valid JSON ({e}); restore the run's job spec") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("optimizer"), dict):
        raise CorruptArtifactError(f"{job} holds no job spec with an optimizer section")
    return spec


def checkpoint_theta(checkpoint: Checkpoint, spec: dict[str, Any]):
    """(what the job meta-learned, θ as its pytree) of a checkpoint, checked against the spec's
    optimizer or meta_objective (its `name`, `hparams` and `kind`: workers/objective.py)."""
    import jax

    from metaopt import wire
    from metaopt.workers.objective import learnable

    opt = learnable(spec)
    template = jax.tree.map(np.asarray, opt.init_theta(jax.random.key(int(spec.get("seed", 0)))))
    digest = wire.structure_digest(wire.theta_structure(template))
    theta = np.asarray(checkpoint.arrays["theta"])
    if digest != checkpoint.meta["structure_digest"] or theta.size != wire.flatten(template).size:
        raise CorruptArtifactError(
            f"checkpoint {checkpoint.uri} holds a θ of another structure than the job spec's optimizer "
            f"{opt.name} {dict(opt.hparams)}; the spec (job.json) and the checkpoint are of different runs"
        )
    return opt, wire.unflatten(theta, template)


def publish_checkpoint(run_or_checkpoint_uri: str, registry_uri: str, name: str | None = None, *,
                       evaluation: dict[str, Any] | None = None, aliases: Iterable[str] = (),
                       selection: dict[str, Any] | None = None) -> str:
    """Publish the θ of a run's newest good checkpoint (or of the checkpoint named) as the next
    version of `name` (default: the job spec's artifact_name, else its name); return NAME:VERSION.

    Provenance comes from the checkpoint: its job id, outer steps and meta-loss history, and the
    job spec and code version from its meta (or the spec from the run's job.json), plus the
    checkpoint's URI and step, `evaluation` (a `metaopt eval` report) if given, and `selection` if
    given: how this checkpoint was chosen over the run's last (the rule, the suite, its figures)."""
    aliases = list(aliases)
    checkpoint = find_checkpoint(run_or_checkpoint_uri)
    spec = _job_spec(checkpoint)
    name = name or spec.get("artifact_name") or spec.get("name")
    if not name:
        raise ValueError(f"no name to publish {checkpoint.uri} under: pass one (the job spec names none)")
    registry.check_name(name)  # before building θ
    summary = evaluation_summary(evaluation) if evaluation is not None else None
    opt, theta = checkpoint_theta(checkpoint, spec)
    if summary is not None and _report_optimizer(evaluation) not in (None, opt.name):
        raise ValueError(f"the evaluation report is of optimizer {_report_optimizer(evaluation)!r}, "
                         f"but {checkpoint.uri} holds a {opt.name!r}; pass the report of this run's "
                         "optimizer")
    meta = checkpoint.meta
    if int(meta["version"]) < 1:
        raise ValueError(f"checkpoint {checkpoint.uri} is at outer step 0: nothing has been trained yet")
    # A checkpoint's history is the learner's window of last steps; its totals know step 1.
    first = (meta.get("totals") or {}).get("meta_loss_first")
    record = provenance(spec, str(meta["job_id"]), meta["history"], int(meta["version"]), summary,
                        code_version=str(meta.get("code_version") or "unknown"), meta_loss_first=first,
                        checkpoint={"uri": checkpoint.uri, "step": checkpoint.step},
                        published_with=installed_code_version(),
                        **({"selection": selection} if selection is not None else {}))
    return registry.publish(registry_uri, name, opt.name, dict(opt.hparams), theta, record, aliases,
                            kind=opt.kind)


def _report_optimizer(report: dict[str, Any]) -> str | None:
    """The optimizer a `metaopt eval` report evaluated (None if the report does not say)."""
    return report.get("ref_optimizer") if isinstance(report, dict) else None
