"""The chaos and fuzz suite: every fault scenario of docs/reliability.md, with one report.

Each scenario is its own script, run here as its own process (`--json`, whose last line is its
figures), so that one scenario's Ray, servers or crash cannot touch the next:

    chaos_workers.py   worker processes SIGKILLed during a run; Ray restarts them
    chaos_learner.py   the learner SIGKILLed, also mid-checkpoint; restarts resume bit for bit
    chaos_services.py  Redis and the object store stopped and restarted mid-run
    chaos_fuzz.py      hostile gRPC messages against the real learner server
    chaos_inputs.py    invalid job specs through `metaopt train`/`submit`; tampered artifacts
    chaos_load.py      256 worker streams held: learner memory bounded, no accepted estimate lost
    chaos_nodes.py     a multi-node Ray cluster loses a whole worker node mid-run; one joins later
    chaos_head.py      the Ray head (GCS, raylet and the job's driver) is lost mid-run and restarts

The report keeps every scenario's figures under `scenarios` and puts the headline figures at
the top: `worker_kills`, `run_finished` (every run of every scenario finished), `learner_kills`,
`resumes`, `corrupt_checkpoints`, `fuzz_messages` (hostile gRPC inputs), `fuzz_inputs` (how
many of them hypothesis drew, how many were mutants of real traffic), `invalid_accepted` (hostile
gRPC inputs, invalid job specs and tampered artifacts that were accepted),
`server_crashes`, `theta_unchanged_by_invalid`, `missing_figures` (figures a scenario that ran
did not report: each one breaks its promises) and `ok`: every promise held.

    python benchmarks/chaos.py [--quick] [--json] [--only NAME ...] [--out DIR]

`--quick` runs a short version of each (about ten minutes on 2 cores); without it the long ones
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
SCENARIOS = ("workers", "learner", "services", "fuzz", "inputs", "load", "nodes", "head")


def run_scenario(name: str, quick: bool, timeout_s: float = 1800) -> dict:
    """The figures of `chaos_NAME.py --json` (its last JSON line), or what went wrong."""
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
    # The figures are the last line that is a JSON object: Ray may print a log line after it.
    for line in reversed(done.stdout.splitlines()):
        try:
            figures = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(figures, dict):
            return {**figures, "seconds": seconds}
    return {"error": f"exit status {done.returncode}: {(done.stderr or done.stdout)[-2000:]}",
            "seconds": seconds}


# The figures each scenario must report. One that is absent (renamed, or dropped from its
# script) breaks the promises it feeds: it never stands in as 0 or True.
FIGURES = {
    "workers": ("worker_kills", "run_finished", "accepted_equals_applied"),
    "learner": ("learner_kills", "resumes", "corrupt_checkpoints", "within_one_interval", "run_finished"),
    "services": ("run_finished", "corrupt_checkpoints", "committed_lost"),
    "fuzz": ("fuzz_messages", "fuzz_inputs", "invalid_accepted", "server_crashes",
             "theta_unchanged_by_invalid"),
    "inputs": ("spec_started", "artifact_accepted", "spec_unclear", "secrets_echoed", "cache_poisoned",
               "artifact_unclear", "intact_failed"),
    "load": ("accepted_lost", "within_bound"),
    "nodes": ("node_kills", "run_finished", "accepted_equals_applied", "phases_done", "record_state"),
    "head": ("run_finished", "accepted_equals_applied", "phases_done", "record_state",
             "accepted_during_outage", "workers_restarted", "workers_left"),
}


def headline(scenarios: dict[str, dict]) -> dict:
    """The figures the issue names, and whether every promise held.

    A scenario left out (`--only`) promises nothing; one that ran must report every figure of
    FIGURES, else `missing_figures` names it (`scenario.figure`) and `ok` is false.
    """
    ran = {name: s for name, s in scenarios.items() if "error" not in s}
    missing = [f"{name}.{key}" for name, s in ran.items() for key in FIGURES.get(name, ()) if key not in s]

    def total(*figures: tuple[str, str]) -> int | None:
        """The sum over the scenarios that ran; None where one of them lacks its figure."""
        values = [ran[name].get(key) for name, key in figures if name in ran]
        return None if None in values else sum(values)

    def holds(name: str, promise) -> bool:
        """`promise(figures)` of a scenario that ran with every figure; true if it did not run."""
        if name not in scenarios:
            return True
        s = scenarios[name]
        return "error" not in s and all(key in s for key in FIGURES[name]) and bool(promise(s))

    finished = [ran[n].get("run_finished") for n in ("workers", "learner", "services", "nodes", "head")
                if n in ran]
    report = {
        "worker_kills": total(("workers", "worker_kills")),
        "node_kills": total(("nodes", "node_kills")),
        "run_finished": (None if None in finished else all(finished)) if finished else None,
        "learner_kills": total(("learner", "learner_kills")),
        "resumes": total(("learner", "resumes")),
        "corrupt_checkpoints": total(("learner", "corrupt_checkpoints"), ("services", "corrupt_checkpoints")),
        "fuzz_messages": total(("fuzz", "fuzz_messages")),
        "fuzz_inputs": ran.get("fuzz", {}).get("fuzz_inputs"),
        "invalid_accepted": total(("fuzz", "invalid_accepted"), ("inputs", "spec_started"),
                                  ("inputs", "artifact_accepted")),
        "server_crashes": total(("fuzz", "server_crashes")),
        "theta_unchanged_by_invalid": ran.get("fuzz", {}).get("theta_unchanged_by_invalid"),
    }
    promises = [
        not any("error" in s for s in scenarios.values()),
        not missing,
        holds("workers", lambda s: s["run_finished"] is True and s["accepted_equals_applied"] is True),
        holds("learner", lambda s: s["run_finished"] is True and s["resumes"] == s["learner_kills"]
              and s["corrupt_checkpoints"] == 0 and s["within_one_interval"] is True),
        holds("services", lambda s: s["run_finished"] is True and s["corrupt_checkpoints"] == 0
              and s["committed_lost"] == 0),
        holds("fuzz", lambda s: s["invalid_accepted"] == 0 and s["server_crashes"] == 0
              and s["theta_unchanged_by_invalid"] is True),
        holds("inputs", lambda s: all(s[key] == 0 for key in FIGURES["inputs"])),
        holds("load", lambda s: s["accepted_lost"] == 0 and s["within_bound"] is True),
        holds("nodes", lambda s: s["run_finished"] is True and s["accepted_equals_applied"] is True
              and s["phases_done"] is True and s["record_state"] == "SUCCEEDED"),
        # GCS fault tolerance: the workers deliver through the head's outage, none restarts, and
        # they remove themselves at the end.
        holds("head", lambda s: s["run_finished"] is True and s["accepted_equals_applied"] is True
              and s["phases_done"] is True and s["record_state"] == "SUCCEEDED"
              and s["accepted_during_outage"] > 0 and s["workers_restarted"] == 0 and s["workers_left"] == 0),
    ]
    return {**report, "missing_figures": missing, "ok": all(promises)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short versions (about ten minutes)")
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
