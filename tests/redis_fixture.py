"""The `redis_server` fixture: a real `redis-server` (Debian's package) on 127.0.0.1 and a free port.

Use it from a test file with

    from tests.redis_fixture import redis_server  # noqa: F401

The server runs in a temporary directory without persistence (stopping it loses all data, as a
crash of an unpersisted Redis would), with ACLs as in production: the `default` user is off, and
user `metaopt` (password in `.url`) may touch only keys `metaopt:*` and run only the commands the
job store declares in `metaopt.jobstore.ACL_COMMANDS`, so a test also proves that list complete.
`.admin()` is an unrestricted client, for checks behind the store's back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from metaopt.jobstore import ACL_COMMANDS
from tests.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One redis-server process; `stop()` then `start()` restarts it, empty, on the same port."""

    user, key_pattern = "metaopt", "metaopt:*"

    def __init__(self, workdir: Path):
        self.workdir, self.port = workdir, free_port()
        self.password, self.admin_password = secrets.token_hex(12), secrets.token_hex(12)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.user, self.password)

    def url_for(self, user: str, password: str | None = None) -> str:
        credentials = f"{user}:{password}" if password is not None else user
        return f"redis://{credentials}@127.0.0.1:{self.port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username="admin", password=self.admin_password,
                           decode_responses=True, socket_timeout=2, socket_connect_timeout=2)

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log written)"

    def _write_config(self) -> Path:
        commands = " ".join(f"+{c}" for c in ACL_COMMANDS)
        config = self.workdir / "redis.conf"
        config.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "daemonize no",
            f'dir "{self.workdir}"', f'logfile "{self.workdir}/redis.log"',
            'save ""', "appendonly no",  # no persistence: a restart loses everything
            "user default off",
            f"user {self.user} on >{self.password} resetkeys ~{self.key_pattern} resetchannels -@all "
            + commands,
            f"user admin on >{self.admin_password} ~* &* +@all",
        ]) + "\n")
        return config

    def start(self, timeout_s: float = 10.0) -> None:
        if not os.access(REDIS_SERVER, os.X_OK):
            pytest.fail(f"redis-server not found (looked for {REDIS_SERVER}); the job store tests run a real "
                        "one: `make test` installs it (apt-get install redis-server)")
        self._proc = subprocess.Popen([REDIS_SERVER, str(self._write_config())], cwd=self.workdir,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        with self.admin() as client:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {self._proc.returncode} on port "
                                       f"{self.port}; its log:\n{self.log()}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within "
                                           f"{timeout_s} s; its log:\n{self.log()}") from None
                    time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (no persistence: its data is gone)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
