"""Whole CPU cores for CPU workers: each worker process claims cores of its machine and pins
itself to them, before jax starts.

Why: XLA:CPU sizes its thread pools by the CPUs a process may run on. Two unpinned
single-device workers on this 2-core machine each start 2-thread pools, contend for both cores
and do 5,750 PES inner steps/s together on the reference configuration; pinned, one core each,
they do about 10,000 (benchmarks/worker_throughput.py). Through `metaopt train`, learner and
gRPC included, 2 workers went from 5,010 to 8,270 (benchmarks/meta_training.py).

Claims are `flock`s on files under a machine-wide directory, held for the life of the process,
so the kernel frees a killed worker's cores at once and its restart can claim them again. Cores
are handed out in rounds: the first `n` workers of an n-core machine get a core each; more
workers share cores evenly, each still pinned to one.

Pinning is skipped, with a log line, where it cannot be right: where the CPU cgroup quota is
smaller than the CPUs the process may run on (a container sharing a machine's cores: its own
lock directory cannot see its neighbours' claims), where that quota is unknown (its file exists
but cannot be read or parsed), or where a worker asks for all the cores.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import pathlib
import tempfile

log = logging.getLogger(__name__)
MAX_ROUNDS = 64  # workers sharing one core before a claim gives up


def default_lock_dir() -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / f"metaopt-cores-{os.getuid()}"


CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")


class CgroupUnreadable(ValueError):
    """A cgroup CPU file exists but cannot be read or parsed: the limit is unknown, not absent."""


def _read_cgroup_file(path: pathlib.Path) -> str | None:
    """The file's text, or None if there is no such file (no limit of that kind)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CgroupUnreadable(f"cannot read {path}: {e}") from e


def _positive_int(text: str, path: pathlib.Path) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise CgroupUnreadable(f"cannot parse {path}: {text!r} is not a positive integer")
    return value


def cgroup_cpu_limit(root: pathlib.Path = CGROUP_ROOT) -> float | None:
    """CPUs this process's cgroup may use per period (cgroup v2 or v1), or None if unlimited:
    no CPU limit file, or one that says "max" (v2) or -1 (v1).

    Raises CgroupUnreadable where a file exists but cannot be read or parsed. That must not read
    as "unlimited": an unlimited cgroup turns pinning on, which under an unseen limit (a
    container sharing the machine's cores) pins neighbours onto the same cores."""
    v2 = root / "cpu.max"
    text = _read_cgroup_file(v2)
    if text is not None:
        fields = text.split()
        if len(fields) != 2:
            raise CgroupUnreadable(f"cannot parse {v2}: {text.strip()!r} is not 'QUOTA PERIOD'")
        period = _positive_int(fields[1], v2)
        return None if fields[0] == "max" else _positive_int(fields[0], v2) / period
    quota_path, period_path = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    text = _read_cgroup_file(quota_path)
    if text is None:
        return None
    if text.strip() == "-1":
        return None
    quota = _positive_int(text.strip(), quota_path)
    period_text = _read_cgroup_file(period_path)
    if period_text is None:
        raise CgroupUnreadable(f"{quota_path} sets a quota but {period_path} does not exist")
    return quota / _positive_int(period_text.strip(), period_path)


class CoreClaim:
    """Cores this process holds; `release()` (or the process's exit) gives them back."""

    def __init__(self, cores: list[int], files: list):
        self.cores, self._files = cores, files

    def release(self) -> None:
        for f in self._files:
            f.close()  # closing the descriptor drops its flock
        self._files = []


def claim_cores(count: float, lock_dir: pathlib.Path | None = None) -> CoreClaim | None:
    """Claim ceil(`count`) cores of this machine and pin every thread of this process to them.

    Call before jax creates its backend (its thread pools take their size from the pinning).
    Returns None, pinning nothing, where pinning would not help or could not be trusted.
    """
    allowed = sorted(os.sched_getaffinity(0))
    wanted = math.ceil(count)
    try:
        limit = cgroup_cpu_limit(CGROUP_ROOT)  # looked up here, so a test can point it elsewhere
    except CgroupUnreadable as e:
        log.warning("not pinning to cores: the cgroup CPU limit is unknown (%s), so neighbours "
                    "outside this container may hold them", e)
        return None
    if limit is not None and limit < len(allowed):
        log.info("not pinning to cores: the cgroup allows %.1f of the %d CPUs this process may "
                 "run on, so neighbours outside this container may hold them", limit, len(allowed))
        return None
    if wanted >= len(allowed):
        return None
    lock_dir = lock_dir or default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    cores, files = [], []
    for round_ in range(MAX_ROUNDS):
        for core in allowed:
            if core in cores:
                continue
            f = open(lock_dir / f"core{core}.round{round_}", "a")  # noqa: SIM115 (held open)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            cores.append(core)
            files.append(f)
            if len(cores) == wanted:
                _pin_process(set(cores))
                log.info("pinned to cores %s (claim round %d)", cores, round_)
                return CoreClaim(sorted(cores), files)
    CoreClaim(cores, files).release()
    log.warning("not pinning to cores: %d rounds of claims on %d cores are all taken",
                MAX_ROUNDS, len(allowed))
    return None


def _pin_process(cores: set[int]) -> None:
    """Pin every thread that exists now (threads started later inherit their starter's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that has just ended
            pass
