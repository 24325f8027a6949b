"""The chaos and fuzz suite: every fault scenario of docs/reliability.md, with one report.

Each scenario is its own script, run here as its own process (`--json`, whose last line is its
figures), so that one scenario's Ray, servers or crash cannot touch the next:

    chaos_workers.py   worker processes SIGKILLed during a run; Ray restarts them
    chaos_learner.py   the learner SIGKILLed, also mid-checkpoint; restarts resume bit for bit
    chaos_services.py  Redis and the object store stopped and restarted mid-run
    chaos_fuzz.py      hostile gRPC messages against the real learner server
    chaos_inputs.py    invalid job specs through `metaopt train`/`submit`; tampered artifacts
    chaos_load.py      256 worker streams held: learner memory bounded, no accepted estimate lost

The report keeps every scenario's figures under `scenarios` and puts the headline figures at
the top: `worker_kills`, `run_finished` (every run of every scenario finished), `learner_kills`,
`resumes`, `corrupt_checkpoints`, `fuzz_messages` (hostile gRPC inputs), `invalid_accepted`
(hostile gRPC inputs, invalid job specs and tampered artifacts that were accepted),
`server_crashes`, `theta_unchanged_by_invalid`, and `ok`: every promise held.

    python benchmarks/chaos.py [--quick] [--json] [--only NAME ...] [--out DIR]

`--quick` runs a short version of each (under ten minutes on 2 cores); without it the long ones
run (kills for several minutes, 256 streams for five minutes). `--out DIR` writes DIR/chaos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from tqdm import tqdm

HERE = pathlib.Path(__file__).resolve().parent
SCENARIOS = ("workers", "learner", "services", "fuzz", "inputs", "load")


def run_scenario(name: str, quick: bool, timeout_s: float = 1800) -> dict:
    """The figures of `chaos_NAME.py --json` (its last line), or what went wrong."""
    command = [sys.executable, str(HERE / f"chaos_{name}.py"), "--json", *(["--quick"] if quick else [])]
    # The repository root on the path: scenarios use the test fixtures' real servers (tests.*).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env=env,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout_s:.0f}s", "seconds": timeout_s}
    seconds = round(time.monotonic() - started, 1)
    lines = done.stdout.strip().splitlines()
    try:
        return {**json.loads(lines[-1]), "seconds": seconds}
    except (IndexError, json.JSONDecodeError):
        return {"error": f"exit status {done.returncode}: {(done.stderr or done.stdout)[-2000:]}",
                "seconds": seconds}


def headline(scenarios: dict[str, dict]) -> dict:
    """The figures the issue names, and whether every promise held."""
    get = lambda name, key, default=0: scenarios.get(name, {}).get(key, default)  # noqa: E731
    services = scenarios.get("services", {})
    finished = [get(n, "run_finished", None) for n in ("workers", "learner", "services") if n in scenarios]
    report = {
        "worker_kills": get("workers", "worker_kills"),
        "run_finished": all(finished) if finished else None,
        "learner_kills": get("learner", "learner_kills"),
        "resumes": get("learner", "resumes"),
        "corrupt_checkpoints": get("learner", "corrupt_checkpoints") + services.get("corrupt_checkpoints", 0),
        "fuzz_messages": get("fuzz", "fuzz_messages"),
        "invalid_accepted": (get("fuzz", "invalid_accepted") + get("inputs", "spec_started")
                             + get("inputs", "artifact_accepted")),
        "server_crashes": get("fuzz", "server_crashes"),
        "theta_unchanged_by_invalid": get("fuzz", "theta_unchanged_by_invalid", None),
    }
    promises = [
        not any("error" in s for s in scenarios.values()),
        report["run_finished"] is not False,
        report["resumes"] == report["learner_kills"],
        report["corrupt_checkpoints"] == 0 and report["invalid_accepted"] == 0,
        report["server_crashes"] == 0 and report["theta_unchanged_by_invalid"] is not False,
        get("workers", "accepted_equals_applied", True) is not False,
        get("learner", "within_one_interval", True) is not False,
        services.get("committed_lost", 0) == 0,
        all(get("inputs", key) == 0 for key in ("spec_unclear", "secrets_echoed", "cache_poisoned",
                                                "artifact_unclear", "intact_failed")),
        get("load", "accepted_lost") == 0 and get("load", "within_bound", True) is not False,
    ]
    return {**report, "ok": all(promises)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short versions (under ten minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos.json here")
    args = parser.parse_args()
    names = args.only or SCENARIOS
    scenarios = {}
    for name in (bar := tqdm(names, desc="chaos", unit="scenario", disable=args.json)):
        bar.set_postfix(scenario=name)
        scenarios[name] = run_scenario(name, args.quick)
    report = {**headline(scenarios), "quick": args.quick, "scenarios": scenarios}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
