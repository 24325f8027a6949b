"""Invalid job specs through `metaopt train` and `metaopt submit` (the first half of
`chaos_inputs.py`, which runs it).

hypothesis (seeded) breaks a valid spec (`BASE_SPEC`) in one way per case, each way invalid by the
rules `metaopt.jobspec` states (bounds, types, names, extra keys forbidden), never by asking the
model whether it is: `SPEC_KINDS` are wrong types, out-of-range numbers (NaN included), fields
that contradict each other, unknown keys, missing fields, unknown families, optimizers and
settings, bad names and job ids, a password (or another scheme) in storage.job_store, YAML that is
no mapping, empty files, non-UTF-8 and control bytes, truncated YAML, an unclosed quote, a path
that is no file, and a bad --max-outer-steps. Every case goes to both commands in process (typer's
CliRunner): `metaopt train SPEC --out DIR` and
`metaopt submit SPEC --address http://127.0.0.1:PORT` with PORT closed. Each must exit 2 with one
paragraph on stderr that names the problem (the field's path, or what is wrong with the file), no
traceback, no secret echoed, and nothing started: the training entry point is never reached (a
guard stands in for it, so a spec let through is counted, never run), --out stays empty, Ray is
not initialised, and submit never asks for the cluster (a spy on `metaopt.submit.client`; on a
closed port a contact would end in exit 1, not 2).

Figures: `spec_cases`, `spec_started` (a case that exited 0, reached training, wrote to --out,
initialised Ray or asked the cluster), `spec_unclear` (a wrong exit code, a traceback, an empty
message, one that does not name the problem or runs over a paragraph), `secrets_echoed`,
`training_reached`, `cluster_contacts`, `spec_seconds`; and `spec_by_kind`: per kind, cases
`tried`, `failures`, `variants` and a few failing `examples`.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import pathlib
import re
import socket
import sys
import time
from unittest import mock

import yaml
from hypothesis import strategies as st
from typer.testing import CliRunner

import metaopt.submit
import metaopt.train
from benchmarks.chaos_common import MAPPING, WORD, by_kind, files_under, kind_stats, run_kinds
from metaopt import jobspec, optimizers, task_zoo
from metaopt.cli import app
from metaopt.evaluation import suite_names

# tests/data/e2e.yaml with every section spelled out, so that each has something to break. It has
# no '"' (see unclosed_quote) and `tasks` comes before every other section but name and seed.
BASE_SPEC = """\
# A valid job spec: every case breaks it in one way.
name: fuzz
seed: 0
tasks:
  - family: quadratic
    weight: 1.0
    kwargs: {dims: [8], noise: [0.0, 0.1]}
    augment: {param_scale: [0.5, 2.0], grad_noise: [0.0, 0.1]}
task_balance: weight
optimizer: {name: small_fc, hparams: {hidden: 16}}
estimator: {kind: pes, num_particles: 4, truncation_length: 10, inner_horizon: 50, sigma: 0.01,
  loss_normalization: initial, max_loss_ratio: 10.0, min_loss_ratio: 1.0e-6,
  truncations_per_task: 5, stagger: false}
outer: {learning_rate: 0.05, clip_norm: 1.0, meta_batch_size: 2, max_staleness: 2,
  max_estimate_norm: 1.0e6, max_in_flight: 2}
workers: {count: 2, cpus: 1.0, gpus: 0.0}
stop: {max_outer_steps: 40, max_minutes: 5.0}
checkpoint_interval_s: 5
storage: {job_store: 'redis://metaopt@127.0.0.1:6379/0', job_store_prefix: metaopt}
artifact_name: fuzz-opt
eval: {suite: smoke, every_minutes: 10.0, seeds: 1, publish: last}
"""
BASE = yaml.safe_load(BASE_SPEC)
T0 = ("tasks", 0)
# What jobspec.py declares at each path; "?": None is allowed there.
FIELDS = {
    ("name",): "str", ("seed",): "int", ("tasks",): "list", T0: "section", (*T0, "family"): "str",
    (*T0, "weight"): "float", (*T0, "kwargs"): "dict", (*T0, "augment"): "section?",
    (*T0, "augment", "param_scale"): "pair", (*T0, "augment", "grad_noise"): "pair",
    ("task_balance",): "str", ("optimizer",): "section", ("optimizer", "name"): "str",
    ("optimizer", "hparams"): "dict", ("estimator",): "section", ("estimator", "kind"): "str",
    ("estimator", "num_particles"): "int", ("estimator", "truncation_length"): "int",
    ("estimator", "inner_horizon"): "int", ("estimator", "sigma"): "float",
    ("estimator", "loss_normalization"): "str", ("estimator", "max_loss_ratio"): "float",
    ("estimator", "min_loss_ratio"): "float", ("estimator", "truncations_per_task"): "int?",
    ("estimator", "stagger"): "bool", ("outer",): "section", ("outer", "learning_rate"): "float",
    ("outer", "clip_norm"): "float", ("outer", "meta_batch_size"): "int", ("outer", "max_staleness"): "int",
    ("outer", "max_estimate_norm"): "float", ("outer", "max_in_flight"): "int", ("workers",): "section",
    ("workers", "count"): "int", ("workers", "cpus"): "float", ("workers", "gpus"): "float",
    ("stop",): "section", ("stop", "max_outer_steps"): "int", ("stop", "max_minutes"): "float?",
    ("checkpoint_interval_s",): "float", ("storage",): "section", ("storage", "root"): "str?",
    ("storage", "job_store"): "str?", ("storage", "job_store_prefix"): "str", ("artifact_name",): "str?",
    ("eval",): "section?", ("eval", "suite"): "str", ("eval", "every_minutes"): "float",
    ("eval", "seeds"): "int", ("eval", "publish"): "str",
}
AT_LEAST = {("estimator", "num_particles"): 1, ("estimator", "truncation_length"): 1,  # ge= of int fields
            ("estimator", "inner_horizon"): 1, ("estimator", "truncations_per_task"): 1,
            ("outer", "meta_batch_size"): 1, ("outer", "max_staleness"): 0, ("outer", "max_in_flight"): 1,
            ("workers", "count"): 1, ("stop", "max_outer_steps"): 1, ("eval", "seeds"): 1}
ABOVE_ZERO = [(*T0, "weight"), ("estimator", "sigma"), ("estimator", "max_loss_ratio"),  # gt=0 floats
              ("estimator", "min_loss_ratio"), ("outer", "learning_rate"), ("outer", "clip_norm"),
              ("outer", "max_estimate_norm"), ("workers", "cpus"), ("stop", "max_minutes"),
              ("checkpoint_interval_s",), ("eval", "every_minutes")]
MODELS = {(): jobspec.JobSpec, T0: jobspec.TaskMix, (*T0, "augment"): jobspec.AugmentSpec,
          ("optimizer",): jobspec.OptimizerSpec, ("estimator",): jobspec.EstimatorSpec,
          ("outer",): jobspec.OuterSpec, ("workers",): jobspec.WorkersSpec, ("stop",): jobspec.StopSpec,
          ("storage",): jobspec.StorageSpec, ("eval",): jobspec.EvalSpec}
CHOICES = {(*T0, "family"): set(task_zoo.families()), ("optimizer", "name"): set(optimizers.names()),
           ("estimator", "kind"): {"pes", "truncated_es", "full_es", "tbptt"},
           ("estimator", "loss_normalization"): {"initial", "log", "none"},
           ("task_balance",): {"weight", "cost"}, ("eval", "suite"): set(suite_names()),
           ("eval", "publish"): {"last", "best"}}
LIST = st.lists(st.integers(-9, 9), max_size=3)
FRACTION = st.floats(-1e6, 1e6).filter(lambda x: not x.is_integer())
WRONG = {"int": [LIST, MAPPING, WORD, FRACTION], "float": [LIST, MAPPING, WORD],
         "str": [LIST, MAPPING, st.integers(), st.floats()], "bool": [LIST, MAPPING, WORD, FRACTION],
         "section": [LIST, WORD, st.integers()], "dict": [LIST, WORD, st.integers()],
         "list": [MAPPING, WORD, st.integers()],
         "pair": [WORD, st.integers(), st.lists(st.floats(0.1, 9), max_size=1),
                  st.lists(st.floats(0.1, 9), min_size=3, max_size=4)]}
NAME_CORE = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,10}", fullmatch=True)
BAD_PREFIX_CHARS = list(" /:@!*#\\'\"é\t\n") + ["\u00a0"]  # never in a name, job id or prefix
BAD_NAME_CHARS = [*BAD_PREFIX_CHARS, "A", "B", "Z"]  # prefixes may have capitals, names may not
SECRET = st.text("0123456789abcdef", min_size=12, max_size=12).map(lambda s: f"pw{s}")
# Any text YAML carries faithfully: PyYAML folds line breaks (\x85, \u2028, ...) inside quoted scalars.
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20)


class SpecCase:
    """One invalid input: the spec file's bytes (or a path that is no file) and extra arguments.
    A clear refusal names one of `fields` (as jobspec prints a field's path) or `phrases`."""

    def __init__(self, variant, data=None, fields=(), phrases=(), args=(), path="file", secret=None,
                 what=None):
        self.variant, self.data, self.args, self.path, self.secret = variant, data, tuple(args), path, secret
        self.what = what  # the change, for people reading a failure (default: the file's start)
        self.fields = tuple(".".join(map(str, f)) if isinstance(f, tuple) else f for f in fields)
        self.phrases = tuple(phrases)

    def named(self, message: str) -> bool:
        return any(p in message for p in self.phrases) or any(
            re.search(rf"(^|\s){re.escape(f)}[.:]", message, re.M) for f in self.fields)


def _dump(tree) -> bytes:
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    same = json.dumps(yaml.safe_load(text), default=str) == json.dumps(tree, default=str)  # NaN is "NaN"
    assert same, f"the fuzzer's YAML does not read back as written: {text!r}"
    return text.encode()


def _set(tree, path, value):
    tree = copy.deepcopy(tree)
    node = tree
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


_DELETE = object()


def _mutated(variant, path, value, fields=None, **kw) -> SpecCase:
    what = f"{'.'.join(map(str, path))}: " + ("(deleted)" if value is _DELETE else repr(value))
    return SpecCase(variant, _dump(_set(BASE, path, value)), fields=fields or [path], what=what, **kw)


def wrong_type(draw):
    path, kind = draw(st.sampled_from(sorted(FIELDS.items())))
    options = WRONG[kind.rstrip("?")] + ([] if kind.endswith("?") else [st.none()])
    return _mutated(kind.rstrip("?"), path, draw(st.one_of(options)))


def out_of_range(draw):
    variant = draw(st.sampled_from(["int_below", "not_above_zero", "negative_gpus", "no_tasks"]))
    if variant == "no_tasks":
        return _mutated(variant, ("tasks",), [])
    if variant == "int_below":
        path = draw(st.sampled_from(sorted(AT_LEAST)))
        return _mutated(variant, path, draw(st.integers(max_value=AT_LEAST[path] - 1)))
    below = st.floats(max_value=0.0) if variant == "not_above_zero" else st.floats(max_value=0.0).filter(
        lambda x: x < 0)
    path = draw(st.sampled_from(ABOVE_ZERO)) if variant == "not_above_zero" else ("workers", "gpus")
    return _mutated(variant, path, draw(st.one_of(below, st.just(math.nan))))


def inconsistent(draw):
    variant = draw(st.sampled_from(["truncation_over_horizon", "loss_ratios", "augment", "duplicate_family"]))
    spec = copy.deepcopy(BASE)
    if variant == "truncation_over_horizon":
        horizon = draw(st.integers(1, 1000))
        truncation = draw(st.integers(horizon + 1, 2000))
        spec["estimator"] |= {"inner_horizon": horizon, "truncation_length": truncation}
        where = ["estimator"]
    elif variant == "loss_ratios":
        high = draw(st.floats(1e-9, 1e9))
        spec["estimator"] |= {"max_loss_ratio": high, "min_loss_ratio": high * draw(st.floats(1, 1e3))}
        where = ["estimator"]
    elif variant == "augment":  # Augmentation wants 0 < low <= high and 0 <= noise low <= high
        lo = draw(st.floats(1e-3, 1e3))
        bad = draw(st.sampled_from([("param_scale", [lo, lo / 2]), ("param_scale", [-lo, lo]),
                                    ("param_scale", [0.0, lo]), ("grad_noise", [lo, lo / 2]),
                                    ("grad_noise", [-lo, lo]), ("param_scale", [math.nan, lo])]))
        spec["tasks"][0]["augment"][bad[0]] = bad[1]
        where = ["tasks.0.augment"]
    else:
        spec["tasks"].append(copy.deepcopy(spec["tasks"][0]) | {"weight": draw(st.floats(0.1, 10))})
        where = ["tasks"]
    return SpecCase(variant, _dump(spec), fields=where)


def unknown_key(draw):
    section = draw(st.sampled_from(sorted(MODELS)))
    known = set(MODELS[section].model_fields)
    if known and draw(st.booleans()):  # a typo: one letter of a real field dropped or doubled
        field = draw(st.sampled_from(sorted(known)))
        i = draw(st.integers(0, len(field) - 1))
        key = field[:i] + field[i + 1:] if draw(st.booleans()) else field[:i] + field[i] + field[i:]
    else:
        key = draw(st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True))
    if key in known or not key:
        key = f"{key}_unknown"
    return _mutated("typo_or_new", (*section, key), draw(st.one_of(st.integers(), WORD)))


def missing_field(draw):
    path = draw(st.sampled_from([("name",), ("tasks",), (*T0, "family"), T0]))
    if path == T0:  # a task that is an empty mapping
        return _mutated("empty_task", T0, {}, fields=[(*T0, "family")])
    return _mutated(".".join(map(str, path)), path, _DELETE)


def unknown_name(draw):
    path = draw(st.sampled_from(sorted(CHOICES)))
    name = draw(TEXT.filter(lambda n: n not in CHOICES[path]))
    where = {(*T0, "family"): T0, ("optimizer", "name"): ("optimizer",)}.get(path, path)
    return _mutated(path[-1], path, name, fields=[where])


def unknown_setting(draw):
    key = "x_" + draw(st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True))  # no family or optimizer takes x_*
    if draw(st.booleans()):
        return _mutated("family_kwarg", (*T0, "kwargs", key), draw(st.integers()), fields=[T0])
    return _mutated("optimizer_hparam", ("optimizer", "hparams", key), draw(st.integers()),
                    fields=["optimizer"])


def _bad_name(draw, prefix=False) -> str:
    """A name against NAME_PATTERN (or a prefix against job_store_prefix's pattern): a character it
    never allows, a bad first character (names only), or nothing."""
    name = draw(NAME_CORE)
    variant = draw(st.sampled_from(["char", "empty"] if prefix else ["char", "first", "empty"]))
    if variant == "empty":
        return ""
    if variant == "first":
        return draw(st.sampled_from(list("-_."))) + name
    i = draw(st.integers(0, len(name)))
    return name[:i] + draw(st.sampled_from(BAD_PREFIX_CHARS if prefix else BAD_NAME_CHARS)) + name[i:]


def bad_name(draw):
    path = draw(st.sampled_from([("name",), ("artifact_name",), ("storage", "job_store_prefix")]))
    value = _bad_name(draw, prefix=path[-1] == "job_store_prefix")
    return _mutated(path[-1], path, value)


def bad_job_id(draw):
    return SpecCase("job_id", BASE_SPEC.encode(), phrases=["job id"], args=[f"--job-id={_bad_name(draw)}"])


def job_store_secret(draw):
    variant = draw(st.sampled_from(["password", "other_scheme", "other_scheme_with_password"]))
    secret = draw(SECRET)
    user = draw(st.sampled_from(["", "metaopt", "default"]))
    scheme = draw(st.sampled_from(["redis", "rediss"]))
    if variant != "password":
        scheme = draw(st.sampled_from(["http", "https", "postgres", "REDIS", "redis+tls", "", "unix"]))
    auth = f"{user}:{secret}@" if "password" in variant else f"{user}@"
    url = f"{scheme}://{auth}127.0.0.1:6379/0" if scheme else f"{auth}127.0.0.1:6379"
    return _mutated(variant, ("storage", "job_store"), url, secret=secret if "password" in variant else None)


def not_a_mapping(draw):
    value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.just([list(kv) for kv in BASE.items()]),
                           st.just([BASE]),
                           TEXT, st.integers(), st.floats(), st.booleans()))
    return SpecCase(type(value).__name__, _dump(value), phrases=["must be a mapping"])


def empty_file(draw):
    data = draw(st.sampled_from(["", "   \n", "\n\n", "# only a comment\n", "---\n", "~\n", "null\n"]))
    return SpecCase(repr(data), data.encode(), phrases=["must be a mapping"])


def garbage_bytes(draw):
    text = BASE_SPEC.encode()
    at = draw(st.integers(0, len(text)))
    variant = draw(st.sampled_from(["invalid_utf8", "control_char", "random", "utf16"]))
    if variant == "invalid_utf8":  # bytes that are never valid UTF-8 here (the text around is ASCII)
        bad = draw(st.sampled_from([b"\x80", b"\xbf", b"\xc0", b"\xc1", b"\xfe", b"\xff"]))
        data = text[:at] + bad + text[at:]
    elif variant == "control_char":  # characters YAML does not allow anywhere, comments included
        control = draw(st.sampled_from([*range(0, 9), 11, 12, *range(14, 32), 127]))
        data = text[:at] + bytes([control]) + text[at:]
    elif variant == "random":
        data = draw(st.binary(max_size=200)) + b"\xff" + draw(st.binary(max_size=200))
    else:
        data = BASE_SPEC.encode("utf-16")  # starts with a byte-order mark, 0xff 0xfe
    return SpecCase(variant, data, phrases=["cannot read", "not valid YAML"])


def _flow_spans(text: str) -> list[range]:
    """Cut points inside each outermost flow collection ({...} or [...]): the text up to any of
    them leaves a collection unclosed, which YAML never accepts."""
    spans, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            start = i if depth == 0 else start
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                spans.append(range(start + 1, i + 1))
    return spans


FAMILY_END = BASE_SPEC.index("family: quadratic") + len("family: quadratic")


def truncated(draw):
    # Cut before the first task's family is whole, nothing valid is left (tasks is required and
    # no prefix of "quadratic" is a family); cut inside a flow collection, the YAML is broken.
    if draw(st.booleans()):
        assert not any("quadratic".startswith(f) for f in task_zoo.families() if f != "quadratic")
        return SpecCase("before_tasks", BASE_SPEC[:draw(st.integers(0, FAMILY_END - 1))].encode(),
                        fields=["tasks"], phrases=["must be a mapping", "not valid YAML"])
    cut = draw(st.sampled_from(_flow_spans(BASE_SPEC)))
    return SpecCase("in_flow", BASE_SPEC[:draw(st.sampled_from(cut))].encode(), phrases=["not valid YAML"])


def unclosed_quote(draw):
    # A double-quoted scalar runs to the next '"'; BASE_SPEC has none, so this one never closes.
    # Only where a value starts (not in the comment on the first line, where a '"' is harmless).
    starts = [m.end() for m in re.finditer(r": |- ", BASE_SPEC) if m.start() > BASE_SPEC.index("\n")]
    at = draw(st.sampled_from(starts))
    return SpecCase("double", (BASE_SPEC[:at] + '"' + BASE_SPEC[at:]).encode(), phrases=["not valid YAML"])


def unreadable_path(draw):
    variant = draw(st.sampled_from(["missing", "dangling_link", "directory"]))
    phrase = "cannot read" if variant == "directory" else "no job spec at"
    return SpecCase(variant, path=variant, phrases=[phrase])


def bad_override(draw):
    value = draw(st.one_of(st.integers(max_value=0).map(str), WORD, FRACTION.map(repr)))
    return SpecCase("max_outer_steps", BASE_SPEC.encode(), phrases=["--max-outer-steps"],
                    args=[f"--max-outer-steps={value}"])


SPEC_KINDS = {f.__name__: f for f in (
    wrong_type, out_of_range, inconsistent, unknown_key, missing_field, unknown_name, unknown_setting,
    bad_name, bad_job_id, job_store_secret, not_a_mapping, empty_file, garbage_bytes, truncated,
    unclosed_quote, unreadable_path, bad_override)}


class _Started(Exception):
    """Raised by the guard that stands in for training: a spec got through validation."""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never imported: never initialised
    return bool(ray and ray.is_initialized())



def fuzz_job_specs(examples: int, seed: int, workdir: pathlib.Path) -> dict:
    """`examples` invalid job specs (hypothesis, seeded) through `metaopt train` and `metaopt
    submit`; the figures this module's docstring describes. Failures are counted, never raised."""
    started_at = time.perf_counter()
    workdir = pathlib.Path(workdir)
    (workdir / "specs").mkdir(parents=True, exist_ok=True)
    address = f"http://127.0.0.1:{_closed_port()}"
    stats = {kind: kind_stats() for kind in SPEC_KINDS}
    totals = collections.Counter()
    calls = collections.Counter()
    real_client = metaopt.submit.client

    def guard(*args, **kwargs):
        calls["train"] += 1
        raise _Started("metaopt train got past validation")

    def spy(address_):
        calls["cluster"] += 1
        return real_client(address_)

    def one_case(kind, make, draw):
        case = make(draw)
        n = totals["cases"]
        totals["cases"] += 1
        spec = workdir / "specs" / f"{n}.yaml"
        if case.path == "directory":
            spec.mkdir()
        elif case.path == "dangling_link":
            spec.symlink_to(workdir / "specs" / f"{n}-nowhere.yaml")
        elif case.path == "file":
            spec.write_bytes(case.data)
        started, unclear, echoed = [], [], False
        for command in ("train", "submit"):
            out = workdir / "out" / str(n)
            where = ["--out", str(out)] if command == "train" else ["--address", address]
            before = calls.copy()
            result = CliRunner().invoke(app, [command, str(spec), *where, *case.args])
            message = result.stderr.strip()
            said = f"{command}: exit {result.exit_code}: {message[:300]!r}"
            if result.exit_code == 0 or calls["train"] > before["train"]:
                started.append(f"{said} (training reached)")
            if calls["cluster"] > before["cluster"]:
                started.append(f"{said} (asked the cluster first)")
            if files_under(out) or _ray_initialized():
                started.append(f"{said} (wrote to --out or started Ray)")
            if result.exception is not None and not isinstance(result.exception, SystemExit | _Started):
                unclear.append(f"{command}: raised {type(result.exception).__name__}: {result.exception}")
            elif "Traceback" in result.output:
                unclear.append(f"{said} (traceback)")
            elif result.exit_code != 2:
                unclear.append(f"{said} (exit code not 2)")
            elif not case.named(message):
                unclear.append(f"{said} (does not name {case.fields or case.phrases})")
            elif "\n\n" in message or message.count("\n") > 25:
                unclear.append(f"{said} (more than one paragraph)")
            if case.secret and case.secret in result.output:
                echoed = True
                unclear.append(f"{command}: echoes the password {case.secret!r}")
        s = stats[kind]
        s["tried"] += 1
        s["variants"][case.variant] += 1
        totals["started"] += bool(started)
        totals["unclear"] += bool(unclear)
        totals["secrets_echoed"] += echoed
        if started or unclear:
            s["failures"] += 1
            shown = case.what or (case.data[:300].decode("utf-8", "replace") if case.data is not None
                                  else case.path)
            s["examples"].append({"variant": case.variant, "args": case.args, "spec": shown,
                                  "problems": started + unclear})

    with mock.patch.object(metaopt.train, "train", guard), mock.patch.object(metaopt.submit, "client", spy):
        run_kinds(SPEC_KINDS, examples, seed, one_case)
    return {"spec_cases": totals["cases"], "spec_started": totals["started"],
            "spec_unclear": totals["unclear"],
            "secrets_echoed": totals["secrets_echoed"], "training_reached": calls["train"],
            "cluster_contacts": calls["cluster"], "spec_seconds": round(time.perf_counter() - started_at, 2),
            "spec_by_kind": by_kind(stats)}
