"""Core claims of CPU workers (workers/cores.py), with real processes and real flocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from metaopt.workers import cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs a process that may run on 2 CPUs")

# Claims, reports what it holds and where its threads (the main one, and one started after the
# claim) may run, then holds the claim until its stdin closes.
CLAIMANT = textwrap.dedent("""
    import json, os, sys, threading
    from metaopt.workers.cores import claim_cores
    claim = claim_cores(float(sys.argv[2]), lock_dir=__import__("pathlib").Path(sys.argv[1]))
    seen = {}
    t = threading.Thread(target=lambda: seen.update(late=sorted(os.sched_getaffinity(0))))
    t.start(); t.join()
    print(json.dumps({"cores": claim.cores if claim else None,
                      "main": sorted(os.sched_getaffinity(0)), **seen}), flush=True)
    sys.stdin.read()
""")


class Claimant:
    def __init__(self, lock_dir, count=1):
        self.proc = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(lock_dir), str(count)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        self.report = json.loads(self.proc.stdout.readline())

    def end(self, kill=False):
        self.proc.kill() if kill else self.proc.stdin.close()
        self.proc.wait(timeout=30)


@needs_two
def test_claimants_get_distinct_cores_then_share_them_evenly(tmp_path):
    first = [Claimant(tmp_path) for _ in CPUS]
    try:
        held = [c.report["cores"] for c in first]
        assert sorted(core for h in held for core in h) == CPUS  # one core each, all distinct
        for c in first:  # the whole process is pinned, threads started later included
            assert c.report["main"] == c.report["late"] == c.report["cores"]
        extra = Claimant(tmp_path)  # one more than cores: shares the first core (round 1)
        assert extra.report["cores"] == [CPUS[0]]
        extra.end()
    finally:
        for c in first:
            c.end()


@needs_two
def test_a_killed_workers_core_is_free_at_once(tmp_path):
    a, b = Claimant(tmp_path), Claimant(tmp_path)
    a.end(kill=True)  # SIGKILL: no clean-up code runs; the kernel drops the flock
    again = Claimant(tmp_path)
    assert again.report["cores"] == a.report["cores"]
    again.end()
    b.end()


@needs_two
def test_several_cores_per_worker(tmp_path):
    c = Claimant(tmp_path, count=1.5)  # a fractional request rounds up to whole cores
    try:
        if len(CPUS) > 2:
            assert c.report["cores"] == CPUS[:2] == c.report["main"]
        else:  # asking for every core pins nothing
            assert c.report["cores"] is None and c.report["main"] == CPUS
    finally:
        c.end()


def test_no_pinning_under_a_cgroup_limit_smaller_than_the_cpus_fake_cgroup(tmp_path, monkeypatch, caplog):
    quota = int((len(CPUS) - 0.5) * 100000)
    monkeypatch.setattr(cores, "CGROUP_ROOT", _cgroup(tmp_path / "cgroup", {"cpu.max": f"{quota} 100000"}))
    with caplog.at_level("INFO", logger="metaopt.workers.cores"):
        assert cores.claim_cores(1, lock_dir=tmp_path / "locks") is None
    assert "cgroup allows" in caplog.text
    assert sorted(os.sched_getaffinity(0)) == CPUS
    assert not (tmp_path / "locks").exists()  # nothing claimed


def _cgroup(root, files: dict[str, str | None]):
    """A fake cgroup tree under `root`: each file with its text, or a directory where the text is
    None (a file that exists but cannot be read, whoever runs the test, root included)."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if text is None else path.write_text(text)
    return root


@pytest.mark.parametrize("files, limit", [
    ({}, None),  # no CPU limit file: no limit
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
], ids=["missing", "v2-max", "v2-limit", "v1-unlimited", "v1-limit"])
def test_cgroup_limit_from_its_files(tmp_path, files, limit):
    assert cores.cgroup_cpu_limit(_cgroup(tmp_path, files)) == limit


@pytest.mark.parametrize("files, reason", [
    ({"cpu.max": None}, "cannot read .*cpu.max"),
    ({"cpu/cpu.cfs_quota_us": None}, "cannot read .*cpu.cfs_quota_us"),
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": None}, "cannot read .*cpu.cfs_period_us"),
    ({"cpu.max": ""}, "cannot parse .*cpu.max"),
    ({"cpu.max": "max"}, "cannot parse .*cpu.max"),
    ({"cpu.max": "1.5 100000"}, "cannot parse .*cpu.max: '1.5'"),
    ({"cpu.max": "max 0"}, "cannot parse .*cpu.max: '0'"),
    ({"cpu/cpu.cfs_quota_us": "lots", "cpu/cpu.cfs_period_us": "100000"}, "cannot parse .*'lots'"),
    ({"cpu/cpu.cfs_quota_us": "50000"}, "cpu.cfs_period_us does not exist"),
], ids=["v2-unreadable", "v1-quota-unreadable", "v1-period-unreadable", "v2-empty", "v2-one-field",
        "v2-fraction", "v2-zero-period", "v1-word", "v1-no-period"])
def test_a_cgroup_file_that_exists_but_is_unreadable_or_malformed_is_not_unlimited(tmp_path, files, reason):
    with pytest.raises(cores.CgroupUnreadable, match=reason):
        cores.cgroup_cpu_limit(_cgroup(tmp_path, files))


@pytest.mark.parametrize("text", [None, "garbage"], ids=["unreadable", "unparsable"])
def test_an_unknown_cgroup_limit_turns_pinning_off_and_says_why(tmp_path, monkeypatch, caplog, text):
    monkeypatch.setattr(cores, "CGROUP_ROOT", _cgroup(tmp_path / "cgroup", {"cpu.max": text}))
    with caplog.at_level("WARNING", logger="metaopt.workers.cores"):
        assert cores.claim_cores(1, lock_dir=tmp_path / "locks") is None
    assert "not pinning to cores: the cgroup CPU limit is unknown" in caplog.text
    assert "cpu.max" in caplog.text
    assert sorted(os.sched_getaffinity(0)) == CPUS and not (tmp_path / "locks").exists()


def test_this_machines_cgroup_files_read_and_parse():
    limit = cores.cgroup_cpu_limit()  # raises CgroupUnreadable if they exist but do not parse
    assert limit is None or limit > 0
