"""Load: hold 256 worker streams on one learner for minutes; its memory must stay within a
stated bound and no accepted estimate may be lost or applied twice.

Method. The real learner (`learner.server.make_server` on 127.0.0.1, θ of 2,410 values as in
`learner_ingest`, meta-batches of 64) runs in this process, so that its resident memory (RSS)
is this process's; `learner_ingest`'s simulated workers run in separate sender processes,
each stream on its own channel, keeping `max_in_flight` estimates unacknowledged and sending
the next as soon as an ack gives credit back, so every stream keeps sending for the whole
run. A sampler thread records, every `sample_s`, the RSS, the learner's count of accepted
estimates (its Prometheus counter), the open streams (`metrics.workers_connected`) and θ's
version. The first `warm_s` are a warm-up (streams connecting, the outer update compiled);
the hold window of `seconds` follows once every stream is open, and its end is then sent to
the senders; the baseline RSS is the window's first sample.

At the end the senders stop cleanly: each stops sending, waits for the acks of its estimates
still in flight, then half-closes its stream, which the server ends once it has answered
everything. So every estimate sent is answered, and `accepted` (the acks with `accepted`
set, counted by the senders, per worker) is exact; `unanswered` counts any estimate whose ack
never came (a fault: it must be 0, or `accepted` is a lower bound). Then `learner.stop()`,
which applies every accepted estimate: the full meta-batches, then the partial one. The
checks: `accepted` == `learner_accepted` (sum of `Learner.accepted_by_worker`, also compared
worker by worker: `workers_mismatched`) == `applied` (the learner's
`totals.estimates_applied`, the sum of `OuterStep.estimates` over every outer step).
`accepted_lost` = accepted − applied: 0, and negative would mean an estimate applied twice or
applied without an ack.

The bound. At a fixed number of streams nothing in the learner should grow with time: θ,
the Adam state and the accumulators are preallocated, and per-stream and per-worker state is
per stream. What grew was `Learner.history`, one `OuterStep` (~280 bytes) per outer step:
about 6 MB for a five-minute run at this load (~70 steps/s); it now keeps the last
`HISTORY_WINDOW` (1,024) steps, ~0.3 MB, full after ~15 s of this load. `rss_bound_mb` is a fixed 64 MB
allowance over the baseline, which covers that and allocator noise (glibc keeps freed memory in per-thread
arenas: gRPC's threads, the ingest and updater threads; gRPC keeps buffer pools); a leak per
estimate or per message (a few hundred thousand of each a minute) crosses it within the run.
`rss_slope_mb_per_min` (least squares over the window) tells a slow drift that a short run
would not show; `history_growth_mb` is the part of it the history explains (0 once its window
is full). In a control run with the history emptied every second (3 minutes), RSS stayed within
4 MB of its baseline with no trend, so the history was the growth: real, if slow, over a job of
days (at one outer step a second, ~24 MB a day, and written into every checkpoint), hence the
window.

Figures: `streams` (open at peak; `streams_min` the fewest during the hold, which begins after
the warm-up and once every stream is open, at `all_open_at_s`), `seconds`,
`accepted`, `applied`, `accepted_lost`, `outer_steps`, `accepted_per_s` (the learner's count
over the window), `rejected` by reason, `rss_start_mb`, `rss_max_mb`, `rss_end_mb`,
`rss_growth_mb` (max − start), `rss_slope_mb_per_min`, `history_growth_mb`, `rss_bound_mb`,
`within_bound`, `samples` (time s, RSS MB, accepted so far, open streams, θ version).

Measured on 2 cores shared with the four sender processes, 5 minutes: 256 streams held for
299 s, none dropped; 1,405,104 estimates accepted (4,505/s), all applied in 21,955 outer steps,
none lost or applied twice; RSS 271 MB at baseline, 286 MB at most (+15 MB, bound 64 MB), a
slope of +2.0 MB/min of which the then unbounded history explained ~1.2. The drain took 0.35 s. `--quick`
(45 s): 253,175 accepted, none lost, +5.3 MB.

    python benchmarks/chaos_load.py [--quick] [--json] [--out DIR] [--streams N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import queue
import sys
import threading
import time
from collections import Counter

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.learner_ingest import (  # noqa: E402
    JOB,
    MAX_IN_FLIGHT,
    META_BATCH,
    SIZES,
    SenderPool,
    _Estimates,
    _stream,
)
from metaopt.learner.core import HISTORY_WINDOW  # noqa: E402

RSS_BOUND_MB = 64.0
OUTER_STEP_BYTES = 280  # one `OuterStep` in `Learner.history`, measured with tracemalloc
DRAIN_S = 30.0  # how long a stopping sender waits for the acks of its estimates in flight
OPEN_TIMEOUT_S = 60.0  # how long the hold waits for every stream to open; then it holds what opened


class _Tally:
    """Stands in for `_stream`'s list of (ack time, latency): a count, so that minutes of
    acks do not fill the senders' memory."""

    def __init__(self):
        self.count = 0

    def append(self, _ack) -> None:
        self.count += 1


def _hold_process(commands, results) -> None:
    """A sender process: per command (address, size, digest, streams, prefix), that many
    streams, sending until the hold's end (unix time), which the next item on `commands` names;
    then each is drained. Answers with accepted acks per worker."""
    from metaopt.workers.client import CHANNEL_OPTIONS

    async def run(address, size, digest, streams, prefix):
        estimates = _Estimates(size)
        tallies = {f"{prefix}-{i}": _Tally() for i in range(streams)}
        counts = {"rejected": 0}
        channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in tallies]
        stop_at = float("inf")  # perf_counter; this process's clock for the hold's end

        async def hear_the_end() -> None:
            nonlocal stop_at
            ends = await asyncio.to_thread(commands.get)
            stop_at = time.perf_counter() + ends - time.time()

        listener = asyncio.create_task(hear_the_end())
        outcomes = await asyncio.gather(
            *(_stream(channel, name, "learner", estimates, digest, lambda: time.perf_counter() < stop_at,
                      tally, counts, DRAIN_S)
              for channel, (name, tally) in zip(channels, tallies.items(), strict=True)),
            return_exceptions=True)
        await listener  # done already unless every stream failed before the end was named
        for channel in channels:
            await channel.close()
        errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
        return {"accepted": {name: t.count for name, t in tallies.items()}, "rejected": counts["rejected"],
                "unanswered": counts.get("unanswered", 0), "dropped": counts.get("dropped", 0),
                "failed": len(errors), "errors": errors[:3]}

    for command in iter(commands.get, None):
        results.put(asyncio.run(run(*command)))


def _start_senders(pool: SenderPool, address: str, size: int, digest: str, streams: int) -> list:
    """Split `streams` over the pool's processes and start them; their command queues, on
    which each waits for the hold's end."""
    used = pool.commands[:min(streams, len(pool.commands))]
    for i, q in enumerate(used):
        share = streams // len(used) + (i < streams % len(used))
        q.put((address, size, digest, share, f"p{i}"))
    return used


def _wait_until_open(learner, streams: int, timeout_s: float) -> float:
    """Unix time at which the learner first had `streams` open, or at which the wait gave up
    (then `streams` in the figures tells how many did)."""
    deadline = time.time() + timeout_s
    while learner.metrics.workers_connected < streams and time.time() < deadline:
        time.sleep(0.02)
    return time.time()


def _collect(pool: SenderPool, senders: int, timeout_s: float) -> dict:
    """What the `senders` processes answer, merged."""
    parts, deadline = [], time.monotonic() + timeout_s
    while len(parts) < senders:
        try:
            parts.append(pool.results.get(timeout=1.0))
        except queue.Empty:
            ended = [p.exitcode for p in pool.processes if not p.is_alive()]
            if ended or time.monotonic() > deadline:
                raise RuntimeError(f"sender processes ended (exit codes {ended}) or did not answer by the "
                                   "deadline; their output above says why") from None
    merged = {key: sum(p[key] for p in parts) for key in ("rejected", "unanswered", "dropped", "failed")}
    return merged | {"accepted": Counter({k: v for p in parts for k, v in p["accepted"].items()}),
                     "errors": [e for p in parts for e in p["errors"]][:5]}


def _serve(size: int):
    """The learner as `learner_ingest` serves it, with θ of `size` values. Staleness is not
    refused (max_staleness 1000): this is about holding streams, not the staleness policy."""
    from metaopt.jobspec import OuterSpec
    from metaopt.learner.core import Learner, LearnerConfig
    from metaopt.learner.server import make_server

    outer = OuterSpec(meta_batch_size=META_BATCH["small"], max_staleness=1000, max_in_flight=MAX_IN_FLIGHT,
                      max_estimate_norm=1e6)
    config = LearnerConfig(job_id=JOB, max_outer_steps=10**9, outer=outer)
    learner = Learner(config, {"theta": np.zeros(size, np.float32)})
    server, port = make_server(learner, port=0)
    return learner, server, port


class _Sampler:
    """Every `every_s` on a thread of its own: (unix time, RSS MB, accepted so far, open
    streams, θ version)."""

    def __init__(self, learner, every_s: float):
        self.learner, self.every_s = learner, every_s
        self.samples: list[tuple[float, float, int, int, int]] = []
        self._process = psutil.Process()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-load-sampler")
        self._thread.start()

    def sample(self) -> tuple[float, float, int, int, int]:
        learner = self.learner
        accepted = learner.metrics.registry.get_sample_value(
            "metaopt_gradient_estimates_accepted_total", {"job_id": JOB, "task_family": "mlp"}) or 0
        return (time.time(), self._process.memory_info().rss / 2**20, int(accepted),
                learner.metrics.workers_connected, learner.version)

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._halt.wait(self.every_s):
                return

    def stop(self) -> None:
        self._halt.set()
        self._thread.join()


def _rejected(learner) -> dict[str, int]:
    """The learner's refusals by reason, from its Prometheus counter."""
    name = "metaopt_gradient_estimates_rejected"
    metrics = [m for m in learner.metrics.registry.collect() if m.name == name]
    return {s.labels["reason"]: int(s.value)
            for metric in metrics for s in metric.samples if s.name.endswith("_total") and s.value}


def hold_streams(streams: int = 256, seconds: float = 60.0, size: int = SIZES["small"], sample_s: float = 1.0,
                 warm_s: float = 10.0, processes: int = 4, pool: SenderPool | None = None) -> dict:
    """Hold `streams` sending streams on a real learner for `seconds` once the warm-up of
    `warm_s` is over and every stream is open, then drain and stop; the figures of the module
    docstring. `pool` (from `SenderPool(n, target=_hold_process)`) is reused if given; else one
    of `processes` is started and closed."""
    own_pool = pool is None
    pool = pool or SenderPool(processes, target=_hold_process)
    learner, server, port = _serve(size)
    sampler = _Sampler(learner, sample_s)
    started = time.time()
    try:
        senders = _start_senders(pool, f"127.0.0.1:{port}", size, learner.digest, streams)
        # The hold begins once every stream is open: sender processes on a busy machine may take
        # longer than the warm-up to open theirs (CI once took 10 s), and a fixed end left no hold.
        all_open = _wait_until_open(learner, streams, OPEN_TIMEOUT_S)
        ends = max(started + warm_s, all_open) + seconds
        for q in senders:
            q.put(ends)
        sent = _collect(pool, len(senders), ends - time.time() + DRAIN_S + 120)
        drained_s = time.time() - ends
        sampler.stop()
        learner.stop()
        rss_after_stop_mb = sampler.sample()[1]
    finally:
        server.stop(grace=None).wait(10)
        if own_pool:
            pool.close()

    samples = [(t - started, *rest) for t, *rest in sampler.samples]
    all_open_at, ends_at = all_open - started, ends - started
    window = [s for s in samples if ends_at - seconds <= s[0] <= ends_at] or samples[-1:]
    (t0, rss0, acc0, _, v0), (t1, _, acc1, _, v1) = window[0], window[-1]
    rss = np.array([s[1] for s in window])
    slope = float(np.polyfit([s[0] for s in window], rss, 1)[0] * 60) if len(window) > 2 else 0.0
    applied = learner.totals.estimates_applied
    accepted = sum(sent["accepted"].values())
    workers = set(sent["accepted"]) | set(learner.accepted_by_worker)
    return {
        "streams_requested": streams, "streams": max(s[3] for s in samples),
        "streams_min": min(s[3] for s in window), "all_open_at_s": round(all_open_at, 2),
        "seconds": seconds, "measured_s": t1 - t0, "warm_s": warm_s,
        "drain_s": drained_s, "values": size, "meta_batch_size": learner.config.outer.meta_batch_size,
        "max_in_flight": MAX_IN_FLIGHT, "accepted": accepted,
        "learner_accepted": sum(learner.accepted_by_worker.values()), "applied": applied,
        "accepted_lost": accepted - applied,
        "workers_mismatched": sum(sent["accepted"][w] != learner.accepted_by_worker[w] for w in workers),
        "unanswered": sent["unanswered"], "streams_dropped": sent["dropped"],
        "streams_failed": sent["failed"], "stream_errors": sent["errors"],
        "outer_steps": learner.version,
        "accepted_per_s": (acc1 - acc0) / max(t1 - t0, 1e-9), "rejected": _rejected(learner),
        "sender_rejected": sent["rejected"],
        "rss_start_mb": rss0, "rss_max_mb": float(rss.max()), "rss_end_mb": float(rss[-1]),
        "rss_growth_mb": float(rss.max() - rss0), "rss_slope_mb_per_min": slope,
        "history_growth_mb": (min(v1, HISTORY_WINDOW) - min(v0, HISTORY_WINDOW)) * OUTER_STEP_BYTES
                             / 2**20,
        "rss_after_stop_mb": rss_after_stop_mb, "rss_bound_mb": RSS_BOUND_MB,
        "within_bound": bool(rss.max() - rss0 <= RSS_BOUND_MB),
        "samples": [[round(t, 2), round(r, 2), a, c, v] for t, r, a, c, v in samples],
    }


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss, accepted, open_streams, _ = np.array(result["samples"], dtype=float).T
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(t, rss, "-", label="learner RSS")
    top.axhline(result["rss_start_mb"] + result["rss_bound_mb"], ls="--", c="r", label="baseline + bound")
    top.axvspan(0, max(result["warm_s"], result["all_open_at_s"]), color="0.9", label="warm-up")
    top.set(ylabel="MB", title=f"{result['streams']} streams, θ of {result['values']:,} values")
    top.legend(loc="lower right")
    bottom.plot(t[1:], np.diff(accepted) / np.diff(t), "-", label="accepted/s")
    bottom.set(xlabel="seconds", ylabel="accepted estimates / s")
    streams_axis = bottom.twinx()
    streams_axis.plot(t, open_streams, ":", c="g", label="open streams")
    streams_axis.set(ylabel="open streams", ylim=(0, max(open_streams.max(), 1) * 1.1))
    bottom.legend(loc="lower left")
    streams_axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 streams for 45 s instead of 5 minutes")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write chaos_load.json (and .png unless quick) here")
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--seconds", type=float, help="hold window (default 45 quick, 300 full)")
    parser.add_argument("--processes", type=int, default=4, help="sender processes")
    args = parser.parse_args()
    seconds = args.seconds or (45.0 if args.quick else 300.0)
    result = {"benchmark": "chaos_load", "quick": args.quick,
              **hold_streams(args.streams, seconds, processes=args.processes)}
    r = result
    print(f"{r['streams']} streams held {r['measured_s']:.0f} s (fewest {r['streams_min']}): "
          f"{r['accepted']} accepted ({r['accepted_per_s']:.0f}/s), {r['applied']} applied in "
          f"{r['outer_steps']} outer steps, lost {r['accepted_lost']}; RSS {r['rss_start_mb']:.0f} → "
          f"max {r['rss_max_mb']:.0f} MB (+{r['rss_growth_mb']:.1f}, bound {RSS_BOUND_MB:.0f}, "
          f"slope {r['rss_slope_mb_per_min']:+.2f} MB/min)", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "chaos_load.json").write_text(json.dumps(result, indent=2))
        if not args.quick:
            plot(result, args.out / "chaos_load.png")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
