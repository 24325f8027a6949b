"""The registry of trained optimizers: immutable, hash-verified, versioned artifacts.

Layout under a registry root URI (any fsspec URI or local path):

    NAME/VERSION/theta.safetensors   θ, flat "/"-joined keys
    NAME/VERSION/manifest.json       name, version, optimizer {name, hparams}, theta_structure,
                                     provenance, created_at, files {name: {sha256, size}}
    NAME/VERSION/COMMIT.json         written last; sha256 of both files (see metaopt.storage)
    NAME/VERSION/.claim              object stores only: written first, by the one publisher
                                     that may write this version (see metaopt.storage)
    NAME/aliases.json                {alias: {version, digest}}, e.g. {"champion": {"version": 3,
                                     "digest": "sha256:…"}} (older registries: {alias: version})

Versions count 1, 2, … and are never overwritten. Aliases move: `latest` is always the newest
committed version (it moves by itself on every publish); the others (`champion`, …) move only
when `set_alias` points them elsewhere.

Pinned by digest. An artifact's DIGEST (`digest`) is the sha256 of its COMMIT.json file table,
so it covers every byte of every file. Every file's sha256 is checked against that table, but a
rewrite that changes θ and every sha256 to match would pass those checks; a digest held outside
the artifact would not. As OCI registries do, a ref may pin one: `NAME@sha256:HEX` resolves to
the version with that digest and is refused if no version has it. Each alias records the digest
of the version it was set to, and resolving it refuses a version whose digest has changed since,
naming both digests; job records store the digest of what a run published.

Pulls go through a local cache keyed by content, not by name: CACHE/sha256/DIGEST, where DIGEST
is the sha256 of the artifact's COMMIT.json file table (the sha256 and size of every file). The
same NAME:VERSION of two registries can never collide there, identical artifacts are stored
once, and a hit (cached bytes present and verified) reads only the registry's small COMMIT.json.
`load` from a remote (non-local) registry goes through the cache too.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import safetensors.numpy
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError

from metaopt import plugins
from metaopt.storage import (
    CorruptArtifactError,
    contiguous,
    flatten_tree,
    fresh_fs,
    is_committed,
    list_subdirs,
    read_committed,
    read_marker,
    sha256_hex,
    tree_structure,
    unflatten_tree,
    write_committed,
)

__all__ = [
    "ArtifactNotFoundError",
    "CorruptArtifactError",
    "LATEST",
    "TrainedOptimizer",
    "aliases",
    "check_name",
    "content_digest",
    "digest",
    "default_cache_dir",
    "default_registry",
    "list_names",
    "list_versions",
    "load",
    "load_path",
    "parse_ref",
    "publish",
    "pull",
    "read_manifest",
    "resolve",
    "set_alias",
]

THETA_FILE = "theta.safetensors"
MANIFEST_FILE = "manifest.json"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_REF_FORMS = ("NAME, NAME:VERSION, NAME:latest, NAME@ALIAS or NAME@sha256:DIGEST (NAME like "
              "'my-opt.v2', VERSION like 3, DIGEST 64 hex digits, as `metaopt registry list NAME` shows)")
ALIASES_FILE = "aliases.json"  # NAME/aliases.json: {alias: {version, digest}}; aliases move, versions don't
LATEST = "latest"  # the alias of the newest version: computed, never stored, never set by hand
DEFAULT_REGISTRY = "runs/registry"  # what `metaopt train` writes under its default --out runs


class ArtifactNotFoundError(LookupError):
    """The requested name or version is not in the registry."""


def check_name(name: str) -> str:
    """`name` if it is a valid optimizer name in a registry, else ValueError saying why."""
    if not isinstance(name, str) or len(name) > 128 or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid optimizer name {name!r}: use lowercase letters, digits, '_', '.', '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return name


def _join(root: str, *parts: Any) -> str:
    return "/".join([root.rstrip("/"), *map(str, parts)])


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """ "NAME" / "NAME:latest" / "NAME@latest" -> (NAME, None); "NAME:VERSION" -> (NAME, VERSION);
    "NAME@ALIAS" -> (NAME, "ALIAS"); "NAME@sha256:HEX" -> (NAME, "sha256:HEX")."""
    if isinstance(ref, str) and "@sha256:" in ref:
        name, _, pinned = ref.partition("@")
        if not _NAME_RE.fullmatch(name) or len(name) > 128 or not _DIGEST_RE.fullmatch(pinned):
            raise ValueError(f"invalid registry ref {ref!r}: a digest is 'sha256:' and 64 lowercase hex "
                             f"digits; accepted forms: {_REF_FORMS}")
        return name, pinned
    if not isinstance(ref, str) or ref.count(":") + ref.count("@") > 1:
        raise ValueError(f"invalid registry ref {ref!r}; accepted forms: {_REF_FORMS}")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if not _NAME_RE.fullmatch(name) or not (alias == LATEST or _valid_alias(alias)):
            raise ValueError(f"invalid registry ref {ref!r}; accepted forms: {_REF_FORMS}")
        return (name, None) if alias == LATEST else (name, alias)
    name, _, version = ref.partition(":")
    if not _NAME_RE.fullmatch(name) or len(name) > 128:
        raise ValueError(f"invalid name in registry ref {ref!r}; accepted forms: {_REF_FORMS}")
    if not _ or version == LATEST:
        return name, None
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(
            f"invalid version {version!r} in registry ref {ref!r}: versions are positive "
            f"integers; accepted forms: {_REF_FORMS}"
        )
    return name, int(version)


def _valid_alias(alias: str) -> bool:
    return (isinstance(alias, str) and len(alias) <= 128 and bool(_NAME_RE.fullmatch(alias))
            and not alias.isdigit() and alias != LATEST)


def _check_alias(alias: str) -> str:
    if alias == LATEST:
        raise ValueError(f"alias {LATEST!r} cannot be set: it is always the newest version and moves by "
                         "itself on every publish; pick another alias, e.g. 'champion'")
    if not _valid_alias(alias):
        raise ValueError(f"invalid alias {alias!r}: use lowercase letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit), not only digits, e.g. 'champion'")
    return alias


def _stored_aliases(registry_uri: str, name: str) -> dict[str, tuple[int, str | None]]:
    """{alias: (version, the digest it was set to, or None in a registry from before digests)}."""
    fs, path = fresh_fs(_join(registry_uri, name, ALIASES_FILE))
    if not fs.exists(path):
        return {}
    try:
        table = json.loads(fs.cat_file(path))
        entries = {str(k): (int(v), None) if isinstance(v, int) else (int(v["version"]), v["digest"])
                   for k, v in table.items() if k != LATEST}
        for alias, (_, pinned) in entries.items():
            if pinned is not None and not (isinstance(pinned, str) and _DIGEST_RE.fullmatch(pinned)):
                raise ValueError(f"alias {alias!r} records digest {pinned!r}, not sha256:HEX")
        return entries
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise CorruptArtifactError(f"{_join(registry_uri, name, ALIASES_FILE)} is unreadable ({err!r}); "
                                   "set the aliases again with set_alias") from None


def aliases(registry_uri: str, name: str) -> dict[str, int]:
    """{alias: version} of `name`, `latest` (the newest version) included; empty if none."""
    table = {alias: version for alias, (version, _) in _stored_aliases(registry_uri, name).items()}
    versions = list_versions(registry_uri, name)
    return table | {LATEST: versions[-1]} if versions else table


def set_alias(registry_uri: str, name: str, version: int, alias: str) -> int | None:
    """Point `name@alias` at an existing version (aliases move; versions never change); return
    the version it pointed at before (None if it is new). `latest` moves by itself and cannot
    be set. One writer at a time: concurrent alias updates of one name may lose one of them."""
    check_name(name)
    _check_alias(alias)
    versions = list_versions(registry_uri, name)
    if not versions:
        raise ArtifactNotFoundError(f"no published optimizer named {name!r} in {registry_uri}; "
                                    f"available names: {list_names(registry_uri) or 'none'}")
    if isinstance(version, bool) or version not in versions:
        raise ArtifactNotFoundError(f"{name}:{version} is not in {registry_uri}; available versions: "
                                    f"{versions}")
    table = _stored_aliases(registry_uri, name)
    previous = table.get(alias, (None, None))[0]
    table[alias] = (int(version), digest(registry_uri, name, version))
    fs, path = fresh_fs(_join(registry_uri, name, ALIASES_FILE))
    data = json.dumps({a: {"version": v, "digest": d} for a, (v, d) in table.items()},
                      indent=2, sort_keys=True).encode()
    if isinstance(fs, LocalFileSystem):  # write aside, then rename over: never half-written
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:  # object stores replace a whole object at once
        fs.pipe_file(path, data)
    return previous


def _numeric_dirs(registry_uri: str, name: str) -> list[int]:
    # Every NAME/<int> directory, committed or not: a new version must skip all of them.
    return sorted(
        int(d) for d in list_subdirs(_join(registry_uri, name)) if _VERSION_RE.fullmatch(d)
    )


def list_versions(registry_uri: str, name: str) -> list[int]:
    """Committed versions of `name`, ascending (uncommitted ones are invisible)."""
    check_name(name)
    return [
        v for v in _numeric_dirs(registry_uri, name) if is_committed(_join(registry_uri, name, v))
    ]


def list_names(registry_uri: str) -> list[str]:
    """Names with at least one committed version, sorted."""
    return [
        d
        for d in list_subdirs(registry_uri)
        if _NAME_RE.fullmatch(d) and list_versions(registry_uri, d)
    ]


def digest(registry_uri: str, name: str, version: int) -> str:
    """"sha256:HEX", the content digest of NAME:VERSION (see the module docstring)."""
    try:
        table = read_marker(_join(registry_uri, check_name(name), version))["files"]
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"{name}:{version} is not in {registry_uri}") from None
    return "sha256:" + content_digest(table)


def resolve(registry_uri: str, ref: str) -> tuple[str, int]:
    """(name, version) for `ref`; no version (or `latest`) means the newest committed version. A
    digest resolves to the version that has it; an alias, to its version if that still has the
    digest the alias recorded (both refused with the digests named otherwise)."""
    return _resolve_pinned(registry_uri, ref)[:2]


def _resolve_pinned(registry_uri: str, ref: str) -> tuple[str, int, str | None]:
    """(name, version, the digest the ref pins it to, or None)."""
    name, version = parse_ref(ref)
    if isinstance(version, str) and _DIGEST_RE.fullmatch(version):
        return _find_digest(registry_uri, name, version)
    pinned = None
    if isinstance(version, str):
        table = _stored_aliases(registry_uri, name)
        if version not in table:
            raise ArtifactNotFoundError(f"{name} has no alias {version!r} in {registry_uri}; "
                                        f"its aliases: {sorted(table) + [LATEST]}")
        alias = version
        version, pinned = table[alias]
        if pinned is not None:
            _check_digest(name, version, pinned, digest(registry_uri, name, version), f"{name}@{alias}")
    versions = list_versions(registry_uri, name)
    if not versions:
        raise ArtifactNotFoundError(
            f"no published optimizer named {name!r} in {registry_uri}; "
            f"available names: {list_names(registry_uri) or 'none'}"
        )
    if version is None:
        return name, versions[-1], None
    if version not in versions:
        raise ArtifactNotFoundError(
            f"{name}:{version} is not in {registry_uri}; available versions: {versions}"
        )
    return name, version, pinned


def _find_digest(registry_uri: str, name: str, pinned: str) -> tuple[str, int, str]:
    found = {v: digest(registry_uri, name, v) for v in list_versions(registry_uri, name)}
    for version, d in found.items():
        if d == pinned:
            return name, version, pinned
    listed = ", ".join(f"{name}:{v} {d}" for v, d in found.items()) or "none"
    raise ArtifactNotFoundError(f"no version of {name!r} in {registry_uri} has digest {pinned} (an "
                                f"artifact rewritten since it was pinned has another); its versions: "
                                f"{listed}")


def _check_digest(name: str, version: int, pinned: str | None, actual: str, what: str) -> None:
    """Refuse NAME:VERSION, whose digest is `actual`, if `what` pinned it to another (None: nothing
    pinned)."""
    if pinned is not None and actual != pinned:
        raise CorruptArtifactError(
            f"{what} was pinned to {name}:{version} with digest {pinned}, but {name}:{version} now has "
            f"digest {actual}: the artifact was rewritten after it was pinned; do not use it. Re-publish "
            f"the optimizer as a new version, or point the alias again if the rewrite is trusted")


def read_manifest(registry_uri: str, name: str, version: int) -> dict[str, Any]:
    """The manifest of NAME:VERSION, checked against its COMMIT.json (θ itself is not read)."""
    uri = _join(registry_uri, check_name(name), version)
    try:
        marker = read_marker(uri)
    except FileNotFoundError:
        raise ArtifactNotFoundError(f"{name}:{version} is not in {registry_uri}") from None
    fs, path = fresh_fs(_join(uri, MANIFEST_FILE))
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise _corrupt(uri, MANIFEST_FILE, "is missing") from None
    if sha256_hex(data) != marker["files"].get(MANIFEST_FILE, {}).get("sha256"):
        raise _corrupt(uri, MANIFEST_FILE, "does not match its sha256 in COMMIT.json")
    try:
        return json.loads(data)
    except ValueError as e:
        raise _corrupt(uri, MANIFEST_FILE, f"is not JSON ({e})") from e


def publish(
    registry_uri: str,
    name: str,
    optimizer_name: str,
    hparams: dict[str, Any],
    theta: Any,
    provenance: dict[str, Any],
    aliases: Sequence[str] = (),
    kind: str = "optimizer",
) -> str:
    """Publish θ as the next version of `name`, then point `aliases` at it; return "NAME:VERSION".
    `kind`: what θ parameterises (metaopt/learnables.py), `optimizer_name` and `hparams` what
    rebuilds it: an optimizer's (the manifest's `optimizer`) or another learnable's (`learned`).

    Never overwrites: a version taken meanwhile by another publisher is skipped for the next one
    (FileExistsError after a few such races). `latest` moves to the new version by itself.
    """
    check_name(name)
    for alias in aliases:
        _check_alias(alias)  # before publishing: a bad alias must not leave a half-done publish
    if not isinstance(optimizer_name, str) or not optimizer_name:
        raise ValueError(f"optimizer_name must be a non-empty string, got {optimizer_name!r}")
    for what, value in (("hparams", hparams), ("provenance", provenance)):
        if not isinstance(value, dict):
            raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what} is not JSON-serialisable ({e}); pass plain types") from e

    optimizer = {"name": optimizer_name, "hparams": hparams}
    if plugins.is_import_path(optimizer_name):  # what loading it needs installed (never shipped)
        optimizer["plugin"] = plugins.record(optimizer_name)
    flat = flatten_tree(theta)
    theta_bytes = safetensors.numpy.save(contiguous(flat))
    for attempt in range(_PUBLISH_ATTEMPTS):
        existing = _numeric_dirs(registry_uri, name)
        version = (existing[-1] if existing else 0) + 1
        manifest = {
            "name": name,
            "version": version,
            "kind": kind,
            _record_key(kind): optimizer,
            "theta_structure": tree_structure(theta),
            "provenance": provenance,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
            "files": {THETA_FILE: {"sha256": sha256_hex(theta_bytes), "size": len(theta_bytes)}},
        }
        files = {THETA_FILE: theta_bytes, MANIFEST_FILE: json.dumps(manifest, indent=2).encode()}
        try:
            write_committed(_join(registry_uri, name, version), files,
                            {"kind": "metaopt.registry", "name": name, "version": version})
            break
        except FileExistsError as e:
            if attempt + 1 == _PUBLISH_ATTEMPTS:
                raise FileExistsError(
                    f"{name}:{version} was published concurrently by someone else; nothing was "
                    "overwritten: publish again to get the next version"
                ) from e
    for alias in aliases:
        set_alias(registry_uri, name, version, alias)
    return f"{name}:{version}"


_PUBLISH_ATTEMPTS = 3


# --------------------------------------------------------------------------------------------
# Pulling, through the cache


def default_registry() -> str:
    """The registry used when none is given: $METAOPT_REGISTRY, else runs/registry."""
    return os.environ.get("METAOPT_REGISTRY") or DEFAULT_REGISTRY


def default_cache_dir() -> str:
    """Root of the local pull cache: $METAOPT_REGISTRY_CACHE or ~/.cache/metaopt/registry."""
    return os.environ.get("METAOPT_REGISTRY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "metaopt", "registry"
    )


def content_digest(file_table: dict[str, Any]) -> str:
    """sha256 of a COMMIT.json file table {file: {sha256, size}}: names an artifact's content.

    The manifest (hashed in that table) holds the name, version, θ's hash and the creation time,
    so two artifacts share a digest only if every byte of every file is the same."""
    table = {f: {"sha256": i["sha256"], "size": i["size"]} for f, i in file_table.items()}
    return sha256_hex(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())


def _cache_path(digest: str) -> str:
    return os.path.join(default_cache_dir(), "sha256", digest)


def pull(ref: str, registry_uri: str, dest_dir: str | None = None) -> str:
    """Copy an artifact, verified, into local `dest_dir` (default: the cache); return its path.

    Only the registry's COMMIT.json is read when the content is already in the cache (or in
    `dest_dir`) and verifies; a damaged copy is replaced.
    """
    name, version, pinned = _resolve_pinned(registry_uri, ref)
    return _pull_resolved(registry_uri, name, version, dest_dir, pinned)[0]


def _pull_resolved(registry_uri: str, name: str, version: int, dest_dir: str | None = None,
                   pinned: str | None = None) -> tuple[str, dict[str, bytes]]:
    """(local path, verified files) of NAME:VERSION, whose digest must be `pinned` if given."""
    src = _join(registry_uri, name, version)
    try:
        wanted = read_marker(src)["files"]
    except CorruptArtifactError as e:
        raise CorruptArtifactError(f"{e} (re-publish {name} if the registry copy is damaged)") from e
    _check_digest(name, version, pinned, "sha256:" + content_digest(wanted), f"{name}:{version}")
    cached = _cache_path(content_digest(wanted))
    if dest_dir is not None:
        _refuse_foreign_directory(dest_dir)
        files = _holding(dest_dir, wanted, name, version)
        if files is not None:
            return dest_dir, files
    files = _holding(cached, wanted, name, version)
    if files is not None and dest_dir is None:
        return cached, files
    if files is None:  # a miss: fetch from the registry
        try:
            files, meta = read_committed(src)
        except CorruptArtifactError as e:
            raise CorruptArtifactError(
                f"{e} (re-publish {name} if the registry copy is damaged)"
            ) from e
        _check_artifact(files, src, name, version, "re-publish it")
    else:
        meta = read_marker(cached).get("meta", {})
    dest = dest_dir or cached
    try:
        write_committed(dest, files, meta, overwrite=True)
    except (FileExistsError, FileNotFoundError):
        # Another process filled the same cache entry at the same moment: use theirs if good.
        if _holding(dest, wanted, name, version) is None:
            raise
    read_committed(dest)  # verify what landed on disk
    return dest, files


def _holding(local: str, wanted: dict[str, Any], name: str, version: int) -> dict[str, bytes] | None:
    """The files of a verified local copy of the artifact whose file table is `wanted`, or None
    (absent, or damaged: to be fetched again)."""
    try:
        if read_marker(local)["files"] != wanted:
            return None
        files, _ = read_committed(local)  # the bytes, not only the marker
        _check_artifact(files, local, name, version, "re-pull it")
        return files
    except (FileNotFoundError, CorruptArtifactError):
        return None


def _refuse_foreign_directory(dest: str) -> None:
    """A pull replaces an earlier (maybe damaged) pull, but never a folder of someone else's."""
    fs, path = fresh_fs(dest)
    if fs.exists(path) and fs.ls(path) and not is_committed(dest):
        raise ValueError(
            f"{dest} exists, is not empty and holds no pulled artifact; pull into a new or empty "
            "directory (its files would be replaced)"
        )


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True, eq=False)
class TrainedOptimizer:
    """A published optimizer loaded into memory; `as_optax` turns it into an optax optimizer.
    An artifact of another kind (a learned schedule, ...) offers its learnable's uses instead:
    `as_schedule(num_steps)`, ..., with θ filled in (metaopt/learnables.py)."""

    name: str
    version: int
    optimizer_name: str  # what rebuilds it: an optimizer's name, or another learnable's
    hparams: dict[str, Any]
    theta: Any  # nested dicts of numpy arrays
    manifest: dict[str, Any] = field(repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def kind(self) -> str:
        """What θ parameterises: "optimizer" (artifacts that say nothing are), "schedule", ..."""
        return self.manifest.get("kind", OPTIMIZER)

    def as_optax(self, num_steps: int, **options: Any):
        """optax.GradientTransformationExtraArgs applying θ for an inner run of `num_steps`.

        `options` go to the optimizer's own `as_optax`, for those that take more (for example
        `learning_rate=` of nominal_mlp: a rate or an optax schedule); others refuse them."""
        if self.kind != OPTIMIZER:  # a learnable whose use is an optimizer (Adam under a schedule)
            return self._use("as_optax", num_steps, **options)
        from metaopt.optimizers import make  # lazy: the registry lists and pulls without JAX models

        self._check_plugin()
        return make(self.optimizer_name, **self.hparams).as_optax(self._theta(), num_steps, **options)

    def __getattr__(self, attribute: str):
        if attribute.startswith("as_"):  # as_schedule, as_loss, ...: the learnable's uses
            return functools.partial(self._use, attribute)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")

    def _use(self, method: str, *args: Any, **kwargs: Any):
        if self.kind == OPTIMIZER:
            raise AttributeError(f"{self.ref} holds an optimizer ({self.optimizer_name}): use "
                                 f".as_optax(num_steps) (or metaopt.torch); it has no .{method}")
        from metaopt import learnables

        self._check_plugin()
        learnable = learnables.make(self.optimizer_name, **self.hparams)
        if not hasattr(learnable, method):
            uses = sorted(m for m in dir(learnable) if m.startswith("as_"))
            raise AttributeError(f"{self.ref} holds a {self.kind} ({self.optimizer_name}), which offers "
                                 f"{uses}, not .{method}")
        return getattr(learnable, method)(self._theta(), *args, **kwargs)

    def _check_plugin(self) -> None:
        record = self.manifest.get(_record_key(self.kind), {})
        if "plugin" in record:
            plugins.check_recorded(record["plugin"], self.ref)

    def _theta(self):
        import jax
        import jax.numpy as jnp

        return jax.tree.map(jnp.asarray, self.theta)


def _corrupt(uri: str, fname: str, why: str, fix: str = "") -> CorruptArtifactError:
    fix = fix or "re-pull it, or re-publish it if the registry copy itself is bad"
    return CorruptArtifactError(f"{uri}/{fname} {why}; the artifact is damaged: {fix}")


OPTIMIZER = "optimizer"  # the kind of an artifact whose manifest names none: all before kinds


def _record_key(kind: str) -> str:
    """Where a manifest keeps what rebuilds its object: `optimizer` for an optimizer, as ever."""
    return "optimizer" if kind == OPTIMIZER else "learned"


def _check_artifact(files: dict[str, bytes], uri: str, name: str | None, version: int | None,
                    fix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, flat θ) of an artifact's files whose bytes match COMMIT.json, after checking
    that the manifest describes NAME:VERSION (if given) and θ's hash, arrays, shapes and dtypes."""
    for fname in (THETA_FILE, MANIFEST_FILE):
        if fname not in files:
            raise _corrupt(uri, fname, "is missing", fix)
    try:
        manifest = json.loads(files[MANIFEST_FILE])
        optimizer = manifest[_record_key(manifest.get("kind", OPTIMIZER))]
        if not isinstance(optimizer["name"], str) or not isinstance(optimizer["hparams"], dict):
            raise TypeError(f"optimizer is {optimizer!r}, not {{name: str, hparams: dict}}")
        structure = {s["path"]: (list(s["shape"]), str(s["dtype"])) for s in manifest["theta_structure"]}
        claimed = manifest["files"][THETA_FILE]["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(uri, MANIFEST_FILE, f"is not a valid manifest ({e!r})", fix) from e
    if name is not None and (manifest.get("name") != name or manifest.get("version") != version):
        raise _corrupt(
            uri,
            MANIFEST_FILE,
            f"describes {manifest.get('name')}:{manifest.get('version')}, not {name}:{version}",
            fix,
        )
    if claimed != sha256_hex(files[THETA_FILE]):
        raise _corrupt(uri, THETA_FILE, "does not match the sha256 in manifest.json", fix)
    try:
        flat = safetensors.numpy.load(files[THETA_FILE])
    except SafetensorError as e:
        raise _corrupt(uri, THETA_FILE, f"is unreadable ({e})", fix) from e
    if set(flat) != set(structure):
        raise _corrupt(
            uri,
            THETA_FILE,
            f"has arrays {sorted(flat)} but manifest.json lists {sorted(structure)}",
            fix,
        )
    for path, arr in flat.items():
        shape, dtype = structure[path]
        if list(arr.shape) != shape or str(arr.dtype) != dtype:
            raise _corrupt(
                uri,
                THETA_FILE,
                f"array {path!r} is {arr.dtype}{list(arr.shape)} but manifest.json says {dtype}{shape}",
                fix,
            )
    return manifest, flat


def _trained(manifest: dict[str, Any], flat: dict[str, Any]) -> TrainedOptimizer:
    opt = manifest[_record_key(manifest.get("kind", OPTIMIZER))]
    return TrainedOptimizer(manifest["name"], manifest["version"], opt["name"], opt["hparams"],
                            unflatten_tree(flat), manifest)


def load(ref: str, registry: str | None = None) -> TrainedOptimizer:
    """Read, verify and rebuild the artifact `ref` from `registry` (a registry root URI; default
    `default_registry()`). From a remote registry, through the local cache: loading the same
    artifact twice downloads it once."""
    registry = registry or default_registry()
    name, version, pinned = _resolve_pinned(registry, ref)
    uri = _join(registry, name, version)
    if not isinstance(fresh_fs(uri)[0], LocalFileSystem):
        uri, files = _pull_resolved(registry, name, version, pinned=pinned)
        return _trained(*_check_artifact(files, uri, name, version))
    try:
        files, _ = read_committed(uri)
    except CorruptArtifactError as e:
        raise CorruptArtifactError(f"{e} (re-pull, or re-publish {name}:{version})") from e
    # The files match COMMIT.json; a pinned ref also needs COMMIT.json to be the one it pinned.
    if pinned is not None:
        _check_digest(name, version, pinned, digest(registry, name, version), ref)
    return _trained(*_check_artifact(files, uri, name, version))


def load_path(uri: str) -> TrainedOptimizer:
    """Read, verify and rebuild the artifact directory at `uri`, e.g. the path `pull` returned."""
    try:
        files, _ = read_committed(uri)
    except CorruptArtifactError as e:
        raise CorruptArtifactError(f"{e} (pull it again)") from e
    return _trained(*_check_artifact(files, uri, None, None, "pull it again"))
