"""An S3-compatible server on loopback for tests: moto's server, in its own process.

    pytest_plugins = ["tests.s3_fixture"]  # in the test module

    def test_something(s3_bucket):  # "s3://metaopt-test": an empty bucket on the server
        storage.save_checkpoint(f"{s3_bucket}/checkpoints", 1, arrays, meta)

One server per test session binds 127.0.0.1 on port 0 and reports the port it got. Each test
starts from an empty server (reset, then one bucket), with test credentials and the endpoint in
`AWS_ENDPOINT_URL` (the setting metaopt documents; subprocesses inherit it), the developer's own
AWS profiles shut out, and no s3fs client cached from an earlier configuration.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import fsspec.config
import pytest
import s3fs

BUCKET = "metaopt-test"

# In its own process, so that a test may kill writers (or the test run may die) without taking
# the server along, and the server's threads never share the GIL with the code under test.
_SERVER = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not one line per request
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the test session closes our stdin (or ends)
"""


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """http://127.0.0.1:PORT of a moto server that lives as long as the test session."""
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = server.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(
                f"the moto server did not start (exit status {server.poll()}, said {port!r}); "
                "install the dev extras: pip install -e '.[dev]' (moto[server])"
            )
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def use_s3_endpoint(env: pytest.MonkeyPatch, endpoint: str, workdir) -> None:
    """Point fsspec's s3:// at `endpoint` with test credentials, the developer's own AWS
    profiles and files shut out (they live in `workdir`, empty)."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        env.delenv(var, raising=False)
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_CONFIG_FILE", str(workdir / "no-aws-config"))
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-aws-credentials"))
    env.setenv("AWS_ENDPOINT_URL", endpoint)
    env.delitem(fsspec.config.conf, "s3", raising=False)
    # s3fs keeps one client per set of arguments, made with the environment of its first use.
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[str]:
    """s3://metaopt-test, an empty bucket on the session's moto server, reachable through fsspec."""
    reset = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=10).close()
    use_s3_endpoint(monkeypatch, moto_endpoint, tmp_path)
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield f"s3://{BUCKET}"
    s3fs.S3FileSystem.clear_instance_cache()
