"""The learner's gRPC service: worker streams in, acks and θ news out; θ on request.

It runs on asyncio (`learner.background`): the event loop only moves messages. Everything a
message asks of the learner (chunk parsing, checksum, validation, accumulation, which may
block while every meta-batch accumulator is full) happens on one ingest thread, in arrival
order, and the acks go back to the loop in batches. (Settling small estimates on the loop
instead was measured slower: the ingest thread overlaps with the loop on a second core.) So:

* A stream belongs to one worker incarnation. Its first message must be a Hello whose job and
  θ structure match; then every estimate gets an Ack, which is also the worker's credit back
  and tells θ's current version. A stream may have at most `MAX_QUEUED` messages waiting for
  the ingest thread; beyond that its reader stops reading, so a worker that ignores its credit
  is held back by gRPC's own flow control instead of being buffered.
* An estimate with `chunks` > 0 is collected from the EstimateChunks that follow it. Chunks are
  parsed by hand (`wire.parse_chunk`), so their values stay where gRPC put them (protobuf
  would copy them twice), until the last one is in; then they are checked and accumulated
  where they are. Workers place chunk values aligned (`wire.chunk_message`); values from a
  sender that does not are first copied into the ingest thread's own, aligned buffer.
* θ news is sent to a stream only if no ack has told it the version yet, in rounds at most
  `ANNOUNCE_INTERVAL_S` apart: busy workers learn versions from their acks, and hundreds of
  streams cost no more than a few messages per outer step. The end of the job goes to all.
* θ is serialised once per version and sent as those bytes to every GetTheta.
* A request that does not decode (GetTheta's, or any message of a stream) is answered
  INVALID_ARGUMENT with what did not decode, and counted as a rejection, reason `undecodable`;
  the stream ends there. (gRPC's own deserializer would answer UNKNOWN, uncounted: requests are
  therefore registered as bytes and decoded here.)
* Keepalive pings notice a worker that vanished without closing its stream; its stream, and
  so its credit, then ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt.learner import security
from metaopt.learner.background import BackgroundServer
from metaopt.learner.core import Learner

log = logging.getLogger(__name__)
SERVICE_NAME = "metaopt.v1.Learner"
MAX_RECEIVE_BYTES = 8 * 1024 * 1024  # larger estimates must be chunked (workers use CHUNK_BYTES)
MAX_QUEUED = 8  # messages of one stream waiting for the ingest thread
ANNOUNCE_INTERVAL_S = 0.1
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),  # θ goes out whole, once per GetTheta
    ("grpc.keepalive_time_ms", 20_000),  # ping idle streams: a vanished worker is noticed in ~30 s
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # workers ping every 20 s
    ("grpc.http2.max_pings_without_data", 0),
]
_END = object()  # closes a stream's outbox
_STOP = pb.LearnerMessage(stop=pb.Stop(reason="the job is finished"))


@dataclasses.dataclass(frozen=True)
class _Refusal:
    """Ends a stream's outbox with INVALID_ARGUMENT and this detail, after the acks before it."""

    detail: str


def _undecodable(what: str, message_type, err: DecodeError, expected: str = "") -> str:
    name = message_type.DESCRIPTOR.full_name
    return (f"{what} does not decode as a {name} ({err}): send a serialised {name}{expected}, as "
            "proto/metaopt/v1/learner.proto defines it")


@dataclasses.dataclass(eq=False)
class _Stream:
    """One open Connect call. `outbox`, `queued`, `drained` and `told` belong to the loop;
    `chunked` and `ended` to the ingest thread."""

    hello: pb.Hello
    chunked: _Reassembly
    outbox: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    queued: int = 0  # messages handed to the ingest thread and not yet processed
    drained: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    told: int = 0  # the newest θ version this stream has been sent
    ended: bool = False  # by a message that did not decode, or a fault: later messages are ignored


class LearnerService:
    """Connect and GetTheta, registered with hand-written method handlers: requests arrive as
    bytes (chunks are read in place; an undecodable request is refused here, with a reason), and
    GetTheta answers with θ's bytes as the learner serialised them."""

    def __init__(self, learner: Learner, loop: asyncio.AbstractEventLoop):
        self.learner, self.loop = learner, loop
        self.streams: set[_Stream] = set()
        self._news = asyncio.Event()
        self._ingest: queue.SimpleQueue = queue.SimpleQueue()
        self._theta = (-1, b"")  # (version, serialised Theta)
        self._gathered = bytearray()  # the ingest thread's buffer for chunked estimates
        threading.Thread(target=self._ingest_loop, daemon=True, name="learner-ingest").start()
        self._announcer = loop.create_task(self._announce())
        learner.add_listener(self._on_version)

    def _on_version(self, version: int) -> None:  # on the learner's updater thread
        finished = version < 0 or self.learner.done.is_set()
        try:  # the end of the job goes out at once, θ news in the announcer's next round
            self.loop.call_soon_threadsafe(self._stop_all if finished else self._news.set)
        except RuntimeError:
            pass  # the loop is closed: the server stopped

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            # Requests stay bytes until the ingest thread: chunks are read in place there.
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.connect, response_serializer=pb.LearnerMessage.SerializeToString),
            "GetTheta": grpc.unary_unary_rpc_method_handler(self.get_theta),
        })

    def close(self) -> None:
        """After the server stopped: no more news, and the ingest thread ends."""
        self.learner.remove_listener(self._on_version)
        self._ingest.put(None)

    # -- GetTheta ---------------------------------------------------------------------------

    async def get_theta(self, raw: bytes, context) -> bytes:
        try:
            request = pb.GetThetaRequest.FromString(raw)
        except DecodeError as err:
            self.learner.metrics.rejected("undecodable")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                _undecodable("the request", pb.GetThetaRequest, err))
        if request.job_id != self.learner.config.job_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r} on this learner")
        message = self.learner.theta_message()
        if self._theta[0] != message.version:
            self._theta = (message.version, message.SerializeToString())
        return self._theta[1]

    # -- Connect: the loop's side -------------------------------------------------------------

    async def connect(self, requests, context):
        hello = await self._handshake(requests, context)
        learner = self.learner
        stream = _Stream(hello, _Reassembly(learner), told=learner.version)
        self.streams.add(stream)
        learner.stream_opened(hello.worker_id, hello.run_id)  # its replay record is kept meanwhile
        learner.metrics.worker_connected(+1)
        reader = None
        try:
            yield pb.LearnerMessage(welcome=pb.Welcome(
                theta_version=stream.told, max_in_flight=learner.config.outer.max_in_flight,
                seed=learner.next_worker_seed(),
            ))
            if learner.done.is_set():
                yield _STOP
                return
            reader = asyncio.create_task(self._read(stream, requests))
            while (message := await stream.outbox.get()) is not _END:
                if isinstance(message, _Refusal):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message.detail)
                yield message
        finally:
            if reader is not None:
                reader.cancel()
            self.streams.discard(stream)
            learner.stream_closed(hello.worker_id, hello.run_id)
            learner.metrics.worker_connected(-1)

    async def _handshake(self, requests, context) -> pb.Hello:
        first = await anext(aiter(requests), None)
        try:
            first = pb.WorkerMessage.FromString(first) if first is not None else None
        except DecodeError as err:
            self.learner.metrics.rejected("undecodable")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _undecodable(
                "the stream's first message", pb.WorkerMessage, err, " holding a Hello"))
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a stream must begin with a Hello")
        hello = first.hello
        if hello.job_id != self.learner.config.job_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {hello.job_id!r} on this learner")
        if hello.theta_structure_digest != self.learner.digest:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the worker's θ structure differs from the learner's: both must build the same "
                "learned optimizer (same name and hyperparameters) from the same job spec",
            )
        return hello

    async def _read(self, stream: _Stream, requests) -> None:
        try:
            async for message in requests:
                while stream.queued >= MAX_QUEUED:
                    stream.drained.clear()
                    await stream.drained.wait()
                stream.queued += 1
                self._ingest.put((stream, message))
        except grpc.RpcError:
            pass  # the worker went away; its unacknowledged estimates are simply gone
        finally:
            self._ingest.put((stream, None))  # ends the stream once its acks are out

    def _deliver(self, settled: list) -> None:
        """On the loop: the ingest thread's results, (stream, acks or None at the end)."""
        for stream, messages in settled:
            if messages is None:
                stream.outbox.put_nowait(_END)
                continue
            stream.queued -= 1
            stream.drained.set()
            for message in messages:
                if isinstance(message, _Refusal):
                    stream.outbox.put_nowait(message)
                    continue
                stream.told = max(stream.told, message.ack.theta_version)
                stream.outbox.put_nowait(message)

    async def _announce(self) -> None:
        """Tell streams of new θ versions that no ack has told them."""
        while True:
            await self._news.wait()
            self._news.clear()
            version = self.learner.version
            news = pb.LearnerMessage(theta_updated=pb.ThetaUpdated(theta_version=version))
            for stream in self.streams:
                if stream.told < version:
                    stream.told = version
                    stream.outbox.put_nowait(news)
            await asyncio.sleep(ANNOUNCE_INTERVAL_S)

    def _stop_all(self) -> None:
        self._announcer.cancel()
        for stream in self.streams:
            stream.outbox.put_nowait(_STOP)

    # -- Connect: the ingest thread's side ----------------------------------------------------

    def _ingest_loop(self) -> None:
        """Settle messages in arrival order; hand the acks to the loop in batches (one wake-up
        of the loop per batch, not per ack), and before any estimate that may wait for an
        accumulator. Ends at None, which `close` puts."""
        while True:
            items = [self._ingest.get()]
            while len(items) < 256:
                try:
                    items.append(self._ingest.get_nowait())
                except queue.Empty:
                    break
            settled = []
            for item in items:
                if item is None:
                    continue
                if settled and self.learner.accumulators_full:
                    # The next estimate may wait for an accumulator: the acks already settled
                    # go out first, or a worker waits on credit the learner has already earned.
                    if not self._hand_over(settled):
                        return
                    settled = []
                settled.append(self._settle(*item))
            if not self._hand_over(settled) or None in items:
                return

    def _hand_over(self, settled: list) -> bool:
        """Give settled acks to the loop; False if the loop is closed (the server stopped under us)."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, settled)
        except RuntimeError:
            return False
        return True

    def _settle(self, stream: _Stream, message: bytes | None) -> tuple[_Stream, list | None]:
        if message is None:
            return stream, None
        if stream.ended:  # what a refused stream's reader had already queued: not looked at
            return stream, []
        try:
            return stream, [pb.LearnerMessage(ack=ack) for ack in self._receive(stream, message)]
        except DecodeError as err:
            stream.ended = True
            self.learner.metrics.rejected("undecodable")
            log.warning("ending the stream of %s/%s: a message that is not a WorkerMessage",
                        stream.hello.worker_id, stream.hello.run_id)
            return stream, [_Refusal(_undecodable("a message", pb.WorkerMessage, err))]
        except Exception:  # a bug must end this stream loudly, not leave the worker waiting
            stream.ended = True
            log.exception("stream of %s/%s failed", stream.hello.worker_id, stream.hello.run_id)
            return stream, None

    def _receive(self, stream: _Stream, raw: bytes) -> list[pb.Ack]:
        """The acks a message settles: none for a chunk in the middle of an estimate, one for
        an inline estimate or a last chunk, two when a new estimate cuts off a chunked one."""
        chunked, hello, acks = stream.chunked, stream.hello, []
        chunk = wire.parse_chunk(raw)
        message = pb.WorkerMessage.FromString(raw) if chunk is None else None
        if chunk is None and message.WhichOneof("kind") == "chunk":  # unusual, but well-formed
            chunk = message.chunk.sequence, message.chunk.index, message.chunk.values
        if chunk is not None:
            done = chunked.add(*chunk)
            if done is not None:
                est, segments = done
                if segments is None:
                    acks.append(self.learner.reject(est, pb.REJECT_REASON_BAD_CHUNK,
                                                    "chunks out of order or of the wrong size"))
                else:
                    aligned = wire.aligned(segments, est.encoding)  # `start` admitted the encoding
                    acks.append(self.learner.submit(est, segments if aligned else [self._gather(segments)]))
            return acks
        if chunked.pending is not None:  # anything but its next chunk cuts a chunked estimate off
            acks.append(self.learner.reject(chunked.drop(), pb.REJECT_REASON_BAD_CHUNK,
                                            "the estimate's chunks did not all arrive"))
        est = message.estimate
        ours = (est.worker_id, est.run_id) == (hello.worker_id, hello.run_id)
        if message.WhichOneof("kind") != "estimate" or not ours:
            detail = "expected an estimate from the worker and run id of this stream's Hello"
            acks.append(self.learner.reject(est, pb.REJECT_REASON_NOT_CONNECTED, detail))
        elif est.chunks and chunked.start(est):
            pass  # its values follow
        else:
            acks.append(self.learner.submit(est))  # inline, or chunked with a bad header: refused whole
        return acks

    def _gather(self, segments: list[memoryview]) -> memoryview:
        """A chunked estimate's values in one buffer, reused from one estimate to the next, for
        chunks whose values are not aligned: numpy is 3-10× slower on misaligned float32."""
        total = sum(len(s) for s in segments)
        if len(self._gathered) < total:
            self._gathered = bytearray(total)
        view, at = memoryview(self._gathered), 0
        for segment in segments:
            view[at:at + len(segment)] = segment
            at += len(segment)
        return view[:total]


class _Reassembly:
    """One stream's chunked estimate in progress: its chunks' values, kept where they arrived
    (views into the received messages) until the last one is in."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self.pending: pb.GradientEstimate | None = None
        self.segments: list[memoryview] = []
        self.expected = self.filled = 0

    def start(self, est: pb.GradientEstimate) -> bool:
        """Begin collecting `est`'s chunks; False if its header is wrong (the learner then
        refuses it with the precise reason)."""
        if est.encoding not in wire.DECODERS or est.length != self.learner.size or est.values:
            return False
        self.pending, self.segments, self.filled = est, [], 0
        self.expected = wire.DECODERS[est.encoding][0] * est.length
        return True

    def add(self, sequence: int, index: int, values):
        """None while more chunks are due; (estimate, segments) when the last one arrived, with
        segments None if a chunk was out of place. A stray chunk is counted and dropped."""
        est = self.pending
        if est is None:
            self.learner.metrics.rejected("BAD_CHUNK")
            return None
        self.filled += len(values)
        if (sequence != est.sequence or index != len(self.segments) or not len(values)
                or self.filled > self.expected):
            return self.drop(), None
        self.segments.append(values)
        if len(self.segments) < est.chunks:
            return None
        segments, self.pending, self.segments = self.segments, None, []
        return est, segments  # a short total is caught by the learner's length check

    def drop(self) -> pb.GradientEstimate:
        est, self.pending, self.segments = self.pending, None, []
        return est


def make_server(learner: Learner, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                tls: security.TLSConfig | None = None) -> tuple[BackgroundServer, int]:
    """A started gRPC server with the Learner and standard health services; (server, port).

    With `token`, every call but health checks must carry it (refusals are counted as rejected
    estimates, reason missing_token or wrong_token); with `tls`, the port speaks TLS (mutual
    TLS if `tls.ca_file` is set). `server.stop(grace)` stops it."""
    interceptors = []
    if token is not None:
        interceptors.append(security.TokenInterceptor(token, on_reject=learner.metrics.rejected))

    async def setup(server: grpc.aio.Server):
        service = LearnerService(learner, asyncio.get_running_loop())
        server.add_generic_rpc_handlers((service.handler(),))
        await _add_health(server)
        return service.close

    address = f"{host}:{port}"
    credentials = tls.server_credentials() if tls is not None else None
    try:
        server = BackgroundServer(address, setup, credentials, interceptors, SERVER_OPTIONS,
                                  name="learner-grpc")
    except OSError:
        if tls is not None:
            raise OSError(f"could not serve TLS on {address}; check that the address is free and "
                          "that the key file belongs to the certificate file") from None
        raise OSError(f"could not bind the learner's gRPC server to {address}") from None
    return server, server.port


async def _add_health(server: grpc.aio.Server) -> None:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", SERVICE_NAME):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def serve_health(host: str, port: int) -> tuple[BackgroundServer, int]:
    """A plaintext gRPC server with the health service alone; (server, port). For probes that
    cannot speak TLS (Kubernetes' gRPC probes) when the learner's own port does."""
    try:
        server = BackgroundServer(f"{host}:{port}", _add_health, None, [], SERVER_OPTIONS,
                                  name="learner-health")
    except OSError:
        raise OSError(f"could not bind the learner's health server to {host}:{port}") from None
    return server, server.port
