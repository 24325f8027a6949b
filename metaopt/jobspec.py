"""The meta-training job spec: one YAML file, validated once, then frozen.

`metaopt train`, `metaopt serve-learner` and `metaopt submit` take the same file. Every field has a default
except the task mix, so a spec can be as short as

    name: quickstart
    tasks:
      - family: quadratic
"""

from __future__ import annotations

import base64
import binascii
import pathlib
import re
from functools import partial
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from metaopt.plugins import is_import_path

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"


class JobSpecError(ValueError):
    """An invalid job spec; the message lists every problem with its field path."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AugmentSpec(_Frozen):
    """Sampled per task: global, per-tensor and per-parameter scales log-uniform in their ranges,
    gradient noise uniform (task_zoo.Augmentation)."""

    param_scale: tuple[float, float] = (1.0, 1.0)
    grad_noise: tuple[float, float] = (0.0, 0.0)
    tensor_scale: tuple[float, float] = (1.0, 1.0)
    element_scale: tuple[float, float] = (1.0, 1.0)

    @model_validator(mode="after")
    def _valid_ranges(self):
        from metaopt import task_zoo

        task_zoo.Augmentation(**self.model_dump())  # raises ValueError with the ranges
        return self


class TaskMix(_Frozen):
    family: str  # a task_zoo family name, or a plugin's import path (module:Attribute)
    weight: float = Field(1.0, gt=0)  # relative share (of samples, or of compute: task_balance)
    kwargs: dict[str, Any] = {}  # family settings, e.g. {"dims": [16]}
    augment: AugmentSpec | None = None

    @model_validator(mode="after")
    def _family_exists(self):
        from metaopt import task_zoo  # metaopt may import task_zoo only where validating a spec needs it

        try:
            task_zoo.family(self.family, **self.kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(str(err)) from None
        return self


class OptimizerSpec(_Frozen):
    name: str = "small_fc"  # a metaopt.optimizers name, or a plugin's import path (module:Attribute)
    hparams: dict[str, Any] = {}

    @model_validator(mode="after")
    def _optimizer_exists(self):
        from metaopt import optimizers

        try:
            optimizers.make(self.name, **self.hparams)
        except (ValueError, TypeError) as err:
            raise ValueError(str(err)) from None
        return self


class MetaObjectiveSpec(_Frozen):
    """What the job meta-learns instead of an optimizer (metaopt/learnables.py): a learned
    learning-rate schedule, a plugin's own object (import path), ..."""

    name: str  # a metaopt.learnables name, or a plugin's import path (module:Attribute)
    hparams: dict[str, Any] = {}

    @model_validator(mode="after")
    def _learnable_exists(self):
        from metaopt import learnables

        try:
            learnables.make(self.name, **self.hparams)
        except (ValueError, TypeError) as err:
            raise ValueError(str(err)) from None
        return self


class EstimatorSpec(_Frozen):
    """How workers estimate meta-gradients; also the estimators' own configuration
    (`metaopt.workers.estimators.make_estimator`), so defaults and checks live here alone."""

    kind: Literal["pes", "truncated_es", "full_es", "tbptt"] = "pes"
    num_particles: int = Field(8, ge=1)  # antithetic pairs per worker
    truncation_length: int = Field(20, ge=1)  # inner steps per estimate
    inner_horizon: int = Field(200, ge=1)  # inner steps before a particle's inner problem resets
    sigma: float = Field(0.01, gt=0)  # standard deviation of the perturbation ε
    # "initial": the meta-loss is each inner loss divided by the loss at the inner run's first
    # step, so tasks of any scale weigh alike; capped at `max_loss_ratio` so that a diverging
    # particle (inf, NaN) gives a large finite loss. "log": the log of that ratio, so halving a
    # loss counts the same late in a run as early (final loss matters, not just the first fast
    # descent). "none": raw inner losses.
    loss_normalization: Literal["initial", "log", "none"] = "initial"
    max_loss_ratio: float = Field(10.0, gt=0)
    # "log" only: ratios below this count as this. A floor well under what the baselines reach
    # keeps the optimizer from being paid for driving a loss to ~0 at the price of spikes.
    min_loss_ratio: float = Field(1e-6, gt=0)
    truncations_per_task: int | None = Field(None, ge=1)  # default: one inner horizon
    # Spread each worker's particles over random points of their first inner run. Off by
    # default: a worker keeps a task for one horizon, so a staggered particle would never finish
    # a run, and steps late in a run would count less and less towards the meta-loss (the
    # optimizer then learns to make fast early progress and neglects the final loss). Unstaggered
    # particles train whole inner runs when inner_horizon is a multiple of truncation_length.
    stagger: bool = False

    @model_validator(mode="after")
    def _truncation_fits(self):
        if self.truncation_length > self.inner_horizon:
            raise ValueError(
                f"truncation_length ({self.truncation_length}) must not exceed inner_horizon "
                f"({self.inner_horizon})"
            )
        if self.min_loss_ratio >= self.max_loss_ratio:
            raise ValueError(f"min_loss_ratio ({self.min_loss_ratio}) must be below max_loss_ratio "
                             f"({self.max_loss_ratio})")
        return self

    @property
    def persistent(self) -> bool:
        """PES carries each particle's perturbations across truncations; truncated ES does not."""
        return self.kind == "pes"

    @property
    def task_lifetime(self) -> int:
        """Truncations a worker spends on one sampled task before it samples another."""
        return self.truncations_per_task or max(1, self.inner_horizon // self.truncation_length)


class OuterSpec(_Frozen):
    """The learner's outer optimizer: Adam on the clipped mean of each meta-batch."""

    learning_rate: float = Field(1e-3, gt=0)
    clip_norm: float = Field(1.0, gt=0)
    meta_batch_size: int = Field(4, ge=1)
    max_staleness: int = Field(2, ge=0)
    max_estimate_norm: float = Field(1e6, gt=0)
    max_in_flight: int = Field(2, ge=1)


class WorkersSpec(_Frozen):
    # Up to this many workers, spread over the cluster's nodes. Where fewer fit, the job runs
    # with those and Ray places the rest as nodes join (workers.actor.actor_options).
    count: int = Field(2, ge=1)
    # Ray CPUs per worker. A CPU-only worker with n >= 2 whole CPUs sees them as n jax devices
    # and splits its particles across them (workers.actor.worker_env).
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    # A CPU-only worker claims ceil(cpus) cores of its machine and pins itself to them, so
    # XLA's thread pools fit what it has (workers/cores.py: 1.65x the inner steps/s of two
    # unpinned workers on 2 cores). Turn off where containers share a machine's cores without
    # a cpuset or CPU limit (with a limit, pinning turns itself off).
    pin_cores: bool = True
    # A folder on the workers' machine for JAX's persistent compilation cache, shared by its
    # workers and their restarts: each task shape is then compiled once per machine, not once per
    # worker (a broad task mix on 2 cores spent its first ~25 minutes compiling without it).
    compile_cache_dir: str | None = None


class StopSpec(_Frozen):
    """The run stops at whichever comes first."""

    max_outer_steps: int = Field(100, ge=1)
    # Wall-clock minutes of meta-training (from the workers' start) in one `metaopt train`
    # invocation, at least one outer step; a resumed job gets a fresh budget.
    max_minutes: float | None = Field(None, gt=0)


class StorageSpec(_Frozen):
    """Where a job keeps what must outlive its processes."""

    # Checkpoints (ROOT/runs/JOB_ID/checkpoints) and the registry (ROOT/registry): a path or an
    # fsspec URI such as s3://bucket/metaopt or gs://bucket/metaopt. Default: `--out` of
    # `metaopt train`. On a cluster, a shared store, so that a learner resumes wherever it starts.
    # An S3-compatible store's endpoint comes from $AWS_ENDPOINT_URL, credentials from AWS's
    # usual variables and files: nothing secret belongs in a job spec.
    root: str | None = None
    # The job store: redis://USER@HOST:PORT/DB (the password from $METAOPT_REDIS_PASSWORD), or
    # None for an in-process store that lives as long as the run.
    job_store: str | None = None
    job_store_prefix: str = Field("metaopt", pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("job_store")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        scheme, sep, rest = url.partition("://")
        # The password first: no message may echo a URL that carries one.
        if ":" in (rest if sep else url).rpartition("@")[0]:  # USER:PASSWORD@, even with a '/' in it
            raise ValueError("job_store must not carry a password (it would be stored with the job); "
                             "give the user only, redis://USER@HOST:PORT/DB, and the password "
                             "in $METAOPT_REDIS_PASSWORD")
        if not sep or scheme not in ("redis", "rediss"):
            raise ValueError(f"job_store must be a redis:// or rediss:// URL, got {url!r}")
        return url


class EvalSpec(_Frozen):
    """In-run evaluation (metaopt/inrun_eval.py): every `every_minutes` the newest checkpoint's θ
    is evaluated on `suite`'s first `seeds` seeds against the suite's tuned baselines, in a process
    of its own, and once more on the final θ. Absent: no in-run evaluation."""

    # A shipped suite (metaopt/suites/) or the path of a suite YAML file (readable where the
    # learner runs: a shipped name travels with `metaopt submit`, a path may not).
    suite: str
    every_minutes: float = Field(10.0, gt=0)
    seeds: int = Field(1, ge=1)  # the suite's first K evaluation seeds
    # "last": publish the final θ. "best": the evaluated checkpoint with the most wins on the suite
    # (ties: the lowest geometric-mean final-loss ratio). Never report an optimizer on the suite
    # that chose it: select on in_distribution, report on other suites.
    publish: Literal["last", "best"] = "last"

    @field_validator("suite")
    @classmethod
    def _suite_exists(cls, suite: str) -> str:
        from metaopt.evaluation import EvalInputError, load_suite

        try:
            load_suite(suite)
        except EvalInputError as err:
            raise ValueError(str(err)) from None
        return suite

    @model_validator(mode="after")
    def _enough_seeds(self):
        from metaopt.evaluation import load_suite

        available = load_suite(self.suite).seeds
        if self.seeds > len(available):
            raise ValueError(f"seeds ({self.seeds}) exceeds the {len(available)} evaluation seed(s) of suite "
                             f"{self.suite!r} ({list(available)}); use at most {len(available)}")
        return self


class RecordSpec(_Frozen):
    """A dataset of training runs (metaopt/datasets.py, docs/datasets.md): each worker records
    the parameters of `runs` of its inner runs (the + halves of its first antithetic pairs), with
    their training and held-out losses, every `every_truncations` truncations, at the boundary
    (never inside an unroll), in shards of `per_shard` records under the job's storage root; and
    with `eval`, each in-run evaluation records its runs there too (metaopt/inrun_eval.py).
    Absent: nothing is recorded."""

    every_truncations: int = Field(10, ge=1)
    runs: int = Field(1, ge=1)  # at most estimator.num_particles
    per_shard: int = Field(64, ge=1)


class JobSpec(_Frozen):
    name: str = Field(pattern=NAME_PATTERN)
    seed: int = 0
    tasks: list[TaskMix] = Field(min_length=1)
    # "weight": families sampled ∝ weight; "cost": ∝ weight / estimated FLOPs per inner step
    task_balance: Literal["weight", "cost"] = "weight"
    optimizer: OptimizerSpec = OptimizerSpec()
    # Meta-learn this instead of the optimizer (then `optimizer` is not given).
    meta_objective: MetaObjectiveSpec | None = None
    estimator: EstimatorSpec = EstimatorSpec()
    outer: OuterSpec = OuterSpec()
    workers: WorkersSpec = WorkersSpec()
    stop: StopSpec = StopSpec()
    checkpoint_interval_s: float = Field(30.0, gt=0)
    # Newest checkpoints kept (older ones are pruned); keep them all, e.g. 1000, to evaluate a
    # run's history afterwards (benchmarks/generalisation_curve.py).
    checkpoints_kept: int = Field(3, ge=1)
    storage: StorageSpec = StorageSpec()
    artifact_name: str | None = Field(None, pattern=NAME_PATTERN)  # default: the job name
    eval: EvalSpec | None = None  # in-run evaluation; off when absent
    record: RecordSpec | None = None  # a dataset of the inner runs; off when absent

    @field_validator("tasks")
    @classmethod
    def _distinct_families(cls, tasks: list[TaskMix]) -> list[TaskMix]:
        names = [t.family for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"each family may appear once in the mix, got {names}")
        return tasks

    @model_validator(mode="after")
    def _one_learnable(self):
        if self.meta_objective is not None and self.optimizer != OptimizerSpec():
            raise ValueError("a job meta-learns its optimizer or its meta_objective, not both: drop one")
        if self.meta_objective is not None and self.eval is not None:
            raise ValueError("in-run evaluation (eval) evaluates optimizers; this job meta-learns its "
                             f"meta_objective {self.meta_objective.name!r}: drop eval")
        if self.meta_objective is not None and self.record is not None:
            raise ValueError("record keeps inner runs of a learned optimizer; this job meta-learns its "
                             f"meta_objective {self.meta_objective.name!r}: drop record")
        if self.record is not None and self.record.runs > self.estimator.num_particles:
            raise ValueError(f"record.runs ({self.record.runs}) exceeds estimator.num_particles "
                             f"({self.estimator.num_particles}): a worker has that many inner runs")
        return self

    @property
    def plugins(self) -> list[str]:
        """The import paths of the plugins the job names (task families, what it meta-learns)."""
        learned = self.meta_objective.name if self.meta_objective else self.optimizer.name
        return sorted({n for n in [t.family for t in self.tasks] + [learned] if is_import_path(n)})

    def with_overrides(self, **changes: Any) -> JobSpec:
        """A copy with dotted-path overrides, e.g. `{"stop.max_outer_steps": 5}`, re-validated."""
        data = self.model_dump()
        for path, value in changes.items():
            *parents, leaf = path.split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise JobSpecError(f"cannot override {path!r}: {part!r} is not a section")
                node = node[part]
            node[leaf] = value
        return parse_job_spec(data)


def check_runnable(spec: JobSpec) -> None:
    """Run what the job names on tiny samples, as workers will: each plugin, and what its
    meta_objective requires of tasks on one task of each family (JobSpecError naming the field and
    what is wrong). Reading a spec only imports and builds them: this runs JAX, which `metaopt
    train` starts after Ray's processes (they fork), and before anything of the job."""
    from metaopt import optimizers, task_zoo
    from metaopt.plugins import PluginError

    checks = [(f"tasks.{i}.family", task_zoo.check_family, t.family, t.kwargs)
              for i, t in enumerate(spec.tasks)]
    if spec.meta_objective is None:
        checks.append(("optimizer.name", optimizers.check, spec.optimizer.name, spec.optimizer.hparams))
    else:
        checks.append(("meta_objective.name", partial(_check_learnable, spec), spec.meta_objective.name,
                       spec.meta_objective.hparams))
    for where, check, name, kwargs in checks:
        if is_import_path(name):
            try:
                check(name, **kwargs)
            except PluginError as err:
                raise JobSpecError(f"invalid job spec:\n  {where}: {err}") from None
    if spec.meta_objective is not None:
        _check_requires(spec)
    else:
        _check_rewired_tasks(spec)


def _check_rewired_tasks(spec: JobSpec) -> None:
    """The optimizer must be able to reset the optimizer state of the weights RigL regrows on a
    sparse family's tasks (metaopt/optimizers/slots.py); checked on one task of each."""
    import jax

    from metaopt import inner, optimizers, task_zoo

    for i, t in enumerate(spec.tasks):
        family = task_zoo.family(t.family, **t.kwargs)
        if not isinstance(family, task_zoo.SparseMLPFamily | task_zoo.SparseCNNFamily):
            continue
        opt = optimizers.make(spec.optimizer.name, **spec.optimizer.hparams)
        task = task_zoo.task(family.sample(jax.random.key(0)))
        refusal = inner.check(task, opt, opt.init(jax.random.key(0)), spec.estimator.inner_horizon)
        if refusal:
            raise JobSpecError(f"invalid job spec:\n  tasks.{i}.family: {refusal}")


def _check_requires(spec: JobSpec) -> None:
    """A learnable's declared needs of a task (learnables: `requires`), then its objective built,
    on one task of each family (a learnable refuses a task it cannot train on with ValueError)."""
    import jax

    from metaopt import learnables, task_zoo

    name = spec.meta_objective.name
    learnable = learnables.make(name, **spec.meta_objective.hparams)
    for i, t in enumerate(spec.tasks if getattr(learnable, "requires", ()) else ()):
        task = task_zoo.task(task_zoo.family(t.family, **t.kwargs).sample(jax.random.key(0)))
        missing = [need for need in learnable.requires if not hasattr(task, need)]
        if missing:
            raise JobSpecError(f"invalid job spec:\n  tasks.{i}.family: meta_objective {name!r} needs tasks "
                               f"that give {missing}, which family {t.family!r} does not: train it on others "
                               "(mlp, cnn, logistic)")
        try:
            learnable.objective(task, spec.estimator.inner_horizon)
        except ValueError as err:
            raise JobSpecError(f"invalid job spec:\n  tasks.{i}.family: {err}") from None


def _check_learnable(spec: JobSpec, name: str, **hparams) -> None:
    """A plugin meta-objective on a task of the job's first family, for runs of its horizon."""
    import jax

    from metaopt import learnables, task_zoo

    first = spec.tasks[0]
    task = task_zoo.task(task_zoo.family(first.family, **first.kwargs).sample(jax.random.key(0)))
    learnables.check(learnables.make(name, **hparams), task, spec.estimator.inner_horizon)


def check_job_id(job_id: str) -> str:
    """A job id names directories, Redis keys and Ray jobs: the same rule as a job name."""
    if not re.fullmatch(NAME_PATTERN.strip("^$"), job_id):
        raise JobSpecError(f"job id {job_id!r} is invalid: use lowercase letters, digits, '.', '_' and '-', "
                           "starting with a letter or digit")
    return job_id


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = re.sub(r"^Value error, ", "", e["msg"])
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_job_spec(data: Any) -> JobSpec:
    if not isinstance(data, dict):
        raise JobSpecError(f"a job spec must be a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise JobSpecError(f"invalid job spec:\n{_format(err)}") from None


INLINE_SPEC = "base64:"  # a spec given as `base64:` and its YAML's base64, not as a file (k8s.py)


def load_job_spec(path: str | pathlib.Path) -> JobSpec:
    """Read and validate a YAML job spec (a file, or INLINE_SPEC and its base64); raises
    JobSpecError with every problem listed."""
    if isinstance(path, str) and path.startswith(INLINE_SPEC):
        try:
            data = yaml.safe_load(base64.b64decode(path.removeprefix(INLINE_SPEC), validate=True))
        except (binascii.Error, UnicodeDecodeError, yaml.YAMLError) as err:
            raise JobSpecError(f"the inline job spec is not base64 of YAML: {err}") from None
        return parse_job_spec(data)
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobSpecError(f"no job spec at {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobSpecError(f"cannot read the job spec {path}: {err}") from None
    except yaml.YAMLError as err:
        raise JobSpecError(f"{path} is not valid YAML: {err}") from None
    try:
        return parse_job_spec(data)
    except JobSpecError as err:
        raise JobSpecError(f"{path}: {err}") from None
