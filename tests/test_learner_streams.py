"""The learner at scale, through its real gRPC server: chunked estimates, replays, bfloat16,
credit under back pressure, job tokens and TLS, vanished workers and 256 concurrent streams."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt.jobspec import OuterSpec
from metaopt.learner.core import Learner, LearnerConfig
from metaopt.learner.security import TLSConfig
from metaopt.learner.server import LearnerService, make_server
from metaopt.workers.client import ClientTLS, LearnerClient, split_estimate
from tests.ports import free_port

SIZE = 11
THETA0 = {"w": np.linspace(-1, 1, SIZE, dtype=np.float32)}
TOKEN = "job-token-123"


def make_learner(size: int = SIZE, **overrides) -> Learner:
    outer = dict(meta_batch_size=1, max_staleness=1000, max_estimate_norm=1e6, learning_rate=0.01)
    outer |= {k: overrides.pop(k) for k in list(overrides) if k in OuterSpec.model_fields}
    config = dict(job_id="job-s", max_outer_steps=1000) | overrides
    theta0 = THETA0 if size == SIZE else {"w": np.zeros(size, np.float32)}
    return Learner(LearnerConfig(**config, outer=OuterSpec(**outer)), theta0)


def estimate(values, sequence, worker="w", run="r", encoding=pb.ENCODING_FLOAT32_LE, version=0):
    data, n, crc = wire.encode(np.asarray(values, np.float32), encoding)
    return pb.GradientEstimate(
        job_id="job-s", worker_id=worker, run_id=run, sequence=sequence, theta_version=version,
        task=pb.TaskSpec(name="quadratic", kwargs_json="{}"), num_particles=1, inner_steps=2,
        mean_loss=1.0, encoding=encoding, values=data, length=n, crc32=crc)


def hello(learner, worker="w", run="r"):
    return pb.WorkerMessage(hello=pb.Hello(job_id="job-s", worker_id=worker, run_id=run,
                                           theta_structure_digest=learner.digest))


def rejected(learner, reason):
    return learner.metrics.registry.get_sample_value(
        "metaopt_gradient_estimates_rejected_total", {"job_id": "job-s", "reason": reason}) or 0.0


@pytest.fixture
def serve():
    """serve(learner, **make_server kwargs) → port; servers are stopped afterwards."""
    servers = []

    def start(learner, **kwargs):
        server, port = make_server(learner, "127.0.0.1", 0, **kwargs)
        servers.append((server, learner))
        return port

    yield start
    for server, learner in servers:
        learner.stop()
        server.stop(None)


def test_a_client_waiting_for_a_learner_connects_within_a_second_of_its_start():
    """The learner comes up 5.5 s after the client began to wait. gRPC's default reconnect backoff
    (tries at 1, 2.6, 5.2, 9.3 s, each interval ±20%) would connect 3 s late at the least, past
    the learner's linger after a finished job; the client's, capped at 1 s (+20%), connects within
    2.5 s, the Hello answered included."""
    learner, port, connected = make_learner(), free_port(), []
    waiting = threading.Thread(target=lambda: connected.append(
        (LearnerClient(f"127.0.0.1:{port}", hello(learner).hello, connect_timeout_s=20), time.monotonic())))
    waiting.start()
    time.sleep(5.5)
    server, _ = make_server(learner, "127.0.0.1", port)
    started = time.monotonic()
    try:
        waiting.join(timeout=20)
        assert connected, "the client did not connect"
        assert connected[0][1] - started < 2.5, connected[0][1] - started
        connected[0][0].close()
    finally:
        learner.stop()
        server.stop(None)


def test_every_client_has_a_connection_of_its_own(serve):
    """gRPC shares connections between a process's channels by default. A worker's new client
    would then adopt the connection of the one it just closed, which a killed learner leaves
    READY for an instant, then IDLE; with `channel_ready_future` it waited idle past the whole
    life of the restarted learner (benchmarks/chaos_learner.py, 3 of 8 runs under gRPC tracing)."""
    learner = make_learner()
    port = serve(learner)
    clients = [LearnerClient(f"127.0.0.1:{port}", hello(learner, run=run).hello) for run in "ab"]
    try:
        ours = [c for c in psutil.Process().net_connections(kind="tcp")
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]
        assert len({c.laddr.port for c in ours}) == 2, ours
    finally:
        for client in clients:
            client.close()


def _parsed(message) -> pb.WorkerMessage:
    return pb.WorkerMessage.FromString(message) if isinstance(message, bytes) else message


def acks(port, messages, metadata=None, channel=None):
    """Send `messages` (WorkerMessages, or serialised ones) on one stream, keep it open until
    every estimate has its ack; the acks."""
    channel = channel or grpc.insecure_channel(f"127.0.0.1:{port}")
    expected = sum(_parsed(m).WhichOneof("kind") == "estimate" for m in messages[1:])
    got, done = [], threading.Event()

    def requests():
        yield from messages
        done.wait(10)

    serialise = lambda m: m if isinstance(m, bytes) else m.SerializeToString()  # noqa: E731
    for reply in channel.stream_stream("/metaopt.v1.Learner/Connect", request_serializer=serialise,
                                       response_deserializer=pb.LearnerMessage.FromString)(
            requests(), metadata=metadata, timeout=20):
        if reply.WhichOneof("kind") == "ack":
            got.append(reply.ack)
            if len(got) == expected:
                done.set()
                break
    return got


def test_a_chunked_estimate_is_reassembled_and_equals_the_inline_one(serve, monkeypatch):
    """Inline; in worker-made chunks, read where they arrived; in chunks that split values
    (another sender's), copied into one aligned buffer first. All three give the same θ."""
    gathered = []
    gather = LearnerService._gather
    monkeypatch.setattr(LearnerService, "_gather", lambda self, s: gathered.append(1) or gather(self, s))
    values = np.arange(SIZE, dtype=np.float32) / 10
    results = []
    for chunk_bytes, copies in ((1 << 20, 0), (16, 0), (6, 1)):  # inline; 3 chunks; 8 ragged ones
        learner = make_learner()
        port = serve(learner)
        messages = split_estimate(estimate(values, 1), chunk_bytes)
        assert len(messages) == (1 if chunk_bytes >= 4 * SIZE else 1 + -(-4 * SIZE // chunk_bytes))
        assert [a.accepted for a in acks(port, [hello(learner), *messages])] == [True]
        assert learner.wait_idle()
        assert len(gathered) == copies
        gathered.clear()
        results.append(np.asarray(learner.theta))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_chunk_faults_are_rejected_and_change_nothing(serve):
    learner = make_learner()
    port = serve(learner)
    before = np.asarray(learner.theta).copy()
    header, *chunks = split_estimate(estimate(np.ones(SIZE), 1), 16)
    corrupt = pb.WorkerMessage.FromString(chunks[1])
    corrupt.chunk.values = bytes(len(corrupt.chunk.values))  # zeros: the checksum fails
    h2, *c2 = split_estimate(estimate(np.ones(SIZE), 2), 16)
    h3, *c3 = split_estimate(estimate(np.ones(SIZE), 3), 16)
    stray = split_estimate(estimate(np.ones(SIZE), 9), 16)[1]
    h4, *c4 = split_estimate(estimate(np.ones(SIZE), 4), 16)
    empty = pb.WorkerMessage(chunk=pb.EstimateChunk(sequence=4, index=0))
    ragged = split_estimate(estimate(np.ones(SIZE), 5), 6)  # 6-byte chunks split values: fine
    replies = acks(port, [hello(learner), header, chunks[0], corrupt, chunks[2],  # bad checksum
                          h2, c2[1], c2[0], c2[2],  # out of order
                          h3, c3[0], stray,  # another estimate's chunk cuts it off
                          h4, empty, *c4,  # an empty chunk (endless ones would never fill it)
                          ])
    reasons = [pb.RejectReason.Name(a.reason).removeprefix("REJECT_REASON_") for a in replies]
    assert reasons == ["BAD_CHECKSUM", "BAD_CHUNK", "BAD_CHUNK", "BAD_CHUNK"]
    assert rejected(learner, "bad_chunk") >= 2 and rejected(learner, "bad_checksum") == 1
    np.testing.assert_array_equal(np.asarray(learner.theta), before)
    assert [a.accepted for a in acks(port, [hello(learner), *ragged])] == [True]


def test_an_estimate_above_the_message_limit_travels_in_chunks_through_the_client(serve):
    size = 1_500_000  # 6 MB: above CHUNK_BYTES (4 MiB), so two chunks
    learner = make_learner(size)
    port = serve(learner)
    hello_msg = hello(learner).hello
    client = LearnerClient(f"127.0.0.1:{port}", hello_msg)
    try:
        assert client.send(estimate(np.full(size, 1e-4), 1))
        deadline = time.monotonic() + 20
        while client.accepted < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.close()
    assert client.accepted == 1 and client.rejected == 0
    assert learner.wait_idle() and learner.version == 1


def test_a_replayed_estimate_is_rejected_and_counted(serve):
    learner = make_learner()
    port = serve(learner)
    first = estimate(np.ones(SIZE) * 0.1, 1)
    replies = acks(port, [hello(learner), pb.WorkerMessage(estimate=first),
                          pb.WorkerMessage(estimate=first),
                          pb.WorkerMessage(estimate=estimate(np.ones(SIZE) * 0.1, 2))])
    assert [a.accepted for a in replies] == [True, False, True]
    assert replies[1].reason == pb.REJECT_REASON_REPLAYED
    assert rejected(learner, "replayed") == 1
    # The same sequence from another run id (a restarted worker) is new work.
    assert learner.submit(estimate(np.ones(SIZE) * 0.1, 1, run="r2")).accepted


def test_bfloat16_estimates_are_within_the_stated_error_and_accepted():
    rng = np.random.default_rng(0)
    values = (rng.normal(size=100_000) * np.exp(rng.uniform(-20, 20, 100_000))).astype(np.float32)
    data, n, crc = wire.encode(values, pb.ENCODING_BFLOAT16_LE)
    assert len(data) == 2 * n
    decoded = wire.decode(data, n, crc, pb.ENCODING_BFLOAT16_LE)
    # Rounding to nearest on 8 significant bits: relative error at most half an ulp, 2^-8
    # (values here span 1e-9 to 1e9, all normal numbers).
    assert np.all(np.abs(decoded - values) <= 2.0**-8 * np.abs(values))
    special = np.array([np.inf, -np.inf, np.nan, 0.0], np.float32)
    back = wire.decode(*wire.encode(special, pb.ENCODING_BFLOAT16_LE), pb.ENCODING_BFLOAT16_LE)
    assert np.isposinf(back[0]) and np.isneginf(back[1]) and np.isnan(back[2]) and back[3] == 0
    learner = make_learner()
    assert learner.submit(estimate(np.ones(SIZE) * 0.1, 1, encoding=pb.ENCODING_BFLOAT16_LE)).accepted
    ack = learner.submit(estimate(np.full(SIZE, np.nan), 2, encoding=pb.ENCODING_BFLOAT16_LE))
    assert ack.reason == pb.REJECT_REASON_NON_FINITE


def test_a_worker_never_has_more_estimates_in_flight_than_its_credit(serve):
    """The updater is held, so both accumulators fill and the learner blocks: the worker's
    sends must stop at max_in_flight unacknowledged, and all go through once it is released."""
    learner = make_learner(max_in_flight=2, max_pending_batches=1)
    release = threading.Event()
    apply = learner._apply
    learner._apply = lambda *args: (release.wait(120), apply(*args))[1]  # `finally` releases
    port = serve(learner)
    client = LearnerClient(f"127.0.0.1:{port}", hello(learner).hello)
    sent, in_flight = [], []

    def send_all():
        for i in range(1, 9):
            client.send(estimate(np.ones(SIZE) * 0.01, i))
            sent.append(i)
            in_flight.append(len(sent) - client.accepted - client.rejected)

    sender = threading.Thread(target=send_all)
    sender.start()
    deadline = time.monotonic() + 20  # a slow machine gets there later, never not at all
    while (len(sent) < 4 or client.accepted < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a fifth send, past the credit, would show by now
    try:
        # Accepted: two (one in the held update, one filling the spare accumulator); the third
        # waits inside the learner unacknowledged; the fourth is the second credit's.
        assert client.accepted == 2 and len(sent) == 4
        sample = learner.metrics.registry.get_sample_value
        assert sample("metaopt_buffered_estimates", {"job_id": "job-s"}) == 2
    finally:
        release.set()
        sender.join(20)
        deadline = time.monotonic() + 20
        while client.accepted < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
    assert client.accepted == 8 and max(in_flight) <= 2


def test_acks_settled_before_a_blocked_estimate_go_out_while_it_waits(serve, monkeypatch):
    """Estimates 2 and 3 reach the ingest thread together; the update is held, so 2 fills the
    last accumulator and 3 must wait. 2's ack goes out before 3 waits: a worker is never kept
    from credit the learner has already earned (the cause of a flaky credit test)."""
    learner = make_learner(max_in_flight=3, max_pending_batches=1)
    release = threading.Event()
    apply = learner._apply
    learner._apply = lambda *args: (release.wait(120), apply(*args))[1]
    settle, first = LearnerService._settle, threading.Event()

    def settle_1_while_2_and_3_queue(self, stream, message):
        if not first.is_set():
            first.set()
            # alone this wait ends at once; in a full `make test` it ran out (20 s) in both of the
            # last two fresh-clone runs, and the test still passed: 5 s, until that is understood
            deadline = time.monotonic() + 5
            while self._ingest.qsize() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        return settle(self, stream, message)

    monkeypatch.setattr(LearnerService, "_settle", settle_1_while_2_and_3_queue)
    port = serve(learner)
    got, all_sent = [], threading.Event()

    def requests():
        yield hello(learner)
        for i in (1, 2, 3):
            yield pb.WorkerMessage(estimate=estimate(np.ones(SIZE) * 0.01, i))
        all_sent.wait(60)

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    replies = channel.stream_stream("/metaopt.v1.Learner/Connect",
                                    request_serializer=pb.WorkerMessage.SerializeToString,
                                    response_deserializer=pb.LearnerMessage.FromString)(
        requests(), timeout=60)
    try:
        for reply in replies:
            if reply.WhichOneof("kind") == "ack":
                got.append(reply.ack.sequence)
                if len(got) == 2:
                    assert learner.accumulators_full and not release.is_set()
                    release.set()
                if len(got) == 3:
                    break
    finally:
        release.set()
        all_sent.set()
        channel.close()
    assert got == [1, 2, 3]


def test_token_and_tls_on_the_learner(serve, pki):
    learner = make_learner()
    tls = TLSConfig(pki["server_cert"], pki["server_key"], ca_file=pki["ca"])  # mutual TLS
    port = serve(learner, token=TOKEN, tls=tls)
    client_tls = ClientTLS(pki["ca"], pki["client_cert"], pki["client_key"], server_name="localhost")
    client = LearnerClient(f"127.0.0.1:{port}", hello(learner).hello, token=TOKEN, tls=client_tls)
    try:
        assert client.fetch_theta(THETA0)[0] == 0
        assert client.send(estimate(np.ones(SIZE) * 0.1, 1))
        deadline = time.monotonic() + 10
        while client.accepted < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.accepted == 1
    finally:
        client.close()
    for token, reason in ((None, "missing_token"), ("wrong", "wrong_token")):
        with pytest.raises(grpc.RpcError) as err:
            LearnerClient(f"127.0.0.1:{port}", hello(learner).hello, connect_timeout_s=5, token=token,
                          tls=client_tls)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rejected(learner, reason) == 1
    with pytest.raises(grpc.RpcError):  # no client certificate: the handshake fails
        LearnerClient(f"127.0.0.1:{port}", hello(learner).hello, connect_timeout_s=3, token=TOKEN,
                      tls=ClientTLS(pki["ca"], server_name="localhost"))


def test_a_plaintext_health_port_answers_probes_beside_a_tls_learner(serve, pki):
    """Kubernetes' gRPC probes cannot speak TLS: the health service alone, in plaintext, on a
    port of its own, while the learner's port stays TLS-only."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from metaopt.learner.server import SERVICE_NAME, serve_health

    port = serve(make_learner(), token=TOKEN, tls=TLSConfig(pki["server_cert"], pki["server_key"]))
    health_server, health_port = serve_health("127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for name in ("", SERVICE_NAME):
                reply = check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    finally:
        health_server.stop(None)


VANISHING_WORKER = """
import sys, time
from metaopt.workers.client import LearnerClient
from metaopt._proto import learner_pb2 as pb
client = LearnerClient(sys.argv[1], pb.Hello(job_id="job-s", worker_id="w", run_id="gone",
                                             theta_structure_digest=sys.argv[2]))
print("connected", flush=True)
time.sleep(60)
"""


def test_a_worker_that_vanishes_frees_its_stream(serve):
    learner = make_learner()
    port = serve(learner)
    connected = lambda: learner.metrics.registry.get_sample_value(  # noqa: E731
        "metaopt_workers_connected", {"job_id": "job-s"}) or 0.0
    worker = subprocess.Popen([sys.executable, "-c", VANISHING_WORKER, f"127.0.0.1:{port}", learner.digest],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "connected"
        assert connected() == 1
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while connected() != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert connected() == 0
    finally:
        worker.kill()
        worker.wait()


STREAMS_SCRIPT = """
import sys, threading
import grpc, numpy as np
from metaopt import wire
from metaopt._proto import learner_pb2 as pb
port, digest, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
connect = channel.stream_stream("/metaopt.v1.Learner/Connect",
                                request_serializer=pb.WorkerMessage.SerializeToString,
                                response_deserializer=pb.LearnerMessage.FromString)
data, n, crc = wire.encode(np.full(11, 0.01, np.float32))
accepted, ready, go = [], threading.Barrier(count + 1), threading.Event()

def stream(i):
    done = threading.Event()
    def requests():
        yield pb.WorkerMessage(hello=pb.Hello(job_id="job-s", worker_id=f"w{i}", run_id="r",
                                              theta_structure_digest=digest))
        go.wait()
        for s in (1, 2):
            yield pb.WorkerMessage(estimate=pb.GradientEstimate(
                job_id="job-s", worker_id=f"w{i}", run_id="r", sequence=s, theta_version=0,
                task=pb.TaskSpec(name="quadratic", kwargs_json="{}"), num_particles=1,
                inner_steps=2, mean_loss=1.0, encoding=pb.ENCODING_FLOAT32_LE, values=data,
                length=n, crc32=crc))
        done.wait(60)
    replies = connect(requests(), timeout=120)
    assert next(replies).WhichOneof("kind") == "welcome"
    ready.wait()
    got = 0
    for reply in replies:
        if reply.WhichOneof("kind") == "ack":
            got += reply.ack.accepted
            if got == 2:
                break
    accepted.append(got)
    done.set()

threads = [threading.Thread(target=stream, args=(first + i,)) for i in range(count)]
for t in threads: t.start()
ready.wait(); print("open", flush=True)
sys.stdin.readline(); go.set()
for t in threads: t.join(120)
print(sum(accepted), flush=True)
"""


def test_256_concurrent_worker_streams_are_all_served(serve):
    """Four processes of 64 streams each: all 256 are open at once, then each sends two
    estimates; every one is accepted."""
    learner = make_learner(meta_batch_size=8)
    port = serve(learner)
    procs = [subprocess.Popen([sys.executable, "-c", STREAMS_SCRIPT, str(port), learner.digest,
                               str(64 * k), "64"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for k in range(4)]
    try:
        assert all(p.stdout.readline().strip() == "open" for p in procs)
        sample = learner.metrics.registry.get_sample_value
        assert sample("metaopt_workers_connected", {"job_id": "job-s"}) == 256
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        totals = [int(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert totals == [128] * 4
    assert learner.wait_idle() and learner.version == 64
    assert len(learner.accepted_by_worker) == 256
    assert set(learner.accepted_by_worker.values()) == {2}

