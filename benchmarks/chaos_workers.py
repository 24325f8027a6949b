"""Workers dying: during a real local `metaopt train` run, SIGKILL a random worker process every
few seconds, as a preemption would. Ray restarts the actor (workers are created with
`max_restarts=-1`, and their loop with `max_task_retries=-1`); each restart is a new
incarnation with a new run id and fresh particle state; the learner drops whatever the dead
incarnation had in flight (an unfinished chunked estimate, an unsent one) and the run finishes.

The same job runs twice for the same time (its stopping rule): once with the kills, once
undisturbed. Evidence that restarts happened and were clean comes from the learner itself: the
number of distinct (worker, run id) incarnations whose estimates it accepted, and its count of
accepted estimates, which must equal the estimates in its outer steps (none lost, none twice).

Figures: `worker_kills`, `worker_incarnations` (workers + restarts that delivered),
`run_finished`, `accepted_equals_applied`, `outer_steps_per_s` with and without kills and their
ratio `throughput_kept`.

    python benchmarks/chaos_workers.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import signal
import tempfile
import threading
import time

import psutil
import yaml

from metaopt.jobspec import parse_job_spec
from metaopt.run_report import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = ROOT / "tests" / "data" / "e2e.yaml"


def working_workers() -> set[int]:
    """Pids of the PES worker actors of the local Ray this process started that are in their
    loop (Ray titles them `ray::PESWorker.run`). Other Rays on the machine are left alone."""
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith("ray::PESWorker.run"):
                found.add(process.pid)
        except psutil.Error:
            pass  # it ended while we looked
    return found


class Killer(threading.Thread):
    """SIGKILLs a random working worker about every `every_s` seconds, but only one that has
    been in its loop for `min_age_s`: killing every incarnation before its first estimate
    (start-up and compilation take seconds here) would measure nothing but start-up. Age runs
    from when a worker is first seen working, not from its process's birth: Ray may start a
    restarted actor in a process it had started idle long before."""

    def __init__(self, every_s: float, min_age_s: float, seed: int = 0):
        super().__init__(daemon=True, name="worker-killer")
        self.every_s, self.min_age_s, self.rng = every_s, min_age_s, random.Random(seed)
        self.kills: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        seen: dict[int, float] = {}  # pid -> when first seen working
        next_kill = time.monotonic() + self.rng.uniform(0.5, 1.5) * self.every_s
        while not self.stopped.wait(0.25):
            now, working = time.monotonic(), working_workers()
            seen = {pid: seen.get(pid, now) for pid in working}
            ripe = [pid for pid, since in seen.items() if now - since >= self.min_age_s]
            if now < next_kill or not ripe:
                continue
            with contextlib.suppress(ProcessLookupError):  # it ended on its own
                os.kill(self.rng.choice(ripe), signal.SIGKILL)
                self.kills.append(now)
            next_kill = now + self.rng.uniform(0.5, 1.5) * self.every_s


def run_job(workdir: pathlib.Path, job_id: str, minutes: float, workers: int,
            killer: Killer | None = None) -> dict:
    """One `train` run for `minutes` (its stopping rule), with `killer` at work if given."""
    from metaopt.train import train

    spec = yaml.safe_load(SPEC.read_text())
    spec.update(workers={"count": workers}, stop={"max_outer_steps": 10**9, "max_minutes": minutes})
    if killer:
        killer.start()
    try:
        result = train(parse_job_spec(spec), out=str(workdir), job_id=job_id, progress=False)
    finally:
        if killer:
            killer.stopped.set()
    applied = sum(row["estimates"] for row in read_metrics(pathlib.Path(result.run_dir) / "metrics.jsonl"))
    return {"worker_kills": len(killer.kills) if killer else 0, "outer_steps": result.outer_steps,
            "outer_steps_per_s": result.outer_steps / result.wall_s,
            "worker_incarnations": result.worker_incarnations, "accepted": result.estimates_accepted,
            "applied": applied, "run_finished": result.outer_steps > 0}


def kill_workers(workdir: pathlib.Path, minutes: float, workers: int = 2, kill_every_s: float = 5.0,
                 min_age_s: float = 15.0, seed: int = 0, baseline: bool = True) -> dict:
    """The job with kills, and (with `baseline`) then without, for the throughput ratio."""
    chaos = run_job(workdir, "chaos-kills", minutes, workers, Killer(kill_every_s, min_age_s, seed))
    chaos["accepted_equals_applied"] = chaos["accepted"] == chaos["applied"]
    settings = {"workers": workers, "minutes": minutes, "kill_every_s": kill_every_s, "min_age_s": min_age_s}
    if not baseline:
        return {**chaos, **settings}
    calm = run_job(workdir, "chaos-calm", minutes, workers)
    return {
        "worker_kills": chaos["worker_kills"], "worker_incarnations": chaos["worker_incarnations"],
        "run_finished": calm["run_finished"] and chaos["run_finished"],
        "accepted_equals_applied": chaos["accepted_equals_applied"] and calm["accepted"] == calm["applied"],
        "outer_steps_per_s_calm": round(calm["outer_steps_per_s"], 2),
        "outer_steps_per_s_kills": round(chaos["outer_steps_per_s"], 2),
        "throughput_kept": round(chaos["outer_steps_per_s"] / calm["outer_steps_per_s"], 3), **settings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two one-minute runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--minutes", type=float, help="per run (default 1 quick, 5 full)")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills, on average")
    parser.add_argument("--min-age", type=float, default=15.0, help="spare workers working for less (s)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_workers.json here")
    args = parser.parse_args()
    minutes = args.minutes or (1.0 if args.quick else 5.0)
    with tempfile.TemporaryDirectory(prefix="chaos-workers-") as workdir:
        result = kill_workers(pathlib.Path(workdir), minutes, kill_every_s=args.kill_every,
                              min_age_s=args.min_age, seed=args.seed,
                              baseline=not args.no_baseline)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_workers.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
