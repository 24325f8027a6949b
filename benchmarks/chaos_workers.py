"""Workers dying: during a real local `metaopt train` run, SIGKILL worker processes, as a
preemption would. Ray restarts the actor (workers are created with `max_restarts=-1`, and their
loop with `max_task_retries=-1`); each restart is a new incarnation with a new run id and fresh
particle state; the learner drops whatever the dead incarnation had in flight (an unfinished
chunked estimate, an unsent one) and the run finishes.

Two ways to choose the kill moments:

- By the clock (the default): a random working worker about every `--kill-every` seconds, for
  `--minutes` (the stopping rule), and the same job again undisturbed for the throughput ratio.
  How many kills land, and how many restarts deliver before the budget is spent, depends on
  the machine's speed: this is the benchmark, and the slow test.
- After delivery (`--kills-after-delivery N`): N kills, each as soon as the learner has accepted
  an estimate from every incarnation so far, read from its own `/metrics`
  (`metaopt_worker_incarnations_total`), so no kill can fall before an incarnation delivered,
  however slow the machine. The stopping rule is `--steps` outer steps. With one worker (the
  default here) no outer step is taken while it restarts, so the kills fit in any step budget
  that outlasts the few steps taken between an incarnation's first estimate and its kill: the
  run's length in steps does not depend on the machine. This is the default test.

Evidence that restarts happened and were clean comes from the learner itself: the number of
distinct (worker, run id) incarnations whose estimates it accepted, and its count of accepted
estimates, which must equal the estimates in its outer steps (none lost, none twice).

Figures: `worker_kills`, `worker_incarnations` (workers + restarts that delivered),
`run_finished`, `accepted_equals_applied`; by the clock also `outer_steps_per_s` with and without
kills and their ratio `throughput_kept`; after delivery also `steps_at_kills` (θ's version at
each kill) and `outer_steps`.

    python benchmarks/chaos_workers.py [--quick] [--json] [--out DIR]
    python benchmarks/chaos_workers.py --kills-after-delivery 3 --steps 600 --json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import pathlib
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

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


def learner_counts(metrics_url: str) -> dict[str, float]:
    """The learner's incarnation, θ-version and accepted-estimate counters on its /metrics ({}
    while its server is not up yet, or no more); accepted summed over task families."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
    except (OSError, http.client.HTTPException):
        return {}
    counts: dict[str, float] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("metaopt_worker_incarnations_total", "metaopt_theta_version",
                               "metaopt_gradient_estimates_accepted_total"):
                counts[sample.name] += sample.value
    return dict(counts)


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


class KillerAfterDelivery(threading.Thread):
    """SIGKILLs a working worker `kills` times, each time once the learner's /metrics at
    `metrics_url` count an accepted estimate from every incarnation so far (`workers` + kills
    made): the kill moments follow the learner's record, not the clock. It waits for the
    learner as long as the run lasts; if the run ends first, the kills made are reported."""

    def __init__(self, metrics_url: str, workers: int, kills: int, seed: int = 0, poll_s: float = 0.05):
        super().__init__(daemon=True, name="worker-killer-after-delivery")
        self.metrics_url, self.workers, self.target = metrics_url, workers, kills
        self.rng, self.poll_s = random.Random(seed), poll_s
        self.kills: list[float] = []
        self.steps_at_kills: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while len(self.kills) < self.target and not self.stopped.wait(self.poll_s):
            counts = learner_counts(self.metrics_url)
            if counts.get("metaopt_worker_incarnations_total", 0) < self.workers + len(self.kills):
                continue  # an incarnation (a first start, or the last restart) has not delivered yet
            working = working_workers()
            if not working:
                continue
            with contextlib.suppress(ProcessLookupError):  # it ended on its own: choose again
                os.kill(self.rng.choice(sorted(working)), signal.SIGKILL)
                self.kills.append(time.monotonic())
                self.steps_at_kills.append(int(counts.get("metaopt_theta_version", 0)))
                print(f"kill {len(self.kills)} at outer step {self.steps_at_kills[-1]}, "
                      f"{self.kills[-1] - started:.1f} s in", file=sys.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(workdir: pathlib.Path, job_id: str, stop: dict, workers: int,
            killer: Killer | KillerAfterDelivery | None = None, metrics_port: int = 0) -> dict:
    """One `train` run to `stop` (the spec's stopping rule), with `killer` at work if given."""
    from metaopt.train import train

    spec = yaml.safe_load(SPEC.read_text())
    spec.update(workers={"count": workers}, stop=stop)
    if killer:
        killer.start()
    try:
        result = train(parse_job_spec(spec), out=str(workdir), job_id=job_id, progress=False,
                       metrics_port=metrics_port)
    finally:
        if killer:
            killer.stopped.set()
            killer.join()
    applied = sum(row["estimates"] for row in read_metrics(pathlib.Path(result.run_dir) / "metrics.jsonl"))
    return {"worker_kills": len(killer.kills) if killer else 0, "outer_steps": result.outer_steps,
            "outer_steps_per_s": result.outer_steps / result.wall_s, "wall_s": round(result.wall_s, 1),
            "worker_incarnations": result.worker_incarnations, "accepted": result.estimates_accepted,
            "applied": applied, "run_finished": result.outer_steps > 0}


def kill_after_delivery(workdir: pathlib.Path, kills: int, steps: int, workers: int = 1,
                        seed: int = 0) -> dict:
    """The job to `steps` outer steps, its workers killed `kills` times, each kill after every
    incarnation so far delivered an accepted estimate."""
    metrics_port = _free_port()
    killer = KillerAfterDelivery(f"http://127.0.0.1:{metrics_port}/metrics", workers, kills, seed)
    report = run_job(workdir, "chaos-after-delivery", {"max_outer_steps": steps}, workers, killer,
                     metrics_port)
    return {
        **{key: report[key] for key in ("worker_kills", "worker_incarnations", "outer_steps",
                                        "accepted", "applied", "wall_s")},
        "steps_at_kills": killer.steps_at_kills,
        "run_finished": report["outer_steps"] == steps,
        "accepted_equals_applied": report["accepted"] == report["applied"],
        "workers": workers, "kills_wanted": kills, "max_outer_steps": steps,
    }


def kill_workers(workdir: pathlib.Path, minutes: float, workers: int = 2, kill_every_s: float = 5.0,
                 min_age_s: float = 15.0, seed: int = 0, baseline: bool = True) -> dict:
    """The job with kills, and (with `baseline`) then without, for the throughput ratio."""
    budget = {"max_outer_steps": 10**9, "max_minutes": minutes}
    chaos = run_job(workdir, "chaos-kills", budget, workers, Killer(kill_every_s, min_age_s, seed))
    chaos["accepted_equals_applied"] = chaos["accepted"] == chaos["applied"]
    settings = {"workers": workers, "minutes": minutes, "kill_every_s": kill_every_s, "min_age_s": min_age_s}
    if not baseline:
        return {**chaos, **settings}
    calm = run_job(workdir, "chaos-calm", budget, workers)
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
    parser.add_argument("--kills-after-delivery", type=int, metavar="N",
                        help="instead of the clock: N kills, each after every incarnation delivered")
    parser.add_argument("--steps", type=int, default=600, help="with --kills-after-delivery: the "
                        "stopping rule in outer steps")
    parser.add_argument("--workers", type=int, help="default 2 by the clock, 1 after delivery")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_workers.json here")
    args = parser.parse_args()
    minutes = args.minutes or (1.0 if args.quick else 5.0)
    with tempfile.TemporaryDirectory(prefix="chaos-workers-") as workdir:
        if args.kills_after_delivery is not None:
            result = kill_after_delivery(pathlib.Path(workdir), args.kills_after_delivery, args.steps,
                                         workers=args.workers or 1, seed=args.seed)
        else:
            result = kill_workers(pathlib.Path(workdir), minutes, workers=args.workers or 2,
                                  kill_every_s=args.kill_every, min_age_s=args.min_age,
                                  seed=args.seed, baseline=not args.no_baseline)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_workers.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
