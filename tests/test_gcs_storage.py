"""Checkpoints, committed directories and the registry over gs://, against a real GCS-compatible
server on loopback (gcp-storage-emulator, from PyPI) through gcsfs.

The round trips run in a subprocess: gcsfs chooses its filesystem class when it is imported, and
the default one first asks GCS's gRPC control plane what kind each bucket is (60 s to time out
against an emulator), so the subprocess imports it with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
The emulator ignores create-only preconditions: metaopt's read-back check still refuses to
overwrite a committed directory (tested below)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.ports import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]

ROUND_TRIPS = textwrap.dedent("""
    import fsspec, numpy as np
    from metaopt import registry, storage
    from metaopt.storage import CorruptArtifactError

    fsspec.filesystem("gs").mkdir("metaopt-test")
    root = "gs://metaopt-test"

    # A committed directory: round trip, immutable, tampering detected.
    uri = f"{root}/dirs/d"
    storage.write_committed(uri, {"a.bin": b"hello", "b.json": b"{}"}, {"k": [1, 2]})
    assert storage.read_committed(uri) == ({"a.bin": b"hello", "b.json": b"{}"}, {"k": [1, 2]})
    try:
        storage.write_committed(uri, {"a.bin": b"other"}, {})
        raise SystemExit("overwrote a committed directory")
    except FileExistsError:
        pass
    fsspec.filesystem("gs").pipe_file("metaopt-test/dirs/d/a.bin", b"HELLO")
    try:
        storage.read_committed(uri)
        raise SystemExit("tampering went unnoticed")
    except CorruptArtifactError:
        pass

    # Checkpoints: the newest wins, old ones are pruned.
    ckpts = f"{root}/runs/job-1/checkpoints"
    for step in range(1, 5):
        arrays = {"w": np.full(3, step, np.float32)}
        storage.save_checkpoint(ckpts, step, arrays, {"outer_step": step}, keep=2)
    step, arrays, meta = storage.latest_checkpoint(ckpts)
    assert step == 4 and meta == {"outer_step": 4} and arrays["w"].tolist() == [4.0] * 3
    assert storage.list_subdirs(ckpts) == ["ckpt-000000003", "ckpt-000000004"]

    # The registry: publish, alias, pull, load; versions stay immutable.
    reg = f"{root}/registry"
    theta = {"w": np.arange(4, dtype=np.float32)}
    assert registry.publish(reg, "opt", "small_fc", {"hidden": 4}, theta, {"job_id": "job-1"}) == "opt:1"
    registry.set_alias(reg, "opt", 1, "champion")
    assert registry.resolve(reg, "opt@champion") == ("opt", 1)
    loaded = registry.load("opt@champion", registry=reg)
    assert loaded.theta["w"].tobytes() == theta["w"].tobytes()
    assert registry.publish(reg, "opt", "small_fc", {"hidden": 4}, {"w": theta["w"] + 1}, {}) == "opt:2"
    assert registry.list_versions(reg, "opt") == [1, 2]
    assert registry.load("opt:1", registry=reg).theta["w"].tobytes() == theta["w"].tobytes()
    print("ok")
""")


@pytest.fixture(scope="module")
def gcs_endpoint(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--in-memory"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"the GCS emulator did not start; see {log.name}") from None
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)
    log.close()


def test_checkpoints_and_registry_round_trip_over_gs(gcs_endpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "STORAGE_EMULATOR_HOST": gcs_endpoint,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GS_TOKEN": "anon",
           "FSSPEC_GS_PROJECT": "metaopt-test", "METAOPT_REGISTRY_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", ROUND_TRIPS], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    output = done.stdout[-2000:] + done.stderr[-3000:]
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), output
