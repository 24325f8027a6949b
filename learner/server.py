"""The learner's gRPC service: worker streams in, acks and θ news out; θ on request.

A stream belongs to one worker incarnation. Its first message must be a Hello whose job and
θ structure match; then every estimate gets an Ack, which is also the worker's credit back
(workers keep at most `max_in_flight` estimates unacknowledged; a stream's estimates are read
one at a time, so one that ignores its credit is held back by gRPC's own flow control, not
buffered). θ version changes and the end of the job are pushed to every stream.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from learner.core import Learner
from metaopt._proto import learner_pb2 as pb
from metaopt._proto import learner_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "metaopt.v1.Learner"
_END = object()  # closes a stream's outbox


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
            try:
                for message in requests:
                    outbox.put(pb.LearnerMessage(ack=self._ack(hello, message)))
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

    def _ack(self, hello: pb.Hello, message: pb.WorkerMessage) -> pb.Ack:
        est = message.estimate
        if message.WhichOneof("kind") != "estimate" or (est.worker_id, est.run_id) != (
            hello.worker_id, hello.run_id,
        ):
            self.learner.metrics.rejected("NOT_CONNECTED")
            return pb.Ack(sequence=est.sequence, accepted=False,
                          reason=pb.REJECT_REASON_NOT_CONNECTED,
                          detail="expected an estimate from the worker and run id of this stream's Hello")
        return self.learner.submit(est)


def make_server(learner: Learner, host: str = "127.0.0.1", port: int = 0,
                max_workers: int = 64) -> tuple[grpc.Server, int]:
    """A started gRPC server with the Learner and standard health services; (server, port).

    Each open worker stream holds one thread of the pool: size `max_workers` above the number
    of workers (calls beyond the pool wait for a thread)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="learner-grpc"),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                 ("grpc.max_send_message_length", 64 * 1024 * 1024)],
    )
    pb_grpc.add_LearnerServicer_to_server(LearnerService(learner), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the learner's gRPC server to {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
