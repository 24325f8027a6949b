"""Storage helpers: array trees, atomic "committed" directories and checkpoints, over fsspec.

Every URI goes through `fsspec.core.url_to_fs`, so plain paths, `file://…`, `memory://…`,
`s3://…` (s3fs, also for S3-compatible stores) and `gs://…` (gcsfs) all work.

A *committed directory* is a directory of files plus a `COMMIT.json` marker written LAST that
holds the sha256 and size of every file. Readers only trust a directory whose marker exists and
whose files all match it, so an interrupted or tampered write is never mistaken for a good one.
On local disks the directory is also built in a hidden temporary sibling and renamed into place,
so a half-written directory is never visible under its final name at all. Object stores have no
rename and need none: each object appears whole or not at all, the files go up first and the
marker last. A new directory is first claimed with a small `.claim` object, created only if
absent (`If-None-Match` on S3): only the writer that created it uploads anything, so a writer who
lost a race never overwrites the winner's files. The claim stays: readers ignore it, and a
claimant that died before its marker leaves an uncommitted directory that counts as taken.

Object stores, freshness: s3fs and gcsfs cache directory listings for the life of the process and
answer `exists`, `info`, even `cat_file` from them, so a file another process wrote after an `ls`
looks missing. Every function here therefore drops the cached listing of the directory it works
on, and listing leaves nothing cached behind.

S3-compatible stores (MinIO, Ceph, moto…): the endpoint comes from the environment, read by
botocore when s3fs makes its client, exactly as for the `aws` CLI:

    AWS_ENDPOINT_URL_S3=http://minio:9000   # S3 only; wins over AWS_ENDPOINT_URL
    AWS_ENDPOINT_URL=http://minio:9000      # every AWS service (or `endpoint_url` in ~/.aws/config)

fsspec's own settings work too: `FSSPEC_S3_ENDPOINT_URL` (read once, when fsspec is imported) or,
in-process, `fsspec.config.conf["s3"] = {"endpoint_url": …}`. Credentials come from AWS's usual
variables and files (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles), never
from job specs. s3fs keeps one client per set of arguments: a process that changes these
variables after its first s3:// call must call `s3fs.S3FileSystem.clear_instance_cache()`.

Nothing here unpickles anything: arrays are stored with safetensors, metadata as JSON.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import safetensors.numpy
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError

log = logging.getLogger(__name__)

MARKER = "COMMIT.json"
CLAIM = ".claim"  # object stores: who may write a new directory (see the module docstring)
_MARKER_FORMAT = "metaopt.committed/1"
CHECKPOINT_DIR_RE = re.compile(r"ckpt-(\d{9,})")  # ckpt-{step:09d}, as checkpoint_uri names them
ARRAYS_FILE = "arrays.safetensors"  # the one file of a checkpoint
# Protocols without real directories: `makedirs` there would create a missing *bucket*.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def retrying(write: Callable[[], Any], what: str, timeout_s: float = 60.0, max_delay_s: float = 10.0) -> Any:
    """`write()`, tried again with growing pauses while it fails, for up to `timeout_s`: a store
    that is away for a while (restarting, a network cut) delays a run's last writes instead of
    failing the run. The last error is raised once the time is up; a ValueError or TypeError
    (bad data, not a bad connection) at once."""
    deadline, delay = time.monotonic() + timeout_s, 0.5
    while True:
        try:
            return write()
        except (ValueError, TypeError):
            raise
        except Exception as err:  # fsspec's backends raise their own types (botocore's, aiohttp's)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, err, delay)
            time.sleep(delay)
            delay = min(2 * delay, max_delay_s)


class CorruptArtifactError(ValueError):
    """A stored directory is incomplete, truncated or tampered with (or its marker is missing)."""


# --------------------------------------------------------------------------------------------
# Array trees


def flatten_tree(tree: Any, _prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten nested dicts of arrays into {"a/b/c": np.ndarray}; empty sub-dicts vanish."""
    if not isinstance(tree, dict):
        raise TypeError(
            f"expected nested dicts of arrays, got {type(tree).__name__} at "
            f"{_prefix.rstrip('/') or '<root>'}; convert lists/tuples to dicts with string keys"
        )
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(
                f"tree key {key!r} under {_prefix.rstrip('/') or '<root>'} is invalid: keys must "
                "be non-empty strings without '/' (it separates levels in the flat form)"
            )
        path = _prefix + key
        if isinstance(value, dict):
            flat.update(flatten_tree(value, path + "/"))
        elif isinstance(value, list | tuple) or value is None:
            # np.asarray would quietly turn these into arrays (or object arrays) and lose the shape
            # of the tree; only dicts are containers here.
            raise TypeError(
                f"{path} is a {type(value).__name__}; expected nested dicts of arrays: "
                "convert lists/tuples to dicts with string keys"
            )
        else:
            arr = np.asarray(value)  # also accepts jax arrays and Python scalars
            if arr.dtype.kind not in "biuf":  # what safetensors can store
                raise TypeError(
                    f"{path} has dtype {arr.dtype} ({type(value).__name__}); only bool, int, "
                    "uint and float arrays can be stored"
                )
            flat[path] = arr
    return flat


def unflatten_tree(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_tree`: {"a/b": x} -> {"a": {"b": x}}."""
    tree: dict[str, Any] = {}
    for path in sorted(flat):
        parts = path.split("/")
        if not path or any(not p for p in parts):
            raise ValueError(
                f"flat key {path!r} is invalid: it must be '/'-joined non-empty names "
                "(no leading, trailing or doubled '/')"
            )
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"flat keys conflict: {'/'.join(parts[: i + 1])!r} is both an array and a "
                    f"prefix of {path!r}; rename one of them"
                )
            node = child
        if parts[-1] in node:
            raise ValueError(f"flat keys conflict: {path!r} is both an array and a prefix")
        node[parts[-1]] = flat[path]
    return tree


def tree_structure(tree: Any) -> list[dict[str, Any]]:
    """[{"path", "shape", "dtype"}] for every leaf, sorted by path (JSON-serialisable)."""
    flat = flatten_tree(tree)
    return [
        {"path": p, "shape": list(flat[p].shape), "dtype": str(flat[p].dtype)} for p in sorted(flat)
    ]


# --------------------------------------------------------------------------------------------
# Committed directories


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`, as recorded in commit markers and manifests."""
    return hashlib.sha256(data).hexdigest()


def contiguous(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-contiguous copies where needed, as safetensors requires; keeps 0-d arrays 0-d.

    (np.ascontiguousarray would promote 0-d arrays to shape (1,).)
    """
    return {k: np.require(np.asarray(v), requirements="C") for k, v in arrays.items()}


def _check_file_name(name: str) -> None:
    # Names come from markers too, which may be hostile: refuse anything that could escape the dir.
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"file name {name!r} is invalid: use a plain name without '/'")
    if name in (MARKER, CLAIM):
        raise ValueError(f"file name {name!r} is reserved for committed directories; rename it")


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def basename(path: str) -> str:
    """The last component of a path or URI ("s3://b/x/ckpt-1/" -> "ckpt-1")."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def _write_local_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # so the rename below never publishes data still only in cache


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; durability is best effort there
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_fs(uri: str) -> tuple[AbstractFileSystem, str]:
    """`url_to_fs(uri)`, minus this process's cached listing of `uri` (and of its parents).

    s3fs and gcsfs answer `exists`/`info`/`size` from a listing cached by an earlier `ls`, and
    `cat_file` asks `size` first: a file another process wrote since would look missing. Open
    every filesystem through this, not `url_to_fs`, in a process that may live long.
    """
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    return fs, path


def is_object_store(fs: AbstractFileSystem) -> bool:
    """Whether `fs` has no real directories (makedirs there would create a bucket)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return not _OBJECT_STORES.isdisjoint(protocols)


def is_committed(uri: str) -> bool:
    """Whether `uri` has a commit marker (cheap; does not verify hashes)."""
    fs, path = fresh_fs(uri)
    return fs.exists(_join(path, MARKER))


def write_committed(
    uri: str, files: dict[str, bytes], meta: dict[str, Any], *, overwrite: bool = False
) -> str:
    """Write `files` into directory `uri`, then its `COMMIT.json` marker; return `uri`.

    Without `overwrite`, an existing `uri` (committed or not) raises FileExistsError: that is how
    concurrent writers of the same immutable directory lose instead of clobbering each other.
    With `overwrite`, an existing directory is replaced (meant for a single writer).
    """
    for name in files:
        _check_file_name(name)
    marker = {
        "format": _MARKER_FORMAT,
        "files": {n: {"sha256": sha256_hex(b), "size": len(b)} for n, b in files.items()},
        "meta": meta,
        "writer": uuid.uuid4().hex,  # unique per write: a remote writer tells its claim from others'
        "committed_at": _dt.datetime.now(_dt.UTC).isoformat(),
    }
    try:
        marker_bytes = json.dumps(marker, indent=2, sort_keys=True).encode()
    except TypeError as e:
        raise TypeError(f"meta for {uri} is not JSON-serialisable ({e}); pass plain types") from e

    fs, path = fresh_fs(uri)
    if isinstance(fs, LocalFileSystem):
        _write_committed_local(path, files, marker_bytes, overwrite)
    else:
        _write_committed_remote(fs, path, files, marker_bytes, marker["writer"], overwrite)
    return uri


def _exists_error(path: str) -> FileExistsError:
    return FileExistsError(
        f"{path} already exists (written by another writer, or left over from an interrupted "
        "one); committed directories are immutable: pick a new name, or delete it if it is junk"
    )


def _write_committed_local(path: str, files: dict, marker_bytes: bytes, overwrite: bool) -> None:
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not overwrite and os.path.lexists(path):
        raise _exists_error(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        for fname, data in files.items():
            _write_local_file(os.path.join(tmp, fname), data)
        _write_local_file(os.path.join(tmp, MARKER), marker_bytes)  # marker last, even here
        _fsync_dir(tmp)
        trash = None
        if overwrite and os.path.lexists(path):
            # Move the old one aside first: rename cannot replace a non-empty directory.
            trash = os.path.join(parent, f".{name}.trash-{uuid.uuid4().hex}")
            os.rename(path, trash)
        try:
            os.rename(tmp, path)  # atomic: readers see nothing or the whole directory
        except OSError as e:
            # ENOTEMPTY/EEXIST: a concurrent writer renamed its directory in first.
            raise _exists_error(path) from e
        _fsync_dir(parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_committed_remote(fs, path, files, marker_bytes, writer, overwrite) -> None:
    # No renames here (object stores have none): the directory stays uncommitted, hence invisible
    # to readers, until its marker lands. Replacing one uncommits it first, so an interrupted
    # replacement leaves no directory that counts at this name, never a mix of old and new.
    if overwrite:
        _remove(fs, path)
    elif fs.exists(path):  # the cheap answer; racing writers can all pass it, the claim decides
        raise _exists_error(path)
    if not is_object_store(fs):
        fs.makedirs(path, exist_ok=True)
    if not overwrite:
        # Before any file: writers racing for one new directory upload the same file names, and
        # a loser's upload would overwrite the winner's files under the winner's marker. Only the
        # writer whose claim was created goes on; the claim stays (see the module docstring).
        _put_exclusive(fs, path, CLAIM, writer.encode(), create=True)
    if files:
        # Each object appears whole or not at all (a multipart upload only when completed);
        # async filesystems upload them concurrently.
        fs.pipe({_join(path, fname): data for fname, data in files.items()})
    _put_exclusive(fs, path, MARKER, marker_bytes, create=not overwrite)  # LAST: now it counts


def _put_exclusive(fs, path: str, name: str, data: bytes, *, create: bool) -> None:
    """Write `path/name`; with `create`, only if absent (atomic on S3 and GCS), else FileExistsError."""
    key = _join(path, name)
    try:
        fs.pipe_file(key, data, mode="create" if create else "overwrite")
    except FileExistsError:
        raise _exists_error(path) from None
    # For stores that ignore the precondition: the last write wins there, and a writer whose
    # object was replaced by another's fails loudly instead of carrying on.
    if fs.cat_file(key) != data:
        raise _exists_error(path)


def _remove(fs: AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(_join(path, MARKER))  # first: from here on the directory no longer counts
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def remove_committed(uri: str) -> None:
    """Delete a committed directory, marker first so it is never seen half-deleted as valid."""
    _remove(*fresh_fs(uri))


def read_marker(uri: str) -> dict[str, Any]:
    """Parse and validate the `COMMIT.json` of `uri` (without reading the files)."""
    fs, path = fresh_fs(uri)
    try:
        raw = fs.cat_file(_join(path, MARKER))
    except FileNotFoundError:
        if not fs.exists(path):
            raise FileNotFoundError(f"{uri} does not exist; check the URI") from None
        raise CorruptArtifactError(
            f"{uri} has no {MARKER}: its write was interrupted or is still in progress; "
            "wait for the writer or write it again"
        ) from None
    try:
        marker = json.loads(raw)
        if marker.get("format") != _MARKER_FORMAT or not isinstance(marker.get("files"), dict):
            raise ValueError(f"format is not {_MARKER_FORMAT!r}")
        for name, info in marker["files"].items():
            _check_file_name(name)
            if not isinstance(info.get("sha256"), str) or not isinstance(info.get("size"), int):
                raise ValueError(f"entry for {name!r} lacks sha256/size")
    except (ValueError, AttributeError, TypeError) as e:
        raise CorruptArtifactError(
            f"{_join(uri, MARKER)} is not a valid commit marker ({e}); the directory is "
            "damaged: write it again"
        ) from e
    return marker


def read_committed(uri: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Read every file of a committed directory, verifying sizes and sha256s; return (files, meta).

    Raises CorruptArtifactError naming the file when one is missing, truncated or altered.
    """
    marker = read_marker(uri)
    fs, path = fresh_fs(uri)
    files: dict[str, bytes] = {}
    for name, info in sorted(marker["files"].items()):
        try:
            data = fs.cat_file(_join(path, name))
        except FileNotFoundError:
            raise CorruptArtifactError(
                f"{_join(uri, name)} is missing but listed in {MARKER}; the directory is "
                "damaged: write or copy it again"
            ) from None
        if len(data) != info["size"] or sha256_hex(data) != info["sha256"]:
            raise CorruptArtifactError(
                f"{_join(uri, name)} does not match its sha256 in {MARKER} (got {len(data)} "
                f"bytes, expected {info['size']}): it was truncated or modified; write or copy "
                "it again"
            )
        files[name] = data
    return files, marker.get("meta", {})


def list_subdirs(uri: str) -> list[str]:
    """Names of the sub-directories of `uri` (empty when `uri` does not exist)."""
    fs, path = fresh_fs(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    finally:
        fs.invalidate_cache(path)  # leave no listing behind for later `exists` calls to trust
    return sorted(basename(e["name"]) for e in entries if e.get("type") == "directory")


# --------------------------------------------------------------------------------------------
# Checkpoints


def _ckpt_steps(root_uri: str) -> list[int]:
    """Steps of every `ckpt-*` directory under root, committed or not, newest first."""
    steps = []
    for name in list_subdirs(root_uri):
        m = CHECKPOINT_DIR_RE.fullmatch(name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps, reverse=True)


def checkpoint_uri(root_uri: str, step: int) -> str:
    return _join(root_uri, f"ckpt-{step:09d}")


def save_checkpoint(
    root_uri: str,
    step: int,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    *,
    keep: int = 3,
) -> str:
    """Commit `root/ckpt-{step:09d}/` (arrays.safetensors + meta), then prune to `keep` newest.

    Re-saving an existing step replaces it (a resumed run redoing that step); until the new
    one is committed that step does not count, and `latest_checkpoint` falls back past it.
    Pruning never touches the new checkpoint nor anything newer (see `_prune`).
    """
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}; it is how many checkpoints survive")
    for k in arrays:
        if not isinstance(k, str) or not k:
            raise ValueError(f"checkpoint array names must be non-empty strings, got {k!r}")
    blob = safetensors.numpy.save(contiguous(arrays))
    uri = checkpoint_uri(root_uri, int(step))
    # The caller's meta is nested so that its keys can never collide with ours.
    wrapped = {"kind": "metaopt.checkpoint", "step": int(step), "meta": meta}
    write_committed(uri, {ARRAYS_FILE: blob}, wrapped, overwrite=True)
    _prune(root_uri, keep, int(step))
    return uri


def _prune(root_uri: str, keep: int, written: int) -> None:
    """Keep the `keep` newest committed checkpoints up to `written`; delete older ones.

    Called only once `written` is committed: until then, the old ones are the fallback. Steps
    above `written` are left alone: they were saved before this run rewound to an older
    checkpoint, so `latest_checkpoint` found them damaged or unfinished, and counting them
    could delete every good checkpoint; redoing those steps replaces them.
    """
    steps = [s for s in _ckpt_steps(root_uri) if s <= written]  # newest first
    kept = 0
    for i, step in enumerate(steps):
        if step == written or is_committed(checkpoint_uri(root_uri, step)):
            kept += 1
            if kept == keep:
                for old in reversed(steps[i + 1 :]):  # oldest first; crashed leftovers too
                    remove_committed(checkpoint_uri(root_uri, old))
                return


def latest_checkpoint(root_uri: str) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
    """(step, arrays, meta) of the newest checkpoint that verifies, or None if there is none.

    Corrupt or uncommitted checkpoints are skipped with a warning, falling back to older ones.
    """
    for step in _ckpt_steps(root_uri):
        uri = checkpoint_uri(root_uri, step)
        try:
            files, meta = read_committed(uri)
            if ARRAYS_FILE not in files:
                raise CorruptArtifactError(f"{uri} has no {ARRAYS_FILE}")
            try:
                arrays = safetensors.numpy.load(files[ARRAYS_FILE])
            except SafetensorError as e:
                raise CorruptArtifactError(f"{_join(uri, ARRAYS_FILE)} is unreadable: {e}") from e
        except (CorruptArtifactError, FileNotFoundError) as e:
            log.warning("skipping checkpoint %s: %s", uri, e)
            continue
        return step, arrays, meta.get("meta", {})
    return None
