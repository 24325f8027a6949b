"""Tampered and truncated artifacts through `metaopt pull`, `registry.pull` and `metaopt.load`
(the second half of `chaos_inputs.py`, which runs it).

A registry holds two versions of a small_fc optimizer (`NAME`:1 and :2, θ from `init`) and one of
another name; `NAME@champion` points at version 1. Each case tampers with a copy of that registry
(`ARTIFACT_KINDS`): a file of NAME:1 truncated, a byte flipped, bytes appended, a file deleted or
emptied, COMMIT.json removed, files swapped in from another artifact, COMMIT.json edited, the
manifest edited or malformed (with COMMIT.json made to match, so that only the manifest's own
checks can catch it), aliases.json damaged, or rewritten consistently while a ref pins its digest
(`pinned_rewrite`). NAME:1 is then pulled three ways with a cache of its
own, empty or already holding the other two artifacts (whose digests a swapped COMMIT.json names):
`metaopt pull` (sometimes with --dest), `registry.pull` and `metaopt.load`. Each must refuse with
an error that names the artifact and the damaged file (`CorruptArtifactError`, or
`ArtifactNotFoundError` when the version or alias no longer resolves; exit 1 or 2 and no traceback
for the command), leave the cache and --dest as they were, and still pull and load the intact
NAME:2 afterwards. Two kinds are not refusals: a damaged copy in the cache (`damaged_cache`) must
be refused by `load_path` and replaced by a verified one on the next pull; and a consistent
rewrite (`consistent_rewrite`: θ or the manifest changed with every hash that pins them rewritten
to match) asked for by NAME:1, a ref that pins nothing, cannot be told from a publish by design,
since nothing signs COMMIT.json: it is tried and reported, outside the figures that must be zero.

Figures: `artifact_cases`, `artifact_accepted` (a tampered artifact pulled or loaded, or a damaged
cache copy loaded), `cache_poisoned` (bytes of a refused artifact left in the cache or --dest, or a
damaged cache copy served), `artifact_unclear` (an error of another type, a traceback, or one that
names neither the artifact nor the damage), `intact_failed` (NAME:2 no longer pulls and loads
whole, or a damaged cache copy is not replaced), `undetectable_accepted`, `artifact_seconds`; and
`artifact_by_kind`: per kind, cases `tried`, `failures`, `variants` and a few failing `examples`.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import time
from unittest import mock

from hypothesis import strategies as st
from typer.testing import CliRunner

import metaopt
from benchmarks.chaos_common import MAPPING, WORD, by_kind, files_under, kind_stats, run_kinds
from metaopt import optimizers, registry
from metaopt.cli import app
from metaopt.storage import MARKER, CorruptArtifactError, read_committed, sha256_hex

NAME, OTHER, ALIAS = "fuzz-opt", "other-opt", "champion"
HPARAMS = {"hidden": 8, "hidden_layers": 1}
THETA, MANIFEST = registry.THETA_FILE, registry.MANIFEST_FILE
FILES = (THETA, MANIFEST, MARKER)
HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
NOT_INT = st.one_of(WORD, st.lists(st.integers(), max_size=2), st.none(), MAPPING)  # int() refuses these


class Tamper:
    """What a case did to NAME:1 (or to aliases.json, or to the cache: `cache`), and what a clear
    refusal names. `refuse`: False where accepting is by design (see the module docstring)."""

    def __init__(self, variant, names=FILES, ref=f"{NAME}:1", refuse=True, cache=None, dest=False):
        self.variant, self.names, self.ref, self.refuse, self.cache, self.dest = (
            variant, tuple(names), ref, refuse, cache, dest)


def _contents(path: pathlib.Path | None) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in files_under(path)} if path else {}


def _dir(reg: pathlib.Path, name=NAME, version=1) -> pathlib.Path:
    return reg / name / str(version)


def _json(path: pathlib.Path):
    return json.loads(path.read_bytes())


def _write_json(path: pathlib.Path, value, indent=2) -> None:
    path.write_bytes(json.dumps(value, indent=indent, sort_keys=path.name == MARKER).encode())


def _rehash(vdir: pathlib.Path, *fnames: str) -> None:
    """Make COMMIT.json match `fnames` as they now are: the rewrite nothing below it can see."""
    marker = _json(vdir / MARKER)
    for fname in fnames:
        data = (vdir / fname).read_bytes()
        marker["files"][fname] = {"sha256": sha256_hex(data), "size": len(data)}
    _write_json(vdir / MARKER, marker)


def _named(fname: str) -> tuple[str, ...]:
    return FILES if fname == MARKER else (fname,)  # a bad marker may show as a mismatch of any file


def _files_span(marker: bytes) -> range:
    """Byte positions of COMMIT.json's file table, `{...}` after "files":."""
    start = marker.index(b'"files": {') + len(b'"files": ')
    depth = 0
    for i in range(start, len(marker)):
        depth += {ord("{"): 1, ord("}"): -1}.get(marker[i], 0)
        if depth == 0:
            return range(start, i + 1)
    raise ValueError("COMMIT.json has no file table")


def truncate(draw, reg):
    fname = draw(st.sampled_from(FILES))
    path = _dir(reg) / fname
    data = path.read_bytes()  # JSON without trailing whitespace: any cut leaves it broken
    path.write_bytes(data[:draw(st.integers(0, len(data) - 1))])
    return Tamper(fname, _named(fname), dest=draw(st.booleans()))


def flip_byte(draw, reg):
    fname = draw(st.sampled_from(FILES))
    path = _dir(reg) / fname
    data = bytearray(path.read_bytes())
    # In COMMIT.json only the file table pins content, and whitespace there means nothing.
    positions = range(len(data)) if fname != MARKER else [
        i for i in _files_span(bytes(data)) if data[i] not in b" \n\r\t"]
    at = draw(st.sampled_from(positions))
    data[at] ^= draw(st.integers(1, 255))
    path.write_bytes(bytes(data))
    return Tamper(fname, _named(fname), dest=draw(st.booleans()))


def append_bytes(draw, reg):
    fname = draw(st.sampled_from(FILES))
    extra = draw(st.binary(min_size=1, max_size=64))
    if fname == MARKER and not extra.strip():
        extra += b"x"  # trailing whitespace would leave the JSON as it was
    path = _dir(reg) / fname
    path.write_bytes(path.read_bytes() + extra)
    return Tamper(fname, _named(fname), dest=draw(st.booleans()))


def delete_file(draw, reg):
    fname = draw(st.sampled_from([THETA, MANIFEST]))
    (_dir(reg) / fname).unlink()
    return Tamper(fname, (fname,), dest=draw(st.booleans()))


def emptied_file(draw, reg):
    fname = draw(st.sampled_from(FILES))
    (_dir(reg) / fname).write_bytes(b"")
    return Tamper(fname, _named(fname), dest=draw(st.booleans()))


def remove_marker(draw, reg):
    marker = _dir(reg) / MARKER
    renamed = draw(st.sampled_from([None, "COMMIT.json.bak", "commit.json", ".COMMIT.json"]))
    if renamed is None:
        marker.unlink()
    else:
        marker.rename(marker.with_name(renamed))
    return Tamper(renamed or "deleted", ("not in", MARKER), dest=draw(st.booleans()))


def swap_file(draw, reg):
    source = _dir(reg, *draw(st.sampled_from([(NAME, 2), (OTHER, 1)])))
    fnames = sorted(draw(st.sets(st.sampled_from(FILES), min_size=1)))
    for fname in fnames:
        shutil.copyfile(source / fname, _dir(reg) / fname)
    return Tamper(f"{source.parent.name}:{source.name}/{'+'.join(fnames)}", dest=draw(st.booleans()))


def edit_marker(draw, reg):
    path = _dir(reg) / MARKER
    marker = _json(path)
    fname = draw(st.sampled_from([THETA, MANIFEST]))
    entry = marker["files"][fname]
    variant = draw(st.sampled_from(["sha256", "size", "drop_entry", "extra_entry", "path_entry",
                                    "files_type", "entry_type", "format", "not_object"]))
    if variant == "sha256":
        entry["sha256"] = draw(HEX.filter(lambda h: h != entry["sha256"]))
    elif variant == "size":
        entry["size"] = draw(st.integers(-2**40, 2**40).filter(lambda n: n != entry["size"]))
    elif variant == "drop_entry":
        del marker["files"][fname]
    elif variant == "extra_entry":  # a file the directory does not have
        extra = draw(st.from_regex(r"[a-z][a-z0-9_]{0,8}\.bin", fullmatch=True))
        marker["files"][extra] = {"sha256": draw(HEX), "size": draw(st.integers(0, 2**20))}
    elif variant == "path_entry":  # a name that would reach outside the directory
        escape = draw(st.sampled_from([f"../{fname}", f"../../{NAME}/2/{fname}", "/etc/hostname", "sub/x"]))
        marker["files"][escape] = marker["files"].pop(fname)
    elif variant == "files_type":
        marker["files"] = draw(st.one_of(st.lists(st.text(max_size=5), max_size=2), st.text(max_size=5),
                                         st.none(), st.integers()))
    elif variant == "entry_type":
        marker["files"][fname] = draw(st.sampled_from([
            "x", [entry["sha256"], entry["size"]], {"sha256": entry["sha256"]}, {"size": entry["size"]},
            {"sha256": 1, "size": entry["size"]}, {"sha256": entry["sha256"], "size": str(entry["size"])}]))
    elif variant == "format":
        marker["format"] = draw(st.one_of(st.text(max_size=20), st.none(), st.integers()).filter(
            lambda f: f != marker["format"]))
    else:
        marker = draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=10), st.none()))
    _write_json(path, marker)
    return Tamper(variant, dest=draw(st.booleans()))


def _rewrite_manifest(draw, reg, variant: str) -> Tamper:
    """The manifest changed by `variant` and COMMIT.json made to match: only the manifest's own
    checks (name, version, θ's hash, arrays, shapes, dtypes, optimizer) can refuse it."""
    vdir = _dir(reg)
    m = _json(vdir / MANIFEST)
    structure = m["theta_structure"]
    entry = structure[draw(st.integers(0, len(structure) - 1))]
    if variant == "name":
        m["name"] = draw(st.text(max_size=20).filter(lambda n: n != NAME))
    elif variant == "version":
        m["version"] = draw(st.one_of(st.integers().filter(lambda v: v != 1), st.just("1"), st.none()))
    elif variant == "theta_sha256":
        m["files"][THETA]["sha256"] = draw(HEX.filter(lambda h: h != m["files"][THETA]["sha256"]))
    elif variant == "structure_drop":
        structure.remove(entry)
    elif variant == "structure_add":
        structure.append({"path": entry["path"] + "_extra", "shape": [2], "dtype": "float32"})
    elif variant == "structure_path":
        entry["path"] = draw(st.text(max_size=20).filter(lambda p: p != entry["path"]))
    elif variant == "structure_shape":
        entry["shape"] = draw(st.lists(st.integers(0, 64), max_size=3).filter(lambda s: s != entry["shape"]))
    elif variant == "structure_dtype":
        dtypes = ["float64", "float16", "bfloat16", "int32", "bool", "x"]
        entry["dtype"] = draw(st.sampled_from(dtypes).filter(lambda d: d != entry["dtype"]))
    elif variant == "theta_entry":
        m["files"][THETA] = draw(st.sampled_from([None, "x", 5, [], {}, {"size": 1}]))
    elif variant == "files":
        m["files"] = draw(st.sampled_from([None, [], "x", {}]))
    elif variant in ("structure_no_shape", "structure_no_dtype"):
        del entry[variant.removeprefix("structure_no_")]
    elif variant == "structure_shape_type":
        entry["shape"] = draw(st.sampled_from([None, 8, "8", {"n": 8}]))
    elif variant == "optimizer":
        m["optimizer"] = draw(st.sampled_from([None, "small_fc", ["small_fc"], {}]))
    elif variant == "optimizer_name":
        m["optimizer"]["name"] = draw(st.sampled_from([None, 5, ["small_fc"], {}]))
    elif variant == "optimizer_hparams":
        m["optimizer"]["hparams"] = draw(st.sampled_from([None, 5, "hidden=8", [8]]))
    elif variant == "not_object":
        m = draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=10), st.none(),
                           st.integers()))
    if variant == "not_json":
        data = (vdir / MANIFEST).read_bytes()
        (vdir / MANIFEST).write_bytes(data[:draw(st.integers(0, len(data) - 1))])
    else:
        _write_json(vdir / MANIFEST, m)
    _rehash(vdir, MANIFEST)
    return Tamper(variant, (MANIFEST, THETA), dest=draw(st.booleans()))


def edit_manifest(draw, reg):
    """A well-formed manifest that says something else than the artifact: another name or version,
    θ's hash, θ's arrays, shapes or dtypes."""
    return _rewrite_manifest(draw, reg, draw(st.sampled_from([
        "name", "version", "theta_sha256", "structure_drop", "structure_add", "structure_path",
        "structure_shape", "structure_dtype"])))


def malformed_manifest(draw, reg):
    """A manifest with a field of the wrong type or missing, or no JSON object at all."""
    return _rewrite_manifest(draw, reg, draw(st.sampled_from([
        "theta_entry", "files", "structure_no_shape", "structure_no_dtype", "structure_shape_type",
        "optimizer", "optimizer_name", "optimizer_hparams", "not_object", "not_json"])))


def aliases_file(draw, reg):
    path = reg / NAME / registry.ALIASES_FILE
    variant = draw(st.sampled_from(["truncated", "not_object", "not_a_version", "no_such_version",
                                    "wrong_digest", "gone"]))
    if variant == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:draw(st.integers(0, len(data) - 1))])
    else:
        table = {"not_object": draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=9),
                                              st.none(), st.integers())),
                 "not_a_version": {ALIAS: draw(NOT_INT)},
                 "no_such_version": {ALIAS: draw(st.integers().filter(lambda v: v not in (1, 2)))},
                 "wrong_digest": {ALIAS: {"version": 1, "digest": "sha256:" + draw(HEX)}},
                 "gone": {"stable": 2}}[variant]
        _write_json(path, table)
    return Tamper(variant, (registry.ALIASES_FILE, ALIAS, "not in"), ref=f"{NAME}@{ALIAS}",
                  dest=draw(st.booleans()))


def damaged_cache(draw, reg):
    """Not a refusal: the copy in the cache is damaged (after a good pull); `load_path` must refuse
    it and the next pull must replace it with a verified one."""
    variant = draw(st.sampled_from(["truncate", "flip", "empty", "delete", "no_marker", "marker_sha256"]))
    fname, at = draw(st.sampled_from([THETA, MANIFEST])), draw(st.integers(0, 2**32))
    return Tamper(variant, refuse=False, cache=(variant, fname, at, draw(st.sampled_from(["cli", "pull"]))))


def consistent_rewrite(draw, reg):
    """Undetectable by design when the ref pins nothing: θ (another artifact's, same structure) or
    the provenance changed, with the manifest's hash of θ and COMMIT.json rewritten to match."""
    vdir = _dir(reg)
    m = _json(vdir / MANIFEST)
    variant = draw(st.sampled_from(["theta", "provenance"]))
    if variant == "theta":
        shutil.copyfile(_dir(reg, NAME, 2) / THETA, vdir / THETA)
        data = (vdir / THETA).read_bytes()
        m["files"][THETA] = {"sha256": sha256_hex(data), "size": len(data)}
    else:
        m["provenance"] = {"job_id": draw(WORD), "outer_steps": draw(st.integers(0, 10**6))}
    _write_json(vdir / MANIFEST, m)
    _rehash(vdir, THETA, MANIFEST)
    return Tamper(variant, refuse=False)


def pinned_rewrite(draw, reg):
    """The consistent rewrite, asked for by a ref that pins NAME:1's digest: `NAME@sha256:…` or the
    alias, which recorded the digest when it was set. Refused, naming the digest it was pinned to."""
    pinned = registry.digest(str(reg), NAME, 1)
    rewrite = consistent_rewrite(draw, reg)
    ref = draw(st.sampled_from([f"{NAME}@{ALIAS}", f"{NAME}@{pinned}"]))
    how = "alias" if ref.endswith(ALIAS) else "digest"
    return Tamper(f"{rewrite.variant} by {how}", (pinned,), ref=ref, dest=draw(st.booleans()))


ARTIFACT_KINDS = {f.__name__: f for f in (
    truncate, flip_byte, append_bytes, delete_file, emptied_file, remove_marker, swap_file, edit_marker,
    edit_manifest, malformed_manifest, aliases_file, damaged_cache, consistent_rewrite, pinned_rewrite)}


def _damage(path: pathlib.Path, variant: str, fname: str, at: int) -> None:
    target = path / fname
    data = bytearray(target.read_bytes())
    if variant == "truncate":
        target.write_bytes(bytes(data[:at % len(data)]))
    elif variant == "flip":
        data[at % len(data)] ^= 1 + at % 255
        target.write_bytes(bytes(data))
    elif variant == "empty":
        target.write_bytes(b"")
    elif variant == "delete":
        target.unlink()
    elif variant == "no_marker":
        (path / MARKER).unlink()
    else:
        marker = _json(path / MARKER)
        marker["files"][fname]["sha256"] = "0" * 64
        _write_json(path / MARKER, marker)


class _ArtifactFuzzer:
    def __init__(self, workdir: pathlib.Path, seed: int):
        import jax

        self.workdir = workdir
        self.pristine = workdir / "pristine"
        opt = optimizers.make("small_fc", **HPARAMS)
        thetas = [opt.init(jax.random.key(seed + i)) for i in range(2)]
        provenance = {"job_id": "chaos-inputs", "outer_steps": 0}
        for name, theta in ((NAME, thetas[0]), (NAME, thetas[1]), (OTHER, thetas[1])):
            registry.publish(str(self.pristine), name, "small_fc", HPARAMS, theta, provenance)
        registry.set_alias(str(self.pristine), NAME, 1, ALIAS)
        self.files = {v: read_committed(str(_dir(self.pristine, NAME, v)))[0] for v in (1, 2)}
        self.stats = {kind: kind_stats() for kind in ARTIFACT_KINDS}
        self.totals = collections.Counter()

    def case(self, kind, make, draw) -> None:
        n = self.totals["cases"]
        self.totals["cases"] += 1
        root = self.workdir / "cases" / str(n)
        reg = root / "registry"
        shutil.copytree(self.pristine, reg)
        tamper = make(draw, reg)
        warm = not tamper.cache and draw(st.booleans())
        problems: dict[str, list[str]] = collections.defaultdict(list)
        try:
            with mock.patch.dict(os.environ, {"METAOPT_REGISTRY_CACHE": str(root / "cache")}):
                if tamper.cache:
                    self._damaged_cache(reg, tamper, problems)
                else:
                    # A warm cache holds the other artifacts, whose digests a swapped COMMIT.json names.
                    for ref in (f"{NAME}:2", f"{OTHER}:1") if warm else ():
                        registry.pull(ref, str(reg))
                    self._pulls(reg, root / "dest" if tamper.dest else None, tamper, problems)
                self._intact(reg, problems)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        s = self.stats[kind]
        s["tried"] += 1
        s["variants"][tamper.variant] += 1
        for figure, found in problems.items():
            self.totals[figure] += bool(found)
        if any(v for k, v in problems.items() if k != "undetectable_accepted"):
            s["failures"] += 1
            s["examples"].append({"variant": tamper.variant, "problems": dict(problems)})

    def _attempts(self, ref: str, reg: pathlib.Path, dest: pathlib.Path | None):
        """(how, call) for the three ways to get an artifact; call() -> (accepted, message, clear)."""
        def cli():
            result = CliRunner().invoke(app, ["pull", ref, "--registry", str(reg),
                                              *(["--dest", str(dest)] if dest else [])])
            if result.exit_code == 0:
                return True, result.stdout.strip(), True
            clean = isinstance(result.exception, SystemExit) and "Traceback" not in result.output
            return False, f"exit {result.exit_code}: {result.stderr.strip() or result.exception!r}", clean

        def direct(call):
            try:
                return True, repr(call()), True
            except (CorruptArtifactError, registry.ArtifactNotFoundError) as err:
                return False, str(err), True
            except Exception as err:  # any other error is one a person cannot act on
                return False, f"{type(err).__name__}: {err}", False

        yield "metaopt pull", cli
        where = str(dest) if dest else None
        yield "registry.pull", lambda: direct(lambda: registry.pull(ref, str(reg), where))
        yield "metaopt.load", lambda: direct(lambda: metaopt.load(ref, str(reg)))

    def _pulls(self, reg, dest, tamper: Tamper, problems) -> None:
        cache = pathlib.Path(os.environ["METAOPT_REGISTRY_CACHE"])
        before = _contents(cache)
        for how, call in self._attempts(tamper.ref, reg, dest):
            accepted, message, clean = call()
            if accepted:
                figure = "artifact_accepted" if tamper.refuse else "undetectable_accepted"
                problems[figure].append(f"{how} accepted {tamper.ref}: {message[:200]}")
            elif not clean or NAME not in message or not any(n in message for n in tamper.names):
                problems["artifact_unclear"].append(f"{how}: {message[:300]}")
        left = [p for p, data in (_contents(cache) | _contents(dest)).items() if before.get(p) != data]
        if tamper.refuse and left:
            problems["cache_poisoned"].append(f"refused, yet wrote {left[:4]}")

    def _damaged_cache(self, reg, tamper: Tamper, problems) -> None:
        variant, fname, at, via = tamper.cache
        cached = pathlib.Path(registry.pull(tamper.ref, str(reg)))
        _damage(cached, variant, fname, at)
        try:
            registry.load_path(str(cached))
            problems["artifact_accepted"].append(f"load_path took a damaged cache copy ({variant} {fname})")
        except CorruptArtifactError:
            pass
        except Exception as err:
            problems["artifact_unclear"].append(f"load_path: {type(err).__name__}: {err}")
        how, call = list(self._attempts(tamper.ref, reg, None))[0 if via == "cli" else 1]
        accepted, message, _ = call()
        if not accepted:
            problems["intact_failed"].append(f"{how} after a damaged cache copy: {message[:300]}")
            return
        files = read_committed(str(cached))[0]
        if files != self.files[1]:
            problems["cache_poisoned"].append(f"{how} served the damaged cache copy ({variant} {fname})")

    def _intact(self, reg, problems) -> None:
        """NAME:2 still pulls and loads whole after the refusal."""
        try:
            files = read_committed(registry.pull(f"{NAME}:2", str(reg)))[0]
            loaded = metaopt.load(f"{NAME}:2", str(reg))
            if files != self.files[2] or loaded.version != 2:
                problems["intact_failed"].append("NAME:2 came back different")
        except Exception as err:
            problems["intact_failed"].append(f"NAME:2: {type(err).__name__}: {err}")


def fuzz_artifacts(examples: int, seed: int, workdir: pathlib.Path) -> dict:
    """`examples` tampered artifacts (hypothesis, seeded) pulled and loaded; the figures this
    module's docstring describes. Failures are counted, never raised."""
    started_at = time.perf_counter()
    fuzzer = _ArtifactFuzzer(pathlib.Path(workdir), seed)
    run_kinds(ARTIFACT_KINDS, examples, seed, fuzzer.case)
    t = fuzzer.totals
    return {"artifact_cases": t["cases"], "artifact_accepted": t["artifact_accepted"],
            "cache_poisoned": t["cache_poisoned"], "artifact_unclear": t["artifact_unclear"],
            "intact_failed": t["intact_failed"], "undetectable_accepted": t["undetectable_accepted"],
            "artifact_seconds": round(time.perf_counter() - started_at, 2),
            "artifact_by_kind": by_kind(fuzzer.stats)}
