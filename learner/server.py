"""The learner's gRPC service: worker streams in, acks and θ news out; θ on request.

A stream belongs to one worker incarnation. Its first message must be a Hello whose job and
θ structure match; then every estimate gets an Ack, which is also the worker's credit back
(workers keep at most `max_in_flight` estimates unacknowledged; a stream's estimates are read
one at a time, so one that ignores its credit is held back by gRPC's own flow control, not
buffered). An estimate with `chunks` > 0 is reassembled from the EstimateChunks that follow
it into the stream's own buffer (reused, so one per stream at most) and then checked whole.
θ version changes and the end of the job are pushed to every stream. Keepalive pings notice
a worker that vanished without closing its stream; its stream, and so its credit, then ends.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from learner import security
from learner.core import Learner
from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt._proto import learner_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "metaopt.v1.Learner"
_END = object()  # closes a stream's outbox
MAX_RECEIVE_BYTES = 8 * 1024 * 1024  # larger estimates must be chunked (workers use CHUNK_BYTES)
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),  # θ goes out whole, once per GetTheta
    ("grpc.keepalive_time_ms", 20_000),  # ping idle streams: a vanished worker is noticed in ~30 s
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # workers ping every 20 s
    ("grpc.http2.max_pings_without_data", 0),
]


class LearnerService(pb_grpc.LearnerServicer):
    def __init__(self, learner: Learner):
        self.learner = learner

    def GetTheta(self, request: pb.GetThetaRequest, context: grpc.ServicerContext) -> pb.Theta:
        if request.job_id != self.learner.config.job_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r} on this learner")
        return self.learner.theta_message()

    def Connect(self, requests, context: grpc.ServicerContext):
        hello = self._handshake(requests, context)
        outbox: queue.Queue = queue.Queue()

        def on_version(version: int) -> None:
            if version >= 0:
                outbox.put(pb.LearnerMessage(theta_updated=pb.ThetaUpdated(theta_version=version)))
            if self.learner.done.is_set():
                outbox.put(pb.LearnerMessage(stop=pb.Stop(reason="the job is finished")))

        def read_estimates() -> None:
            chunked = _Reassembly(self.learner)
            try:
                for message in requests:
                    for ack in self._receive(hello, message, chunked):
                        outbox.put(pb.LearnerMessage(ack=ack))
            except grpc.RpcError:
                pass  # the worker went away; its unacknowledged estimates are simply gone
            except Exception:  # a bug must end this stream loudly, not leave the worker waiting
                log.exception("stream of %s/%s failed", hello.worker_id, hello.run_id)
            finally:
                outbox.put(_END)

        learner = self.learner
        learner.add_listener(on_version)
        learner.metrics.worker_connected(+1)
        context.add_callback(lambda: outbox.put(_END))
        try:
            yield pb.LearnerMessage(welcome=pb.Welcome(
                theta_version=learner.version, max_in_flight=learner.config.max_in_flight,
                seed=learner.next_worker_seed(),
            ))
            if learner.done.is_set():
                yield pb.LearnerMessage(stop=pb.Stop(reason="the job is finished"))
                return
            threading.Thread(target=read_estimates, daemon=True, name="estimate-reader").start()
            while (message := outbox.get()) is not _END:
                yield message
        finally:
            learner.remove_listener(on_version)
            learner.metrics.worker_connected(-1)

    def _handshake(self, requests, context) -> pb.Hello:
        first = next(requests, None)
        if first is None or first.WhichOneof("kind") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a stream must begin with a Hello")
        hello = first.hello
        if hello.job_id != self.learner.config.job_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {hello.job_id!r} on this learner")
        if hello.theta_structure_digest != self.learner.digest:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the worker's θ structure differs from the learner's: both must build the same "
                "learned optimizer (same name and hyperparameters) from the same job spec",
            )
        return hello

    def _receive(self, hello: pb.Hello, message: pb.WorkerMessage, chunked: _Reassembly) -> list[pb.Ack]:
        """The acks a message settles: none for a chunk in the middle of an estimate, one for
        an inline estimate or a last chunk, two when a new estimate cuts off a chunked one."""
        kind = message.WhichOneof("kind")
        acks = []
        if kind == "chunk":
            done = chunked.add(message.chunk)
            if done is not None:
                est, values = done
                acks.append(self.learner.submit(est, values) if values is not None
                            else self._bad_chunk(est, "chunks out of order or of the wrong size"))
            return acks
        if chunked.pending is not None:  # anything but its next chunk cuts a chunked estimate off
            acks.append(self._bad_chunk(chunked.drop(), "the estimate's chunks did not all arrive"))
        est = message.estimate
        if kind != "estimate" or (est.worker_id, est.run_id) != (hello.worker_id, hello.run_id):
            self.learner.metrics.rejected("NOT_CONNECTED")
            detail = "expected an estimate from the worker and run id of this stream's Hello"
            acks.append(pb.Ack(sequence=est.sequence, accepted=False,
                               reason=pb.REJECT_REASON_NOT_CONNECTED, detail=detail))
        elif est.chunks and chunked.start(est):
            pass  # its values follow
        else:
            acks.append(self.learner.submit(est))  # inline, or chunked with a bad header: refused whole
        return acks

    def _bad_chunk(self, est: pb.GradientEstimate, detail: str) -> pb.Ack:
        self.learner.metrics.rejected("BAD_CHUNK")
        return pb.Ack(sequence=est.sequence, accepted=False, reason=pb.REJECT_REASON_BAD_CHUNK, detail=detail)


class _Reassembly:
    """One stream's chunked estimate in progress, in a buffer reused from one to the next."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self.pending: pb.GradientEstimate | None = None
        self.buffer = bytearray()
        self.filled = self.next_index = 0

    def start(self, est: pb.GradientEstimate) -> bool:
        """Begin collecting `est`'s chunks; False if its header is wrong (the learner then
        refuses it with the precise reason)."""
        if est.encoding not in wire.DECODERS or est.length != self.learner.size or est.values:
            return False
        size = wire.DECODERS[est.encoding][0] * est.length
        if len(self.buffer) != size:
            self.buffer = bytearray(size)
        self.pending, self.filled, self.next_index = est, 0, 0
        return True

    def add(self, chunk: pb.EstimateChunk):
        """None while more chunks are due; (estimate, values) when the last one arrived, with
        values None if a chunk was out of place. A stray chunk is counted and dropped."""
        est = self.pending
        if est is None:
            self.learner.metrics.rejected("BAD_CHUNK")
            return None
        end = self.filled + len(chunk.values)
        if chunk.sequence != est.sequence or chunk.index != self.next_index or end > len(self.buffer):
            return self.drop(), None
        self.buffer[self.filled:end] = chunk.values
        self.filled, self.next_index = end, self.next_index + 1
        if self.next_index < est.chunks:
            return None
        self.pending = None
        # A short total is caught by the learner's length check.
        return est, memoryview(self.buffer)[:end]

    def drop(self) -> pb.GradientEstimate:
        est, self.pending = self.pending, None
        return est


def make_server(learner: Learner, host: str = "127.0.0.1", port: int = 0, max_workers: int = 64,
                token: str | None = None, tls: security.TLSConfig | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server with the Learner and standard health services; (server, port).

    Each open worker stream holds one thread of the pool: size `max_workers` above the number
    of workers (calls beyond the pool wait for a thread). With `token`, every call but health
    checks must carry it (refusals are counted as rejected estimates, reason missing_token or
    wrong_token); with `tls`, the port speaks TLS (mutual TLS if `tls.ca_file` is set)."""
    interceptors = []
    if token is not None:
        interceptors.append(security.TokenInterceptor(token, on_reject=learner.metrics.rejected))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="learner-grpc"),
        interceptors=interceptors, options=SERVER_OPTIONS,
    )
    pb_grpc.add_LearnerServicer_to_server(LearnerService(learner), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, tls.server_credentials()) if tls is not None
                 else server.add_insecure_port(address))
    except RuntimeError as err:  # gRPC reports a key that does not match its certificate here
        raise OSError(f"could not serve TLS on {address}: {err}; check that the key file belongs "
                      "to the certificate file") from None
    if bound == 0:
        raise OSError(f"could not bind the learner's gRPC server to {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
