"""Learner dying: SIGKILL the learner at random moments and in the middle of checkpoint writes,
many times. Every restart must resume from the newest complete checkpoint with θ, the outer
optimizer's state and the RNG bit for bit as they were saved; the workers must reconnect on
their own; no checkpoint may ever be corrupt or half-visible.

Setup: the learner runs alone, as in its own pod (`metaopt serve-learner`, checkpoints every
`interval_s` seconds to a local store), and `workers` worker processes (`metaopt worker`) are
started once and never restarted. Each trial:

1. start the learner (same job id, port and token). It resumes from its last good checkpoint
   and logs the step and the sha256 of the state it restored (`Checkpointer.restore_latest`);
2. once it makes new outer steps (its /metrics), pick the moment: at random (0.2 to 2 s later)
   or, every other trial, the instant a checkpoint write is under way (its temporary directory
   exists), then read θ's version from /metrics and SIGKILL it;
3. inspect the store as the next learner will find it: every committed checkpoint must verify
   (size and sha256 of its files), and the newest one, with the `state_sha256` its writer
   computed from memory when it saved, is what the next start must resume, bit for bit.
   Readers trust only committed directories and verify every file, so a half-visible checkpoint
   (a write taken for complete before it was) would be a committed one that fails to verify:
   it is counted in `corrupt_checkpoints`. An uncommitted `ckpt-*` directory (a kill between a
   prune's removal of the marker and of the files) is ignored by readers and swept by the next
   prune; those are counted apart, as `uncommitted_dirs`.

Last, the learner is started with a stopping rule a few steps ahead: the run finishes, and the
workers (which lived through every kill) get Stop and exit 0.

Figures: `learner_kills`, `kills_during_write`, `resumes` (restarts that resumed the expected
step with the expected state digest), `resume_mismatches`, `corrupt_checkpoints`,
`uncommitted_dirs`, `steps_lost` (per crash, θ's version at the kill minus the step
resumed: max and mean), `seconds_lost_max` (the work lost in time: from the newest step saved,
or from when this learner began stepping, to the kill; at most `interval_s` plus one write),
`run_finished`, `workers_exited_ok`.

    python benchmarks/chaos_learner.py [--quick] [--json] [--trials N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

from metaopt import storage

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = ROOT / "tests" / "data" / "e2e.yaml"
JOB = "chaos-learner"
RESUMED = re.compile(r"resumed job \S+ at outer step (\d+) from \S+ \(state sha256 (\w+)\)")
WRITE_SLACK_S = 0.5  # a kill during a write loses the interval plus that write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, log: pathlib.Path) -> subprocess.Popen:
    with log.open("ab") as sink:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "metaopt.cli", *args], stdout=sink,
                                stderr=subprocess.STDOUT, cwd=ROOT)


class _Learner:
    """One `metaopt serve-learner` process of the job."""

    def __init__(self, workdir: pathlib.Path, spec: pathlib.Path, port: int, token: pathlib.Path, trial: int,
                 max_outer_steps: int | None = None):
        self.log = workdir / f"learner-{trial}.log"
        self.metrics_port = _free_port()
        extra = ["--max-outer-steps", str(max_outer_steps), "--json"] if max_outer_steps else []
        self.process = _cli("serve-learner", str(spec), "--host", "127.0.0.1", "--port", str(port),
                            "--metrics-port", str(self.metrics_port), "--token-file", str(token),
                            "--out", str(workdir / "out"), "--job-id", JOB, *extra, log=self.log)

    def resumed(self, timeout_s: float = 60) -> tuple[int, str] | None:
        """(step, state sha256) of the resume it logged, once it serves; None if it started fresh."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            found = RESUMED.search(text)
            if found:
                return int(found.group(1)), found.group(2)
            if "learner listening on" in text:
                return None
            if self.process.poll() is not None:
                raise RuntimeError(f"the learner exited ({self.process.returncode}):\n{text[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"the learner did not start within {timeout_s}s:\n{self.log.read_text()[-2000:]}")

    def version(self) -> int | None:
        """θ's version from /metrics; None if it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        found = re.search(r"^metaopt_theta_version\{[^}]*\} (\S+)$", text, re.MULTILINE)
        return int(float(found.group(1))) if found else 0

    def wait_for_steps(self, beyond: int, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            version = self.version()
            if version is not None and version > beyond:
                return version
            time.sleep(0.05)
        raise TimeoutError(f"no outer step beyond {beyond} in {timeout_s}s:\n{self.log.read_text()[-2000:]}")


def _writing(checkpoints: pathlib.Path) -> bool:
    """Whether a checkpoint write is under way: its hidden temporary directory exists."""
    try:
        return any(name.startswith(".ckpt-") and ".tmp-" in name for name in os.listdir(checkpoints))
    except FileNotFoundError:
        return False


def _kill_moment(checkpoints: pathlib.Path, during_write: bool, rng: random.Random) -> bool:
    """Wait for the moment to kill; True if a write was under way then."""
    if during_write:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _writing(checkpoints):
                return True
    else:
        time.sleep(rng.uniform(0.2, 2.0))
    return _writing(checkpoints)


def _inspect(checkpoints: pathlib.Path) -> dict:
    """The store as the next learner finds it: the newest committed checkpoint, and faults."""
    corrupt, uncommitted, newest = 0, 0, None
    for name in sorted(os.listdir(checkpoints), reverse=True) if checkpoints.exists() else []:
        if not storage.CHECKPOINT_DIR_RE.fullmatch(name):
            continue  # hidden temporaries of a killed write: never read, swept by pruning
        uri = str(checkpoints / name)
        if not storage.is_committed(uri):
            uncommitted += 1
            continue
        try:
            _, marker = storage.read_committed(uri)
        except storage.CorruptArtifactError:
            corrupt += 1
            continue
        if newest is None:
            meta = marker["meta"]
            newest = {"step": marker["step"], "state_sha256": meta["state_sha256"],
                      "time": meta["history"][-1]["time"] if meta["history"] else None}
    return {"newest": newest, "corrupt": corrupt, "uncommitted": uncommitted}


def _exit_code(worker: subprocess.Popen, log: pathlib.Path, timeout_s: float = 60) -> int:
    """The worker's exit code once the job is over; a worker that outlives it fails with its log."""
    try:
        return worker.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGUSR1)  # its threads' stacks, into its log
        time.sleep(1.0)
        raise TimeoutError(f"a worker did not exit within {timeout_s}s of the job's end; its log:\n"
                           f"{log.read_text(errors='replace')[-6000:]}") from None


def kill_learner(workdir: pathlib.Path, trials: int, interval_s: float = 0.5, workers: int = 2,
                 seed: int = 0) -> dict:
    rng = random.Random(seed)
    spec = yaml.safe_load(SPEC.read_text())
    spec.update(workers={"count": workers}, checkpoint_interval_s=interval_s,
                stop={"max_outer_steps": 10**6}, storage={"root": str(workdir / "store")})
    spec_path = workdir / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    token = workdir / "token"
    token.write_text("chaos-learner-token\n")
    checkpoints = workdir / "store" / "runs" / JOB / "checkpoints"
    port = _free_port()
    crew = [_cli("worker", str(spec_path), "--learner", f"127.0.0.1:{port}", "--job-id", JOB,
                 "--worker-id", f"worker-{i}", "--token-file", str(token), "--json",
                 log=workdir / f"worker-{i}.log") for i in range(workers)]
    kills, lost_steps, lost_s = [], [], []
    faults = {"resume_mismatches": 0, "corrupt_checkpoints": 0, "uncommitted_dirs": 0}
    expected = None  # what the next start must resume: {"step", "state_sha256", "time"}
    try:
        for trial in range(trials + 1):
            last = trial == trials
            learner = _Learner(workdir, spec_path, port, token, trial,
                               max_outer_steps=(expected["step"] if expected else 0) + 10 if last else None)
            resumed = learner.resumed()
            if expected is not None:
                got = resumed and {"step": resumed[0], "state_sha256": resumed[1]}
                if got != {k: expected[k] for k in ("step", "state_sha256")}:
                    faults["resume_mismatches"] += 1
            if last:
                finished = learner.process.wait(timeout=120) == 0
                break
            learner.wait_for_steps(expected["step"] if expected else 0)
            stepping_since = time.time()  # this learner's own work begins about here
            during_write = _kill_moment(checkpoints, trial % 2 == 1, rng)
            version = learner.version()
            learner.process.send_signal(signal.SIGKILL)
            killed_at = time.time()
            learner.process.wait()
            kills.append(during_write)
            found = _inspect(checkpoints)
            faults["corrupt_checkpoints"] += found["corrupt"]
            faults["uncommitted_dirs"] += found["uncommitted"]
            expected = found["newest"]
            if expected is not None and version is not None:
                lost_steps.append(max(version - expected["step"], 0))
                # Work lost: since the newest step saved, or since this learner began stepping if
                # all it saved is what it resumed (that step's time is its predecessor's) or the
                # step-0 checkpoint, whose history is empty (time None).
                saved_at = stepping_since if expected["time"] is None else expected["time"]
                lost_s.append(killed_at - max(saved_at, stepping_since))
        workers_ok = all(_exit_code(w, workdir / f"worker-{i}.log") == 0 for i, w in enumerate(crew))
    finally:
        for process in crew:
            if process.poll() is None:
                process.kill()
    return {
        "learner_kills": len(kills), "kills_during_write": sum(kills),
        "resumes": len(kills) - faults["resume_mismatches"], **faults,
        "steps_lost_max": max(lost_steps, default=0),
        "steps_lost_mean": sum(lost_steps) / max(len(lost_steps), 1),
        "seconds_lost_max": round(max(lost_s, default=0.0), 3), "checkpoint_interval_s": interval_s,
        "within_one_interval": max(lost_s, default=0.0) <= interval_s + WRITE_SLACK_S,
        "run_finished": finished, "workers_exited_ok": workers_ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 kills (under a minute and a half)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--trials", type=int, help="kills (default 6 quick, 40 full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_learner.json here")
    args = parser.parse_args()
    trials = args.trials or (6 if args.quick else 40)
    with tempfile.TemporaryDirectory(prefix="chaos-learner-") as workdir:
        result = kill_learner(pathlib.Path(workdir), trials, seed=args.seed)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_learner.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
