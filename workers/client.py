"""A worker's connection to the learner: one Connect stream plus GetTheta calls.

Sending blocks until the learner has returned a credit (an Ack), so a worker never has more
than `max_in_flight` estimates in flight and never polls. θ's version (in every ack, and in
ThetaUpdated news) and the job's end arrive on the same stream and are read by a background
thread. Estimates larger than CHUNK_BYTES go as a header and EstimateChunks. Every call
carries the job's token, if there is one, over TLS if configured.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

import grpc
import numpy as np

from metaopt import wire
from metaopt._proto import learner_pb2 as pb
from metaopt._proto import learner_pb2_grpc as pb_grpc
from metaopt.learner import security

log = logging.getLogger(__name__)
STREAM_DEADLINE_S = 7 * 24 * 3600.0
CHUNK_BYTES = 4 * 1024 * 1024  # estimates above this travel in chunks of this size
CONNECT = "/metaopt.v1.Learner/Connect"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),  # θ arrives whole
    ("grpc.max_send_message_length", 2 * CHUNK_BYTES),
    ("grpc.keepalive_time_ms", 20_000),  # notice a dead learner within about a minute
    ("grpc.keepalive_timeout_ms", 10_000),
    # gRPC retries a connection that found nobody after 1 s, then 1.6×, 2.56×, … (jittered): a
    # worker waiting in LearnerClient for a restarted learner would notice it seconds late, after
    # the learner's linger past a finished job (train._linger), and retry forever. Within a second:
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """TLS to the learner: the CA that signed its certificate; a client certificate and key
    for mutual TLS; `server_name` if the address is not a name in the learner's certificate."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


def open_channel(address: str, tls: ClientTLS | None = None) -> grpc.Channel:
    """A worker's channel. Its connections are its own: by default gRPC shares them between the
    channels of a process, and a new one would adopt the dying connection of the channel the
    worker just closed (a killed learner's), READY for an instant, then IDLE."""
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = security.channel_credentials(tls.ca_file, tls.cert_file, tls.key_file)
    return grpc.secure_channel(address, credentials, options=options)


class LearnerClient:
    """Opens the stream and completes the handshake; raises `grpc.RpcError` if it cannot."""

    def __init__(self, address: str, hello: pb.Hello, connect_timeout_s: float = 10.0,
                 token: str | None = None, tls: ClientTLS | None = None):
        self.job_id = hello.job_id
        self.digest = hello.theta_structure_digest
        self.metadata = security.token_call_metadata(token) if token else None
        self.channel = open_channel(address, tls)
        try:
            self.stub = pb_grpc.LearnerStub(self.channel)
            self._outbox: queue.Queue = queue.Queue()  # WorkerMessages, or their serialised bytes
            self._outbox.put(pb.WorkerMessage(hello=hello))
            connect = self.channel.stream_stream(CONNECT, request_serializer=_serialise,
                                                 response_deserializer=pb.LearnerMessage.FromString)
            # wait_for_ready: the call itself waits for a connection, asking for one again
            # whenever the channel falls idle, until `_first` gives up. (`channel_ready_future`
            # asks once: a channel that went READY -> IDLE under it, its connection dropped by a
            # learner killed that moment, stayed idle past a restarted learner's whole life.)
            # The deadline bounds the whole stream; it is long, but a learner that never
            # answers the Hello must not hold a worker forever.
            self._responses = connect(iter(self._outbox.get, None), timeout=STREAM_DEADLINE_S,
                                      metadata=self.metadata, wait_for_ready=True)
            welcome = _first(self._responses, connect_timeout_s, address)
        except BaseException:
            self.channel.close()
            raise
        self.seed = welcome.seed
        self.latest_version = welcome.theta_version
        self.credits = threading.Semaphore(welcome.max_in_flight)
        self.stopped = threading.Event()  # the learner said the job is over
        self.broken = threading.Event()  # the stream ended for any other reason
        self.error: grpc.RpcError | None = None
        self.accepted = self.rejected = 0
        self._last_warning = 0.0
        threading.Thread(target=self._read, daemon=True, name="learner-reader").start()

    def _read(self) -> None:
        try:
            for message in self._responses:
                kind = message.WhichOneof("kind")
                if kind == "ack":
                    self._on_ack(message.ack)
                elif kind == "theta_updated":
                    self.latest_version = max(self.latest_version, message.theta_updated.theta_version)
                elif kind == "stop":
                    self.stopped.set()
                    self.credits.release()  # wake a sender waiting for credit
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.broken.set()
            self.credits.release()  # wake a sender waiting for credit

    def _on_ack(self, ack: pb.Ack) -> None:
        self.latest_version = max(self.latest_version, ack.theta_version)
        if ack.accepted:
            self.accepted += 1
        else:
            self.rejected += 1
            if ack.reason == pb.REJECT_REASON_JOB_FINISHED:  # the last outer step is full: done
                self.stopped.set()
            elif time.monotonic() - self._last_warning > 30:  # at most one warning per 30 s
                self._last_warning = time.monotonic()
                log.warning("learner rejected estimate %d (%s: %s); %d rejected so far",
                            ack.sequence, pb.RejectReason.Name(ack.reason), ack.detail, self.rejected)
        self.credits.release()

    @property
    def alive(self) -> bool:
        return not (self.stopped.is_set() or self.broken.is_set())

    def fetch_theta(self, like) -> tuple[int, object]:
        """(version, θ as a pytree shaped like `like`)."""
        theta = self.stub.GetTheta(pb.GetThetaRequest(job_id=self.job_id), timeout=30,
                                   metadata=self.metadata)
        if theta.structure_digest != self.digest:
            raise ValueError("the learner's θ has another structure than this worker's optimizer")
        flat = wire.decode(theta.values, theta.length, theta.crc32)
        return theta.version, wire.unflatten(np.array(flat), like)

    def send(self, estimate: pb.GradientEstimate) -> bool:
        """Queue an estimate once a credit is free; False if the stream ended first."""
        self.credits.acquire()
        if not self.alive:
            return False
        for message in split_estimate(estimate):
            self._outbox.put(message)
        return True

    def close(self) -> None:
        self._outbox.put(None)  # half-close our side
        self.channel.close()


def split_estimate(estimate: pb.GradientEstimate, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """The serialised WorkerMessages that carry `estimate`: itself, or (its values moved out,
    so `estimate` becomes the header) a header and its chunks if its values exceed
    `chunk_bytes`. Chunks place their values so that the learner reads them in place
    (`wire.chunk_message`)."""
    values = estimate.values
    if len(values) <= chunk_bytes:
        return [pb.WorkerMessage(estimate=estimate).SerializeToString()]
    header = estimate
    header.ClearField("values")
    header.chunks = -(-len(values) // chunk_bytes)
    view = memoryview(values)
    return [pb.WorkerMessage(estimate=header).SerializeToString()] + [
        wire.chunk_message(estimate.sequence, i, view[i * chunk_bytes:(i + 1) * chunk_bytes])
        for i in range(header.chunks)
    ]


def _serialise(message: pb.WorkerMessage | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _first(responses, timeout_s: float, address: str) -> pb.Welcome:
    """The stream's first message, which must be a Welcome, waited for at most `timeout_s`."""
    box: queue.Queue = queue.Queue()

    def wait() -> None:
        try:
            box.put(next(responses, None))
        except grpc.RpcError as err:  # e.g. the learner refused the Hello
            box.put(err)

    threading.Thread(target=wait, daemon=True, name="await-welcome").start()
    try:
        first = box.get(timeout=timeout_s)
    except queue.Empty:
        responses.cancel()
        raise _Unavailable(f"learner at {address}: no answer within {timeout_s}s") from None
    if isinstance(first, grpc.RpcError):
        raise first
    if first is None or first.WhichOneof("kind") != "welcome":
        raise _Unavailable("the learner closed the stream before its Welcome")
    return first.welcome


class _Unavailable(grpc.RpcError):
    """Raised when the learner cannot be reached at all; treated like UNAVAILABLE."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details
