"""Datasets of training runs: checkpoints of inner training runs that a job's workers recorded
(the job spec's `record`), for models that learn from optimization trajectories (G.pt, Peebles
et al. 2022: a generative model of parameter updates conditioned on a target loss).

Layout (docs/datasets.md has the schema), under a job's storage root:

    ROOT/runs/JOB/dataset/shards/NAME/        one shard per committed directory (storage.write_committed):
        records.safetensors                   the records' parameters and, in its metadata, the records
        COMMIT.json                           sha256 and size of records.safetensors
    ROOT/datasets/JOB/                        `metaopt dataset export JOB`: the shards, verified and
        index.json                            copied, and an index of them
        shards/NAME/...

A record is one inner run's parameters at one truncation boundary, with its training loss and
held-out loss there, its step, the task's spec and the optimizer (name, hyperparameters, θ's
version). Shards are safetensors (no pickle, no code): the tensors `r00003/layer_0/w`, and the
metadata `{"schema": SCHEMA, "records": JSON list}`. Every read verifies the shard's sha256 and
checks its schema; a damaged or foreign shard is refused with its name.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import safetensors.numpy

from metaopt import storage

SCHEMA = "metaopt.dataset/1"
SHARD_FILE = "records.safetensors"
INDEX_FILE = "index.json"
# Each record's fields and their JSON types (bool is not an int here).
FIELDS = {"run": str, "step": int, "horizon": int, "loss": float, "held_out_loss": float, "task": dict,
          "optimizer": dict, "theta_version": int, "worker": str, "params": list}


class DatasetError(ValueError):
    """A dataset, or one of its shards, is missing or does not follow the schema."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One inner run's parameters at one truncation boundary. `meta`: every field of FIELDS but
    `params` (the list of parameter paths); `params`: {path: array}."""

    meta: dict[str, Any]
    params: dict[str, np.ndarray]

    @property
    def tree(self) -> dict[str, Any]:
        """The parameters as the task's nested dicts."""
        return storage.unflatten_tree(self.params)


def recording_uri(root: str, job_id: str) -> str:
    """Where a job's workers write their shards."""
    return f"{root.rstrip('/')}/runs/{job_id}/dataset"


def export_uri(root: str, job_id: str) -> str:
    """Where `metaopt dataset export JOB` puts a job's dataset by default."""
    return f"{root.rstrip('/')}/datasets/{job_id}"


def encode_shard(records: list[Record]) -> bytes:
    """The safetensors bytes of one shard holding `records`."""
    tensors, metas = {}, []
    for i, record in enumerate(records):
        metas.append({**record.meta, "params": sorted(record.params)})
        tensors.update({f"r{i:05d}/{path}": array for path, array in record.params.items()})
    _check_records(metas, "the shard being written")
    metadata = {"schema": SCHEMA, "records": json.dumps(metas, sort_keys=True)}
    return safetensors.numpy.save(storage.contiguous(tensors), metadata=metadata)


def decode_shard(data: bytes, name: str) -> list[Record]:
    """The records of one shard's bytes; DatasetError naming `name` if they break the schema."""
    metadata, tensors = _read_safetensors(data, name)
    if metadata.get("schema") != SCHEMA:
        raise DatasetError(f"{name}: schema {metadata.get('schema')!r}, expected {SCHEMA!r}")
    try:
        metas = json.loads(metadata["records"])
    except (KeyError, json.JSONDecodeError) as err:
        raise DatasetError(f"{name}: its records metadata is missing or not JSON ({err})") from None
    _check_records(metas, name)
    records, expected = [], set()
    for i, meta in enumerate(metas):
        paths = [f"r{i:05d}/{p}" for p in meta["params"]]
        expected.update(paths)
        missing = [p for p in paths if p not in tensors]
        if missing:
            raise DatasetError(f"{name}: record {i} lists parameters it does not hold: {missing}")
        params = {p: tensors[f"r{i:05d}/{p}"] for p in meta["params"]}
        records.append(Record({k: v for k, v in meta.items() if k != "params"}, params))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise DatasetError(f"{name}: tensors that no record lists: {extra[:5]}")
    return records


def _read_safetensors(data: bytes, name: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors) of safetensors bytes: the header is an 8-byte little-endian length,
    then JSON whose "__metadata__" holds the metadata."""
    try:
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        return metadata, safetensors.numpy.load(data)
    except Exception as err:  # safetensors raises its own SafetensorError on malformed bytes
        raise DatasetError(f"{name}: not a safetensors file ({type(err).__name__}: {err})") from None


def _check_records(metas: Any, name: str) -> None:
    if not isinstance(metas, list):
        raise DatasetError(f"{name}: records must be a JSON list, got {type(metas).__name__}")
    for i, meta in enumerate(metas):
        if not isinstance(meta, dict):
            raise DatasetError(f"{name}: record {i} is not a JSON object")
        missing = sorted(set(FIELDS) - set(meta))
        if missing:
            raise DatasetError(f"{name}: record {i} lacks {missing}")
        for field, kind in FIELDS.items():
            value = meta[field]
            ok = (isinstance(value, int | float) and not isinstance(value, bool)) if kind is float \
                else isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if not ok:
                raise DatasetError(f"{name}: record {i}'s {field!r} is {value!r}, expected a {kind.__name__}")


class ShardWriter:
    """Buffers records and writes them `per_shard` at a time as committed shards named
    PREFIX-00000, PREFIX-00001, … under `uri`/shards. `flush` writes what is buffered."""

    def __init__(self, uri: str, prefix: str, per_shard: int):
        self.uri, self.prefix, self.per_shard = uri.rstrip("/"), prefix, per_shard
        self.buffer: list[Record] = []
        self.written = 0  # shards

    def add(self, record: Record) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.per_shard:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered records as one shard; its URI, or None when nothing is buffered."""
        if not self.buffer:
            return None
        uri = f"{self.uri}/shards/{self.prefix}-{self.written:05d}"
        data = encode_shard(self.buffer)
        storage.retrying(lambda: storage.write_committed(uri, {SHARD_FILE: data}, {
            "schema": SCHEMA, "records": len(self.buffer)}, overwrite=True), f"writing shard {uri}")
        self.buffer, self.written = [], self.written + 1
        return uri


def shard_names(uri: str) -> list[str]:
    """The shards under a recording or an exported dataset."""
    return storage.list_subdirs(f"{uri.rstrip('/')}/shards")


def read_shard(uri: str) -> list[Record]:
    """One shard's records, its sha256 verified (storage.CorruptArtifactError naming the file
    when it does not match) and its schema checked (DatasetError naming the shard)."""
    files, _ = storage.read_committed(uri)
    if SHARD_FILE not in files:
        raise DatasetError(f"{uri} holds no {SHARD_FILE}; it is not a dataset shard")
    return decode_shard(files[SHARD_FILE], uri)


def records(uri: str) -> Iterator[Record]:
    """Every record of a recording or an exported dataset, shard by shard (each verified)."""
    for name in shard_names(uri):
        yield from read_shard(f"{uri.rstrip('/')}/shards/{name}")


def export(source: str, dest: str) -> dict[str, Any]:
    """Verify every shard of the recording at `source`, copy it to `dest`/shards, and write
    `dest`/index.json; returns the index. Refuses an empty recording and an existing `dest`."""
    names = shard_names(source)
    if not names:
        raise DatasetError(f"{source} holds no shards: did the job run with `record` in its spec, "
                           "and did its workers finish a shard (record.per_shard records)?")
    fs, path = storage.fresh_fs(dest)
    if fs.exists(f"{path.rstrip('/')}/{INDEX_FILE}"):
        raise FileExistsError(f"{dest} already holds a dataset; export to another --out or remove it")
    shards, tasks = [], Counter()
    for name in names:
        files, meta = storage.read_committed(f"{source.rstrip('/')}/shards/{name}")
        recs = decode_shard(files.get(SHARD_FILE, b""), f"{source}/shards/{name}")
        storage.write_committed(f"{dest.rstrip('/')}/shards/{name}", files, meta, overwrite=True)
        tasks.update(r.meta["task"]["name"] for r in recs)
        shards.append({"name": name, "sha256": storage.sha256_hex(files[SHARD_FILE]), "records": len(recs),
                       "steps": [min(r.meta["step"] for r in recs), max(r.meta["step"] for r in recs)]})
    index = {"schema": SCHEMA, "source": source, "records": sum(s["records"] for s in shards),
             "shards": shards, "tasks": dict(sorted(tasks.items())),
             "exported_at": _dt.datetime.now(_dt.UTC).isoformat()}
    with fs.open(f"{path.rstrip('/')}/{INDEX_FILE}", "w") as f:
        json.dump(index, f, indent=2)
    return index


def load_index(uri: str) -> dict[str, Any]:
    """An exported dataset's index, checked against its shards' commit markers."""
    fs, path = storage.fresh_fs(uri)
    try:
        index = json.loads(fs.cat_file(f"{path.rstrip('/')}/{INDEX_FILE}"))
    except FileNotFoundError:
        raise DatasetError(f"{uri} has no {INDEX_FILE}: not an exported dataset "
                           "(`metaopt dataset export JOB` makes one)") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{uri}/{INDEX_FILE} is not JSON ({err}); export the dataset again") from None
    if index.get("schema") != SCHEMA:
        raise DatasetError(f"{uri}/{INDEX_FILE}: schema {index.get('schema')!r}, expected {SCHEMA!r}")
    for shard in index["shards"]:
        marker = storage.read_marker(f"{uri.rstrip('/')}/shards/{shard['name']}")
        if marker["files"].get(SHARD_FILE, {}).get("sha256") != shard["sha256"]:
            raise storage.CorruptArtifactError(
                f"{uri}/shards/{shard['name']}: its {SHARD_FILE} is not the one the index lists; "
                "export the dataset again")
    return index


def summary(uri: str) -> dict[str, Any]:
    """What a recording or an exported dataset holds, read and verified shard by shard: records,
    shards, inner runs, tasks, steps, parameters per record, optimizers, θ versions."""
    count, runs, tasks, optimizers, steps, sizes, versions = 0, set(), Counter(), set(), [], [], []
    for record in records(uri):
        count += 1
        runs.add(record.meta["run"])
        tasks[record.meta["task"]["name"]] += 1
        optimizers.add(record.meta["optimizer"]["name"])
        steps.append(record.meta["step"])
        sizes.append(sum(a.size for a in record.params.values()))
        versions.append(record.meta["theta_version"])
    if not count:
        raise DatasetError(f"{uri} holds no shards")
    return {"uri": uri, "schema": SCHEMA, "records": count, "shards": len(shard_names(uri)),
            "runs": len(runs), "tasks": dict(sorted(tasks.items())), "optimizers": sorted(optimizers),
            "steps": [min(steps), max(steps)], "params_per_record": [min(sizes), max(sizes)],
            "theta_versions": [min(versions), max(versions)]}


def list_datasets(root: str) -> list[dict[str, Any]]:
    """Every exported dataset (ROOT/datasets/*) and job recording (ROOT/runs/*/dataset) under a
    storage root: [{"kind", "name", "uri", "shards"}]."""
    root = root.rstrip("/")
    rows = []
    for name in storage.list_subdirs(f"{root}/datasets"):
        uri = export_uri(root, name)
        rows.append({"kind": "exported", "name": name, "uri": uri, "shards": len(shard_names(uri))})
    for job in storage.list_subdirs(f"{root}/runs"):
        uri = recording_uri(root, job)
        shards = shard_names(uri)
        if shards:
            rows.append({"kind": "recording", "name": job, "uri": uri, "shards": len(shards)})
    return rows
