"""Checkpoints, resume and the registry over s3://, against a real S3-compatible server (moto's,
on loopback: see tests/s3_fixture.py)."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys

import fsspec.config
import jax
import numpy as np
import pytest
import s3fs
from fsspec.core import url_to_fs

from metaopt import registry, storage, wire
from metaopt._proto import learner_pb2 as pb
from metaopt.jobspec import OuterSpec
from metaopt.learner.checkpointing import Checkpointer
from metaopt.learner.core import Learner, LearnerConfig
from metaopt.storage import MARKER, CorruptArtifactError

pytest_plugins = ["tests.s3_fixture"]  # s3_bucket (importing the fixture would trip ruff's F811)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _arrays(seed: int = 0, size: int = 12) -> dict[str, np.ndarray]:
    return {
        "w": np.random.default_rng(seed).standard_normal(size).astype(np.float32),
        "nan": np.array(np.float32(np.nan)),  # 0-d, and NaN must survive bit for bit
        "key": np.array([0xDEADBEEF, seed], dtype=np.uint32),
    }


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def _s3(uri: str) -> tuple[s3fs.S3FileSystem, str]:
    fs, path = url_to_fs(uri)
    fs.invalidate_cache()
    return fs, path


def test_committed_directory_round_trip_and_tampering(s3_bucket):
    uri = f"{s3_bucket}/dirs/d"
    storage.write_committed(uri, {"a.bin": b"hello", "b.json": b"{}"}, {"k": [1, 2]})
    assert storage.read_committed(uri) == ({"a.bin": b"hello", "b.json": b"{}"}, {"k": [1, 2]})
    with pytest.raises(FileExistsError, match="immutable"):
        storage.write_committed(uri, {"a.bin": b"other"}, {})
    storage.write_committed(uri, {"a.bin": b"new"}, {}, overwrite=True)
    fs, path = _s3(uri)
    assert sorted(fs.ls(path)) == [f"{path}/{MARKER}", f"{path}/a.bin"]  # b.json went with the old

    fs.pipe_file(f"{path}/a.bin", b"NEW")  # same size, other bytes
    with pytest.raises(CorruptArtifactError, match="a.bin"):
        storage.read_committed(uri)


def test_a_missing_bucket_is_an_error_not_created(s3_bucket):
    with pytest.raises(FileNotFoundError):
        storage.write_committed("s3://no-such-bucket/d", {"a": b"1"}, {})
    assert not _s3(s3_bucket)[0].exists("no-such-bucket")


def test_a_racing_publisher_loses_loudly(s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/registry/opt/1"
    winner = {"theta.bin": b"winner", "manifest.json": b'{"by": "winner"}'}
    storage.write_committed(uri, winner, {"by": "winner"})
    # The loser checked for the directory just before the winner wrote it, and writes the same
    # file names (as every publisher of a registry version does): it must not touch the winner's.
    monkeypatch.setattr(_s3(uri)[0], "exists", lambda path, **kwargs: False)
    with pytest.raises(FileExistsError, match="immutable"):
        storage.write_committed(uri, {"theta.bin": b"loser!", "manifest.json": b"{}"}, {"by": "loser"})
    assert storage.read_committed(uri) == (winner, {"by": "winner"})


def test_of_two_racing_writers_only_the_claimant_uploads(s3_bucket, monkeypatch):
    """A and B both find the directory absent; B runs start to end while A is about to upload its
    files: B must fail before uploading anything, and A's directory must commit and verify."""
    uri = f"{s3_bucket}/registry/opt/1"
    fs, path = _s3(uri)
    files = {"A": {"theta.bin": b"A" * 64, "manifest.json": b'{"by": "A"}'},
             "B": {"theta.bin": b"B" * 64, "manifest.json": b'{"by": "B"}'}}
    uploads = []
    real_pipe = fs.pipe

    def pipe(objects, *args, **kwargs):
        uploads.append({key.rsplit("/", 1)[-1]: data for key, data in objects.items()})
        if len(uploads) == 1:  # A, about to upload: B races it now
            with pytest.raises(FileExistsError, match="immutable"):
                storage.write_committed(uri, files["B"], {"by": "B"})
        return real_pipe(objects, *args, **kwargs)

    monkeypatch.setattr(fs, "exists", lambda path, **kwargs: False)  # both checked before any write
    monkeypatch.setattr(fs, "pipe", pipe)
    storage.write_committed(uri, files["A"], {"by": "A"})
    monkeypatch.undo()
    assert uploads == [files["A"]]  # B uploaded nothing
    assert storage.read_committed(uri) == (files["A"], {"by": "A"})
    assert sorted(storage.read_marker(uri)["files"]) == ["manifest.json", "theta.bin"]  # no claim
    names = (storage.CLAIM, MARKER, "manifest.json", "theta.bin")
    assert sorted(fs.ls(path)) == [f"{path}/{name}" for name in names]


def test_checkpoints_latest_and_pruning(s3_bucket):
    root = f"{s3_bucket}/run/checkpoints"
    assert storage.latest_checkpoint(root) is None
    for step in range(1, 6):
        storage.save_checkpoint(root, step, _arrays(step), {"outer_step": step}, keep=2)
    step, arrays, meta = storage.latest_checkpoint(root)
    assert step == 5 and meta == {"outer_step": 5}
    _assert_bitwise_equal(arrays, _arrays(5))
    assert storage.list_subdirs(root) == ["ckpt-000000004", "ckpt-000000005"]


def test_pruning_after_a_rewind_keeps_the_newest_good_checkpoint(s3_bucket):
    root = f"{s3_bucket}/run/checkpoints"
    for step in range(1, 5):
        storage.save_checkpoint(root, step, _arrays(step), {}, keep=4)
    fs, path = _s3(root)
    for step in (3, 4):  # committed, then damaged
        fs.pipe_file(f"{path}/ckpt-{step:09d}/arrays.safetensors", b"rot")
    assert storage.latest_checkpoint(root)[0] == 2
    # The run resumed at 2 redoes step 3 with a smaller `keep`: the damaged 4 must not count.
    storage.save_checkpoint(root, 3, _arrays(30), {}, keep=1)
    step, arrays, _ = storage.latest_checkpoint(root)
    assert step == 3
    _assert_bitwise_equal(arrays, _arrays(30))


def test_writes_by_another_process_are_seen(s3_bucket, tmp_path):
    """s3fs answers exists/info/cat_file from cached listings: another writer's files would be
    invisible through them."""
    root = f"{s3_bucket}/run/checkpoints"
    storage.save_checkpoint(root, 1, _arrays(1), {})
    storage.save_checkpoint(str(tmp_path), 2, _arrays(2), {})  # the other writer's bytes
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    fs, path = _s3(root)

    other.pipe_file(f"{path}/ckpt-000000002/arrays.safetensors",
                    (tmp_path / "ckpt-000000002" / "arrays.safetensors").read_bytes())
    fs.ls(f"{path}/ckpt-000000002")  # someone in this process lists it before its marker lands
    assert storage.latest_checkpoint(root)[0] == 1
    other.pipe_file(f"{path}/ckpt-000000002/{MARKER}", (tmp_path / "ckpt-000000002" / MARKER).read_bytes())
    step, arrays, _ = storage.latest_checkpoint(root)
    assert step == 2
    _assert_bitwise_equal(arrays, _arrays(2))


# Writes a checkpoint like the learner does, but stops for good just before its marker goes up
# (after announcing it), so that the test can SIGKILL it at exactly that point.
_HALF_WRITER = """
import sys, time
import numpy as np
import s3fs
from metaopt import storage

call_s3 = s3fs.S3FileSystem._call_s3

async def stop_before_the_marker(self, method, *args, **kwargs):
    if method == "put_object" and kwargs.get("Key", "").endswith(storage.MARKER):
        print("files written", flush=True)
        time.sleep(600)
    return await call_s3(self, method, *args, **kwargs)

s3fs.S3FileSystem._call_s3 = stop_before_the_marker
big = {"w": np.random.default_rng(2).standard_normal(4_000_000).astype(np.float32)}  # 16 MB
storage.save_checkpoint(sys.argv[1], int(sys.argv[2]), big, {"outer_step": 2})
"""


def test_a_write_killed_half_way_leaves_the_previous_checkpoint(s3_bucket, caplog):
    root = f"{s3_bucket}/run/checkpoints"
    storage.save_checkpoint(root, 1, _arrays(1, size=1000), {"outer_step": 1})

    writer = subprocess.Popen([sys.executable, "-c", _HALF_WRITER, root, "2"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = writer.stdout.readline()
        assert said == "files written\n", writer.communicate()[1] if not said else said
        fs, path = _s3(root)
        assert fs.size(f"{path}/ckpt-000000002/arrays.safetensors") > 16e6  # it really was half-way
    finally:
        writer.kill()  # SIGKILL: no cleanup of any kind
        writer.communicate()
    assert writer.returncode == -signal.SIGKILL

    with caplog.at_level(logging.WARNING, logger="metaopt.storage"):
        step, arrays, meta = storage.latest_checkpoint(root)
    assert step == 1 and meta == {"outer_step": 1}
    _assert_bitwise_equal(arrays, _arrays(1, size=1000))
    assert "ckpt-000000002" in caplog.text and MARKER in caplog.text

    storage.save_checkpoint(root, 3, _arrays(3), {"outer_step": 3})
    assert storage.latest_checkpoint(root)[0] == 3


THETA0 = {"mlp": {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
                  "b": np.zeros(4, np.float32)}, "scale": np.float32(0.5)}


def _learner() -> Learner:
    outer = OuterSpec(meta_batch_size=1, clip_norm=1.0, learning_rate=0.01, max_staleness=1,
                      max_estimate_norm=1e3)
    config = LearnerConfig(job_id="job-1", max_outer_steps=100, outer=outer, task_families=("quadratic",))
    return Learner(config, THETA0)


def _estimate(values, version: int, sequence: int) -> pb.GradientEstimate:
    data, n, checksum = wire.encode(np.asarray(values, np.float32))
    return pb.GradientEstimate(
        job_id="job-1", worker_id="w", run_id="r", theta_version=version, sequence=sequence,
        task=pb.TaskSpec(name="quadratic", kwargs_json="{}"), num_particles=2, inner_steps=3,
        mean_loss=1.0, encoding=pb.ENCODING_FLOAT32_LE, values=data, length=n, crc32=checksum,
    )


def test_learner_resumes_from_s3(s3_bucket):
    root = f"{s3_bucket}/runs/job-1/checkpoints"
    learner = _learner()
    rng = np.random.default_rng(1)
    for sequence in (1, 2):
        assert learner.submit(_estimate(rng.normal(size=11), learner.version, sequence)).accepted
        assert learner.wait_idle()
    assert Checkpointer(learner, root).save().endswith("ckpt-000000002")

    s3fs.S3FileSystem.clear_instance_cache()  # as a new process would start: no client, no cache
    restored = _learner()
    assert Checkpointer(restored, root).restore_latest() == 2
    assert np.asarray(restored.theta).tobytes() == np.asarray(learner.theta).tobytes()
    for a, b in zip(jax.tree.leaves(restored.outer_state), jax.tree.leaves(learner.outer_state),
                    strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert restored.version == 2 and restored.history == learner.history
    np.testing.assert_array_equal(restored.rng, learner.rng)


THETA = {"layer": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}}


def test_registry_round_trip(s3_bucket, tmp_path, monkeypatch):
    reg = f"{s3_bucket}/registry"
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))  # loads may cache
    publish = lambda theta: registry.publish(reg, "my-opt", "small_fc", {"hidden": 4}, theta,  # noqa: E731
                                             {"job_id": "job-1"})
    assert publish(THETA) == "my-opt:1"
    version_1 = storage.read_committed(f"{reg}/my-opt/1")

    loaded = registry.load("my-opt:1", registry=reg)
    assert loaded.optimizer_name == "small_fc" and loaded.hparams == {"hidden": 4}
    for key in ("w", "b"):
        assert loaded.theta["layer"][key].tobytes() == THETA["layer"][key].tobytes()

    registry.set_alias(reg, "my-opt", 1, "champion")
    assert registry.resolve(reg, "my-opt@champion") == ("my-opt", 1)
    pulled = registry.pull("my-opt@champion", reg, dest_dir=str(tmp_path / "pulled"))
    assert storage.read_committed(pulled)[0] == version_1[0]  # every file, bit for bit

    # Versions are immutable: a new publish is version 2; version 1 and its alias stay.
    assert publish({"layer": {"w": THETA["layer"]["w"] + 1, "b": THETA["layer"]["b"]}}) == "my-opt:2"
    assert storage.read_committed(f"{reg}/my-opt/1") == version_1
    assert registry.list_versions(reg, "my-opt") == [1, 2] and registry.list_names(reg) == ["my-opt"]
    assert registry.resolve(reg, "my-opt") == ("my-opt", 2)
    assert registry.resolve(reg, "my-opt@champion") == ("my-opt", 1)
    registry.set_alias(reg, "my-opt", 2, "champion")
    assert registry.resolve(reg, "my-opt@champion") == ("my-opt", 2)


def test_a_claimant_that_died_leaves_an_uncommitted_version_that_is_skipped(s3_bucket, monkeypatch):
    reg = f"{s3_bucket}/registry"
    publish = lambda: registry.publish(reg, "my-opt", "small_fc", {}, THETA, {})  # noqa: E731
    assert publish() == "my-opt:1"
    fs, path = _s3(reg)

    def die(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(fs, "pipe", die)  # it claims version 2, then dies before uploading
    with pytest.raises(RuntimeError, match="killed"):
        publish()
    monkeypatch.undo()
    assert fs.ls(f"{path}/my-opt/2") == [f"{path}/my-opt/2/{storage.CLAIM}"]
    assert not storage.is_committed(f"{reg}/my-opt/2")
    with pytest.raises(CorruptArtifactError, match=MARKER):
        storage.read_committed(f"{reg}/my-opt/2")
    assert registry.list_versions(reg, "my-opt") == [1] and registry.resolve(reg, "my-opt") == ("my-opt", 1)

    # A publisher whose listing predates the claim tries version 2 first, and moves on to 3.
    real = registry._numeric_dirs
    listings = iter([[1]])
    monkeypatch.setattr(registry, "_numeric_dirs", lambda *a: next(listings, None) or real(*a))
    assert publish() == "my-opt:3"
    assert registry.list_versions(reg, "my-opt") == [1, 3]


def test_aliases_written_by_another_process_are_seen(s3_bucket):
    """A stale cached listing of NAME/ (no aliases.json yet) must not hide the aliases, or
    set_alias would write a table without them."""
    reg = f"{s3_bucket}/registry"
    registry.publish(reg, "my-opt", "small_fc", {}, THETA, {})
    fs, path = _s3(reg)
    fs.ls(f"{path}/my-opt")  # cached here: no aliases.json
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    other.pipe_file(f"{path}/my-opt/{registry.ALIASES_FILE}", b'{"champion": 1}')
    assert registry.aliases(reg, "my-opt") == {"champion": 1, "latest": 1}
    fs.ls(f"{path}/my-opt")
    assert registry.resolve(reg, "my-opt@champion") == ("my-opt", 1)
    registry.set_alias(reg, "my-opt", 1, "stable")
    assert registry.aliases(reg, "my-opt") == {"champion": 1, "stable": 1, "latest": 1}


@pytest.mark.parametrize("setting", ["AWS_ENDPOINT_URL_S3", "fsspec.config.conf", "FSSPEC_S3_ENDPOINT_URL"])
def test_other_endpoint_settings_reach_s3fs(s3_bucket, monkeypatch, setting):
    uri = f"{s3_bucket}/d"
    storage.write_committed(uri, {"a.bin": b"hello"}, {})
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    if setting == "FSSPEC_S3_ENDPOINT_URL":  # read once, when fsspec is imported: a new process
        script = "import sys; from metaopt import storage; print(storage.read_committed(sys.argv[1])[0])"
        env = os.environ | {setting: endpoint}
        out = subprocess.run([sys.executable, "-c", script, uri], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.stdout == "{'a.bin': b'hello'}\n", out.stderr
        return
    if setting == "AWS_ENDPOINT_URL_S3":
        monkeypatch.setenv(setting, endpoint)
    else:
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    assert storage.read_committed(uri)[0] == {"a.bin": b"hello"}
