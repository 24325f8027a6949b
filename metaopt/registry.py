"""The registry of trained optimizers: immutable, hash-verified, versioned artifacts.

Layout under a registry root URI (any fsspec URI or local path):

    NAME/VERSION/theta.safetensors   θ, flat "/"-joined keys
    NAME/VERSION/manifest.json       name, version, optimizer {name, hparams}, theta_structure,
                                     provenance, created_at, files {name: {sha256, size}}
    NAME/VERSION/COMMIT.json         written last; sha256 of both files (see metaopt.storage)

Versions count 1, 2, … and are never overwritten. A local pull cache uses the same layout, so
the cache root is itself a registry that `load` can read offline.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import safetensors.numpy
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError

from metaopt.storage import (
    CorruptArtifactError,
    contiguous,
    flatten_tree,
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
    "TrainedOptimizer",
    "aliases",
    "default_cache_dir",
    "list_names",
    "list_versions",
    "load",
    "parse_ref",
    "publish",
    "pull",
    "resolve",
    "set_alias",
]

THETA_FILE = "theta.safetensors"
MANIFEST_FILE = "manifest.json"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_REF_FORMS = "NAME, NAME:VERSION, NAME:latest or NAME@ALIAS (NAME like 'my-opt.v2', VERSION like 3)"
ALIASES_FILE = "aliases.json"  # NAME/aliases.json: {alias: version}; aliases move, versions don't


class ArtifactNotFoundError(LookupError):
    """The requested name or version is not in the registry."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 128 or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid optimizer name {name!r}: use lowercase letters, digits, '_', '.', '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return name


def _join(root: str, *parts: Any) -> str:
    return "/".join([root.rstrip("/"), *map(str, parts)])


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """ "NAME" / "NAME:latest" -> (NAME, None); "NAME:VERSION" -> (NAME, VERSION);
    "NAME@ALIAS" -> (NAME, "ALIAS")."""
    if not isinstance(ref, str) or ref.count(":") + ref.count("@") > 1:
        raise ValueError(f"invalid registry ref {ref!r}; accepted forms: {_REF_FORMS}")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if not _NAME_RE.fullmatch(name) or not _valid_alias(alias):
            raise ValueError(f"invalid registry ref {ref!r}; accepted forms: {_REF_FORMS}")
        return name, alias
    name, _, version = ref.partition(":")
    if not _NAME_RE.fullmatch(name) or len(name) > 128:
        raise ValueError(f"invalid name in registry ref {ref!r}; accepted forms: {_REF_FORMS}")
    if not _ or version == "latest":
        return name, None
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(
            f"invalid version {version!r} in registry ref {ref!r}: versions are positive "
            f"integers; accepted forms: {_REF_FORMS}"
        )
    return name, int(version)


def _valid_alias(alias: str) -> bool:
    return bool(_NAME_RE.fullmatch(alias)) and not alias.isdigit() and alias != "latest"


def aliases(registry_uri: str, name: str) -> dict[str, int]:
    """{alias: version} of `name` (empty if it has none)."""
    fs, path = url_to_fs(_join(registry_uri, name, ALIASES_FILE))
    if not fs.exists(path):
        return {}
    try:
        table = json.loads(fs.cat_file(path))
        return {str(k): int(v) for k, v in table.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise CorruptArtifactError(f"{_join(registry_uri, name, ALIASES_FILE)} is unreadable ({err}); "
                                   "set the aliases again with set_alias") from None


def set_alias(registry_uri: str, name: str, version: int, alias: str) -> None:
    """Point `name@alias` at an existing version (aliases move; versions never change).
    One writer at a time: concurrent alias updates of one name may lose one of them."""
    if not _valid_alias(alias):
        raise ValueError(f"invalid alias {alias!r}: like a name ({_NAME_RE.pattern}), not a number "
                         "and not 'latest'")
    if version not in list_versions(registry_uri, name):
        raise ArtifactNotFoundError(f"{name}:{version} is not in {registry_uri}; available versions: "
                                    f"{list_versions(registry_uri, name)}")
    table = aliases(registry_uri, name) | {alias: int(version)}
    fs, path = url_to_fs(_join(registry_uri, name, ALIASES_FILE))
    data = json.dumps(table, indent=2, sort_keys=True).encode()
    if isinstance(fs, LocalFileSystem):  # write aside, then rename over: never half-written
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:  # object stores replace a whole object at once
        fs.pipe_file(path, data)


def _numeric_dirs(registry_uri: str, name: str) -> list[int]:
    # Every NAME/<int> directory, committed or not: a new version must skip all of them.
    return sorted(
        int(d) for d in list_subdirs(_join(registry_uri, name)) if _VERSION_RE.fullmatch(d)
    )


def list_versions(registry_uri: str, name: str) -> list[int]:
    """Committed versions of `name`, ascending (uncommitted ones are invisible)."""
    _check_name(name)
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


def resolve(registry_uri: str, ref: str) -> tuple[str, int]:
    """(name, version) for `ref`; no version means the newest committed version."""
    name, version = parse_ref(ref)
    if isinstance(version, str):
        table = aliases(registry_uri, name)
        if version not in table:
            raise ArtifactNotFoundError(f"{name} has no alias {version!r} in {registry_uri}; "
                                        f"its aliases: {sorted(table) or 'none'}")
        version = table[version]
    versions = list_versions(registry_uri, name)
    if not versions:
        raise ArtifactNotFoundError(
            f"no published optimizer named {name!r} in {registry_uri}; "
            f"available names: {list_names(registry_uri) or 'none'}"
        )
    if version is None:
        return name, versions[-1]
    if version not in versions:
        raise ArtifactNotFoundError(
            f"{name}:{version} is not in {registry_uri}; available versions: {versions}"
        )
    return name, version


def publish(
    registry_uri: str,
    name: str,
    optimizer_name: str,
    hparams: dict[str, Any],
    theta: Any,
    provenance: dict[str, Any],
) -> str:
    """Publish θ as the next version of `name`; return its ref "NAME:VERSION".

    Fails with FileExistsError (never overwrites) if another publisher takes the same version.
    """
    _check_name(name)
    if not isinstance(optimizer_name, str) or not optimizer_name:
        raise ValueError(f"optimizer_name must be a non-empty string, got {optimizer_name!r}")
    for what, value in (("hparams", hparams), ("provenance", provenance)):
        if not isinstance(value, dict):
            raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what} is not JSON-serialisable ({e}); pass plain types") from e

    flat = flatten_tree(theta)
    theta_bytes = safetensors.numpy.save(contiguous(flat))
    existing = _numeric_dirs(registry_uri, name)
    version = (existing[-1] if existing else 0) + 1
    manifest = {
        "name": name,
        "version": version,
        "optimizer": {"name": optimizer_name, "hparams": hparams},
        "theta_structure": tree_structure(theta),
        "provenance": provenance,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "files": {THETA_FILE: {"sha256": sha256_hex(theta_bytes), "size": len(theta_bytes)}},
    }
    files = {THETA_FILE: theta_bytes, MANIFEST_FILE: json.dumps(manifest, indent=2).encode()}
    uri = _join(registry_uri, name, version)
    try:
        write_committed(uri, files, {"kind": "metaopt.registry", "name": name, "version": version})
    except FileExistsError as e:
        raise FileExistsError(
            f"{name}:{version} was published concurrently by someone else; nothing was "
            "overwritten: publish again to get the next version"
        ) from e
    return f"{name}:{version}"


def default_cache_dir() -> str:
    """Root of the local pull cache: $METAOPT_REGISTRY_CACHE or ~/.cache/metaopt/registry."""
    return os.environ.get("METAOPT_REGISTRY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "metaopt", "registry"
    )


def pull(ref: str, registry_uri: str, dest_dir: str | None = None) -> str:
    """Copy an artifact into local `dest_dir` (default: the cache's NAME/VERSION), verified.

    A valid copy already there is reused; a damaged one is replaced.
    """
    name, version = resolve(registry_uri, ref)
    src = _join(registry_uri, name, version)
    dest = dest_dir or os.path.join(default_cache_dir(), name, str(version))
    wanted = read_marker(src)["files"]
    _refuse_foreign_directory(dest)
    try:
        if read_marker(dest)["files"] == wanted:
            read_committed(dest)  # verify the cached bytes, not only the marker
            return dest
    except (FileNotFoundError, CorruptArtifactError):
        pass  # absent or damaged: fetch again
    try:
        files, meta = read_committed(src)
    except CorruptArtifactError as e:
        raise CorruptArtifactError(
            f"{e} (re-publish {name} if the registry copy is damaged)"
        ) from e
    write_committed(dest, files, meta, overwrite=True)
    read_committed(dest)  # verify what landed on disk
    return dest


def _refuse_foreign_directory(dest: str) -> None:
    """A pull replaces an earlier (maybe damaged) pull, but never a folder of someone else's."""
    fs, path = url_to_fs(dest)
    if fs.exists(path) and fs.ls(path) and not is_committed(dest):
        raise ValueError(
            f"{dest} exists, is not empty and holds no pulled artifact; pull into a new or empty "
            "directory (its files would be replaced)"
        )


@dataclass(frozen=True, eq=False)
class TrainedOptimizer:
    """A published optimizer loaded into memory; `as_optax` turns it into an optax optimizer."""

    name: str
    version: int
    optimizer_name: str
    hparams: dict[str, Any]
    theta: Any  # nested dicts of numpy arrays
    manifest: dict[str, Any] = field(repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def as_optax(self, num_steps: int):
        """optax.GradientTransformationExtraArgs applying θ for an inner run of `num_steps`."""
        # Lazy imports: the registry must be usable (list, pull) without importing JAX models.
        import jax
        import jax.numpy as jnp

        from metaopt.optimizers import make

        opt = make(self.optimizer_name, **self.hparams)
        return opt.as_optax(jax.tree.map(jnp.asarray, self.theta), num_steps)


def _corrupt(uri: str, fname: str, why: str) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"{uri}/{fname} {why}; the artifact is damaged: re-pull it, or re-publish it if the "
        "registry copy itself is bad"
    )


def load(ref: str, registry: str) -> TrainedOptimizer:
    """Read, verify and rebuild the artifact `ref` from `registry` (a registry root URI)."""
    name, version = resolve(registry, ref)
    uri = _join(registry, name, version)
    try:
        files, _ = read_committed(uri)
    except CorruptArtifactError as e:
        raise CorruptArtifactError(f"{e} (re-pull, or re-publish {name}:{version})") from e
    for fname in (THETA_FILE, MANIFEST_FILE):
        if fname not in files:
            raise _corrupt(uri, fname, "is missing")
    try:
        manifest = json.loads(files[MANIFEST_FILE])
        opt_name = manifest["optimizer"]["name"]
        hparams = manifest["optimizer"]["hparams"]
        structure = {s["path"]: s for s in manifest["theta_structure"]}
        claimed = manifest["files"][THETA_FILE]
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(uri, MANIFEST_FILE, f"is not a valid manifest ({e!r})") from e
    if manifest.get("name") != name or manifest.get("version") != version:
        raise _corrupt(
            uri,
            MANIFEST_FILE,
            f"describes {manifest.get('name')}:{manifest.get('version')}, not {name}:{version}",
        )
    if claimed.get("sha256") != sha256_hex(files[THETA_FILE]):
        raise _corrupt(uri, THETA_FILE, "does not match the sha256 in manifest.json")
    try:
        flat = safetensors.numpy.load(files[THETA_FILE])
    except SafetensorError as e:
        raise _corrupt(uri, THETA_FILE, f"is unreadable ({e})") from e
    if set(flat) != set(structure):
        raise _corrupt(
            uri,
            THETA_FILE,
            f"has arrays {sorted(flat)} but manifest.json lists {sorted(structure)}",
        )
    for path, arr in flat.items():
        want = structure[path]
        if list(arr.shape) != list(want["shape"]) or str(arr.dtype) != want["dtype"]:
            raise _corrupt(
                uri,
                THETA_FILE,
                f"array {path!r} is {arr.dtype}{list(arr.shape)} "
                f"but manifest.json says {want['dtype']}{want['shape']}",
            )
    return TrainedOptimizer(name, version, opt_name, hparams, unflatten_tree(flat), manifest)
