"""Tests for metaopt.storage: array trees, committed directories, checkpoints."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import numpy as np
import pytest

from metaopt.storage import (
    CLAIM,
    MARKER,
    CorruptArtifactError,
    flatten_tree,
    latest_checkpoint,
    read_committed,
    retrying,
    save_checkpoint,
    tree_structure,
    unflatten_tree,
    write_committed,
)


def _uris(tmp_path):
    """The same location spelled as a plain path and as a file:// URI."""
    return [str(tmp_path / "plain"), (tmp_path / "url").as_uri()]


def _arrays():
    return {
        "key": np.array([0xDEADBEEF, 7], dtype=np.uint32),
        "scalar": np.array(np.float32(np.nan)),  # 0-d, and NaN must survive bit for bit
        "count": np.array(-3, dtype=np.int32),
        "w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "empty": np.zeros((0, 2), np.float32),
    }


def _assert_bitwise_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_tree_round_trip_and_structure():
    tree = {"a": {"b": np.ones((2,), np.float32), "c": {"d": np.array(1, np.int32)}}, "e": 2.0}
    flat = flatten_tree(tree)
    assert sorted(flat) == ["a/b", "a/c/d", "e"]
    back = unflatten_tree(flat)
    assert back["a"]["c"]["d"] == 1 and back["a"]["b"].shape == (2,)
    assert tree_structure(tree) == [
        {"path": "a/b", "shape": [2], "dtype": "float32"},
        {"path": "a/c/d", "shape": [], "dtype": "int32"},
        {"path": "e", "shape": [], "dtype": "float64"},
    ]
    assert flatten_tree({}) == {} and unflatten_tree({}) == {}


@pytest.mark.parametrize("bad", [{"a/b": np.ones(1)}, {"": np.ones(1)}, {1: np.ones(1)}])
def test_flatten_rejects_bad_keys(bad):
    with pytest.raises(ValueError, match="'/'"):
        flatten_tree(bad)


@pytest.mark.parametrize("leaf", [[np.ones(1)], (1, 2), None, "text"])
def test_flatten_rejects_non_array_leaves(leaf):
    with pytest.raises(TypeError, match="a/b"):
        flatten_tree({"a": {"b": leaf}})


@pytest.mark.parametrize("bad", [{"a//b": 1}, {"/a": 1}, {"a": 1, "a/b": 2}])
def test_unflatten_rejects_bad_keys(bad):
    with pytest.raises(ValueError):
        unflatten_tree(bad)


def test_committed_write_read(tmp_path):
    for uri in [*_uris(tmp_path), f"memory://metaopt-test-{uuid.uuid4().hex}/d"]:
        write_committed(uri, {"a.bin": b"hello", "b.json": b"{}"}, {"k": [1, 2]})
        files, meta = read_committed(uri)
        assert files == {"a.bin": b"hello", "b.json": b"{}"} and meta == {"k": [1, 2]}
        with pytest.raises(FileExistsError, match="immutable"):
            write_committed(uri, {"a.bin": b"other"}, {})
        assert read_committed(uri)[0]["a.bin"] == b"hello"  # not clobbered
        write_committed(uri, {"a.bin": b"new"}, {}, overwrite=True)
        assert read_committed(uri)[0] == {"a.bin": b"new"}


def test_local_write_leaves_no_temporaries(tmp_path):
    write_committed(str(tmp_path / "d"), {"x": b"1"}, {})
    write_committed(str(tmp_path / "d"), {"x": b"2"}, {}, overwrite=True)
    assert os.listdir(tmp_path) == ["d"]
    assert sorted(os.listdir(tmp_path / "d")) == [MARKER, "x"]


def test_reserved_and_bad_file_names(tmp_path):
    for name in [MARKER, CLAIM, "a/b", ".."]:
        with pytest.raises(ValueError):
            write_committed(str(tmp_path / "d"), {name: b""}, {})


def test_directory_without_marker_is_not_readable(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.bin").write_bytes(b"x")
    with pytest.raises(CorruptArtifactError, match=MARKER):
        read_committed(str(d))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_committed(str(tmp_path / "nothing"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_named(tmp_path, damage):
    uri = str(tmp_path / "d")
    write_committed(uri, {"a.bin": b"hello world", "b.bin": b"ok"}, {})
    path = tmp_path / "d" / "a.bin"
    if damage == "flip":
        path.write_bytes(b"jello world")
    elif damage == "truncate":
        path.write_bytes(b"hello")
    else:
        path.unlink()
    with pytest.raises(CorruptArtifactError, match="a.bin"):
        read_committed(uri)


def test_bad_marker_is_corrupt(tmp_path):
    uri = str(tmp_path / "d")
    write_committed(uri, {"a": b"1"}, {})
    (tmp_path / "d" / MARKER).write_text(json.dumps({"format": "x"}))
    with pytest.raises(CorruptArtifactError, match="not a valid commit marker"):
        read_committed(uri)


def test_checkpoint_round_trip_bit_for_bit(tmp_path):
    for root in _uris(tmp_path):
        assert latest_checkpoint(root) is None
        arrays = _arrays()
        uri = save_checkpoint(root, 5, arrays, {"outer_step": 5, "step": "user key"})
        assert uri.endswith("ckpt-000000005")
        step, back, meta = latest_checkpoint(root)
        assert step == 5 and meta == {"outer_step": 5, "step": "user key"}
        _assert_bitwise_equal(arrays, back)


def test_keep_n_pruning(tmp_path):
    root = str(tmp_path)
    for step in range(1, 6):
        save_checkpoint(root, step, {"x": np.array(step)}, {}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000004", "ckpt-000000005"]
    step, arrays, _ = latest_checkpoint(root)
    assert step == 5 and arrays["x"] == 5


def test_corrupt_newest_falls_back(tmp_path, caplog):
    root = tmp_path.as_uri()
    save_checkpoint(root, 1, {"x": np.array(1.0, np.float32)}, {"n": 1})
    save_checkpoint(root, 2, {"x": np.array(2.0, np.float32)}, {"n": 2})
    f = tmp_path / "ckpt-000000002" / "arrays.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="metaopt.storage"):
        step, arrays, meta = latest_checkpoint(root)
    assert step == 1 and arrays["x"] == 1.0 and meta == {"n": 1}
    assert "ckpt-000000002" in caplog.text and "arrays.safetensors" in caplog.text


def test_crashed_checkpoint_is_ignored(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 1, {"x": np.array(1)}, {})
    crashed = tmp_path / "ckpt-000000002"
    crashed.mkdir()
    (crashed / "arrays.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(root)[0] == 1
    # Re-saving the crashed step replaces the leftover.
    save_checkpoint(root, 2, {"x": np.array(2)}, {})
    assert latest_checkpoint(root)[0] == 2


def test_checkpoint_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(str(tmp_path), -1, {}, {})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(str(tmp_path), 1, {}, {}, keep=0)


def test_retrying_rides_out_a_store_that_is_away_for_a_while_but_not_bad_data():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("endpoint unreachable")
        return "written"

    assert retrying(flaky, "a test write", timeout_s=10, max_delay_s=0.01) == "written"
    assert len(attempts) == 3

    def bad_data():
        attempts.append(1)
        raise ValueError("not JSON-serialisable")

    attempts.clear()
    with pytest.raises(ValueError):  # retrying cannot mend it: at once
        retrying(bad_data, "a test write", timeout_s=10)
    assert len(attempts) == 1

    def away():
        raise ConnectionError("endpoint unreachable")

    started = time.monotonic()
    with pytest.raises(ConnectionError):  # the store never came back: the last error, in time
        retrying(away, "a test write", timeout_s=1.0, max_delay_s=0.2)
    assert time.monotonic() - started < 2.0
