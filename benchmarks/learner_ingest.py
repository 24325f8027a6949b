"""Learner ingest: how fast one learner takes in gradient estimates, against raw gRPC.

Simulated workers in separate processes stream precomputed estimates over loopback to the
real learner (`learner.server.make_server`: validation, checksum, chunk reassembly,
accumulation, outer updates on their own thread) for several stream counts and two θ sizes:
about 2.4 thousand values (small_fc, hidden 32) and 2.3 million (VeLO-sized, 9.2 MB per
float32 estimate, sent in 4 MiB chunks). In the same run the same senders stream the same
messages to a bare gRPC server on the same method path that does nothing but answer each
message, which is what gRPC itself can carry here. Both servers are Python gRPC on asyncio
with the learner's options. The senders are asyncio gRPC too, the cheapest Python client, as
they share this machine's cores with the server. Every sender keeps `max_in_flight` estimates
unacknowledged, as a worker does, and sends each estimate with a new sequence and θ version
(serialised once; only those fields are written per send), so both runs cost the senders the
same.

Reported per run, over a measuring window after a warm-up: acknowledged (for the learner:
accepted) estimates per second, payload MB/s, outer steps per second and p50/p99 latency from
handing an estimate to gRPC to its acknowledgement. Raw and learner runs alternate, in
`--rounds` rounds (3; 1 with --quick), and the summary takes medians over rounds: this shared
2-core VM swings by ±10% from one run to the next. `ingest_ratio` is the median over rounds
of the learner's MB/s over raw gRPC's in the same round, at the large size and the largest
stream count both ran; `ingest_ratio_by_streams` gives it for every stream count.

    python benchmarks/learner_ingest.py [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import pathlib
import time
from collections.abc import Callable

import grpc
import numpy as np

from metaopt import wire

SIZES = {"small": 2_410, "large": 2_300_000}
META_BATCH = {"small": 64, "large": 64}  # estimates per outer step (VeLO: 512 of 2.3M values)
MAX_IN_FLIGHT = 2
JOB = "ingest"
METHOD = "/metaopt.v1.Learner/Connect"


# -- simulated workers (each sender process runs many streams, one thread pair per stream) --

def _length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + wire.encode_varint(len(payload)) + payload


class _Estimates:
    """A precomputed estimate of `size` values, serialised once. Each send only writes the
    fields that change (protobuf lets fields come in any order, so they are appended): the
    sequence and θ version, and each chunk's sequence. Estimates above CHUNK_BYTES are split
    as `workers.client.split_estimate` splits them."""

    def __init__(self, size: int):
        from metaopt._proto import learner_pb2 as pb
        from metaopt.workers.client import CHUNK_BYTES

        values, length, crc = wire.encode(np.random.default_rng(0).normal(0, 1e-3, size).astype(np.float32))
        header = pb.GradientEstimate(
            job_id=JOB, task=pb.TaskSpec(name="mlp", kwargs_json="{}"), num_particles=8,
            inner_steps=160, mean_loss=1.0, encoding=pb.ENCODING_FLOAT32_LE, length=length, crc32=crc)
        if len(values) > CHUNK_BYTES:
            self.chunks = [values[i:i + CHUNK_BYTES] for i in range(0, len(values), CHUNK_BYTES)]
            header.chunks = len(self.chunks)
        else:
            self.chunks = []
            header.values = values
        self.header = header.SerializeToString()
        self.messages = 1 + len(self.chunks)

    def messages_for(self, worker: bytes, sequence: int, version: int) -> list[bytes]:
        """The serialised WorkerMessages of one estimate; `worker` is the stream's worker and
        run id fields, serialised. Chunks are laid out as a worker lays them out."""
        varint = wire.encode_varint
        inner = self.header + worker + b"\x20" + varint(sequence) + b"\x28" + varint(version)
        return [_length_delimited(0x12, inner)] + [
            wire.chunk_message(sequence, i, chunk) for i, chunk in enumerate(self.chunks)]


async def _stream(channel, name: str, mode: str, estimates: _Estimates, digest: str,
                  sending: Callable[[], bool], done: list, counts: dict, drain_s: float = 0.0) -> None:
    """One worker's stream: a Hello (learner mode), then estimates as fast as credit allows,
    while `sending()` is true. Credit is counted in messages: an estimate of n messages
    takes n; the learner gives n back with its ack, the bare server one per message. Appends
    (ack time, latency) of every acknowledged estimate to `done`. With `drain_s`, the stream
    then waits up to that long for the acks of the estimates still in flight and half-closes,
    so that every estimate sent is answered (exact counts, as `chaos_load` needs); otherwise it
    is cut off. Adds to `counts["unanswered"]` the estimates whose ack never came, and to
    `counts["dropped"]` 1 if the server ended the stream before this side did."""
    from metaopt._proto import learner_pb2 as pb

    per_estimate = estimates.messages
    call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)()
    credit = asyncio.Semaphore(MAX_IN_FLIGHT * per_estimate)
    sent: dict[int, float] = {}
    state = {"version": 0, "received": 0}
    worker = _length_delimited(0x12, name.encode()) + _length_delimited(0x1A, b"r")

    def acknowledged(sequence: int) -> None:
        now = time.perf_counter()
        done.append((now, now - sent.pop(sequence)))

    async def read() -> None:
        try:
            await settle()
        finally:  # a stream the server ended must not leave the writer waiting for credit
            for _ in range(MAX_IN_FLIGHT * per_estimate):
                credit.release()

    async def settle() -> None:
        async for raw in call:
            if mode == "raw":  # one answer per message; the last of an estimate's settles it
                state["received"] += 1
                if state["received"] % per_estimate == 0:
                    acknowledged(state["received"] // per_estimate)
                credit.release()
                continue
            message = pb.LearnerMessage.FromString(raw)
            kind = message.WhichOneof("kind")
            if kind == "ack":
                state["version"] = max(state["version"], message.ack.theta_version)
                if message.ack.accepted:
                    acknowledged(message.ack.sequence)
                else:
                    sent.pop(message.ack.sequence, None)
                    counts["rejected"] += 1
                for _ in range(per_estimate):
                    credit.release()
            elif kind == "theta_updated":
                state["version"] = max(state["version"], message.theta_updated.theta_version)

    if mode == "learner":
        hello = pb.Hello(job_id=JOB, worker_id=name, run_id="r", theta_structure_digest=digest)
        await call.write(pb.WorkerMessage(hello=hello).SerializeToString())
    reader = asyncio.create_task(read())
    sequence = 0
    try:
        while sending() and not reader.done():
            for _ in range(per_estimate):
                await credit.acquire()
            if reader.done():
                break
            sequence += 1
            messages = estimates.messages_for(worker, sequence, state["version"])
            sent[sequence] = time.perf_counter()
            for message in messages:
                await call.write(message)
        if reader.done():
            counts["dropped"] = counts.get("dropped", 0) + 1
        elif drain_s:
            deadline = time.perf_counter() + drain_s
            while sent and not reader.done() and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            await call.done_writing()  # the server ends the call once it has answered everything
            await asyncio.wait([reader], timeout=max(deadline - time.perf_counter(), 0.1))
    finally:
        counts["unanswered"] = counts.get("unanswered", 0) + len(sent)
        call.cancel()
        reader.cancel()


def _sender_process(commands, results) -> None:
    """Runs streams on command: (address, mode, size, digest, streams, run_s, prefix)."""
    from metaopt.workers.client import CHANNEL_OPTIONS

    async def run(address, mode, size, digest, streams, run_s, prefix):
        estimates = _Estimates(size)
        channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(streams)]
        done, counts = [], {"rejected": 0}
        until = time.perf_counter() + run_s

        def sending() -> bool:
            return time.perf_counter() < until

        await asyncio.gather(*(_stream(c, f"{prefix}-{i}", mode, estimates, digest, sending, done, counts)
                               for i, c in enumerate(channels)),
                             return_exceptions=True)
        for channel in channels:
            await channel.close()
        offset = time.time() - time.perf_counter()  # perf_counter is per process: send wall time
        return {"done": [(t + offset, latency) for t, latency in done], "rejected": counts["rejected"]}

    for command in iter(commands.get, None):
        cpu_started = time.process_time()
        result = asyncio.run(run(*command))
        results.put(result | {"cpu_s": time.process_time() - cpu_started})


class SenderPool:
    """Sender processes started once and reused for every run (imports take seconds)."""

    def __init__(self, processes: int, target=None):
        """`target(commands, results)` runs in each process; `_sender_process` unless given."""
        context = mp.get_context("spawn")
        self.commands = [context.Queue() for _ in range(processes)]
        self.results = context.Queue()
        self.processes = [context.Process(target=target or _sender_process, args=(q, self.results),
                                          daemon=True)
                          for q in self.commands]
        for p in self.processes:
            p.start()

    def run(self, address: str, mode: str, size: int, digest: str, streams: int, run_s: float) -> dict:
        used = self.commands[:min(streams, len(self.commands))]
        for i, q in enumerate(used):
            share = streams // len(used) + (i < streams % len(used))
            q.put((address, mode, size, digest, share, run_s, f"p{i}"))
        parts = [self.results.get(timeout=run_s + 120) for _ in used]
        return {"done": [d for p in parts for d in p["done"]], "rejected": sum(p["rejected"] for p in parts),
                "cpu_s": sum(p["cpu_s"] for p in parts)}

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.processes:
            p.join(timeout=10)


# -- the two servers ---------------------------------------------------------------------

def _bare_server():
    """An asyncio server on the learner's method path that answers every message with an
    empty one, with the learner's server options."""
    from metaopt.learner.background import BackgroundServer
    from metaopt.learner.server import SERVER_OPTIONS

    async def connect(requests, context):
        async for _ in requests:
            yield b""

    async def setup(server):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "metaopt.v1.Learner", {"Connect": grpc.stream_stream_rpc_method_handler(connect)}),))

    server = BackgroundServer("127.0.0.1:0", setup, options=SERVER_OPTIONS)
    return server, server.port


def _learner(size: str):
    from metaopt.jobspec import OuterSpec
    from metaopt.learner.core import Learner, LearnerConfig
    from metaopt.learner.server import make_server

    outer = OuterSpec(meta_batch_size=META_BATCH[size], max_staleness=1000, max_in_flight=MAX_IN_FLIGHT,
                      max_estimate_norm=1e6)
    config = LearnerConfig(job_id=JOB, max_outer_steps=10**9, outer=outer)
    learner = Learner(config, {"theta": np.zeros(SIZES[size], np.float32)})
    server, port = make_server(learner, port=0)
    return learner, server, port


def measure(pool: SenderPool, mode: str, size: str, streams: int, warm_s: float, window_s: float) -> dict:
    learner = None
    if mode == "learner":
        learner, server, port = _learner(size)
    else:
        server, port = _bare_server()
    digest = learner.digest if learner else ""
    started = time.time()
    cpu_started = time.process_time()
    result = pool.run(f"127.0.0.1:{port}", mode, SIZES[size], digest, streams, warm_s + window_s)
    server_cpu_s = time.process_time() - cpu_started
    server.stop(grace=None).wait(10)
    if learner:
        learner.stop()
    lo, hi = started + warm_s, started + warm_s + window_s
    latencies = np.array([lat for t, lat in result["done"] if lo <= t < hi])
    per_s = len(latencies) / window_s
    mb = SIZES[size] * 4 / 1e6
    row = {
        "mode": mode, "size": size, "values": SIZES[size], "streams": streams,
        "estimates_per_s": per_s, "mb_per_s": per_s * mb,
        "latency_p50_ms": float(np.percentile(latencies, 50) * 1e3) if len(latencies) else None,
        "latency_p99_ms": float(np.percentile(latencies, 99) * 1e3) if len(latencies) else None,
        "rejected": result["rejected"],
        # CPU time of the server's process (all its threads) per acknowledged estimate, and of
        # the senders: on a shared 2-core machine, who used the cores.
        "server_cpu_us_per_estimate": 1e6 * server_cpu_s / max(len(result["done"]), 1),
        "sender_cpu_us_per_estimate": 1e6 * result["cpu_s"] / max(len(result["done"]), 1),
    }
    if learner:
        row["outer_steps_per_s"] = sum(lo <= step.time < hi for step in learner.history) / window_s
        row["meta_batch_size"] = META_BATCH[size]
    return row


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, size, unit, label in ((axes[0], "small", "estimates_per_s", "accepted estimates/s"),
                                  (axes[1], "large", "mb_per_s", "MB/s")):
        for mode, style in (("raw", "--o"), ("learner", "-o")):
            rows = [r for r in result["runs"] if r["size"] == size and r["mode"] == mode]
            streams = sorted({r["streams"] for r in rows})
            medians = [_median([r for r in rows if r["streams"] == s], unit) for s in streams]
            ax.plot(streams, medians, style, label=f"{mode} (median of {result['rounds']} rounds)")
        ax.set(xscale="log", xlabel="concurrent streams", ylabel=label, ylim=(0, None),
               title=f"{SIZES[size]:,} values")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _median(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def summarise(runs: list[dict]) -> dict:
    """Medians over rounds; ratios pair the raw and learner runs of one round."""
    def rounds(mode, size, streams):
        return sorted((r for r in runs if (r["mode"], r["size"], r["streams"]) == (mode, size, streams)),
                      key=lambda r: r["round"])

    def ratio(streams):
        pairs = zip(rounds("raw", "large", streams), rounds("learner", "large", streams), strict=True)
        return float(np.median([learner["mb_per_s"] / raw["mb_per_s"] for raw, learner in pairs]))

    out = {}
    large = sorted({r["streams"] for r in runs if r["size"] == "large"})
    if large:
        top = large[-1]
        out |= {"raw_grpc_mb_per_s": _median(rounds("raw", "large", top), "mb_per_s"),
                "learner_mb_per_s": _median(rounds("learner", "large", top), "mb_per_s"),
                "ingest_ratio": ratio(top), "large_streams": top,
                "ingest_ratio_by_streams": {str(s): ratio(s) for s in large}}
    small = sorted({r["streams"] for r in runs if r["size"] == "small"})
    if small:
        out |= {"accepted_per_s": _median(rounds("learner", "small", small[-1]), "estimates_per_s"),
                "small_streams": small[-1]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write learner_ingest.json and .png here")
    parser.add_argument("--processes", type=int, default=4, help="sender processes")
    parser.add_argument("--rounds", type=int, help="raw/learner pairs per setting (3; 1 with --quick)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    if args.quick:
        plan, warm_s, window_s = {"small": (64,), "large": (8,)}, 1.5, 3.0
    else:
        plan, warm_s, window_s = {"small": (8, 64, 256), "large": (8, 64, 256)}, 3.0, 8.0
    pool = SenderPool(args.processes)
    runs = []
    try:
        for size, stream_counts in plan.items():
            for streams in stream_counts:
                # Hundreds of streams of 9 MB estimates take seconds per round trip: warm up and
                # measure for longer there, so start-up does not count.
                extra_s = 0.05 * streams if size == "large" and not args.quick else 0.0
                for round_, mode in itertools.product(range(rounds), ("raw", "learner")):
                    row = measure(pool, mode, size, streams, warm_s + extra_s, window_s + extra_s)
                    runs.append(row | {"round": round_})
                    print(f"{mode:8s} {size:5s} {streams:4d} streams, round {round_ + 1}: "
                          f"{row['estimates_per_s']:9.1f} est/s "
                          f"{row['mb_per_s']:8.1f} MB/s  p50 {row['latency_p50_ms'] or 0:7.1f} ms  "
                          f"p99 {row['latency_p99_ms'] or 0:7.1f} ms  "
                          f"CPU/est server {row['server_cpu_us_per_estimate']:.0f} µs "
                          f"senders {row['sender_cpu_us_per_estimate']:.0f} µs"
                          + (f"  {row['outer_steps_per_s']:.1f} outer steps/s" if mode == "learner" else ""),
                          flush=True)
    finally:
        pool.close()
    result = {"benchmark": "learner_ingest", "quick": args.quick, "rounds": rounds,
              "warm_s": warm_s, "window_s": window_s,
              "max_in_flight": MAX_IN_FLIGHT, "sender_processes": args.processes, "runs": runs,
              **summarise(runs)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "learner_ingest.json").write_text(json.dumps(result, indent=2))
        if not args.quick:
            plot(result, args.out / "learner_ingest.png")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
