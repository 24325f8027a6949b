"""A grpc.aio server on an event loop of its own thread, for callers that are synchronous.

asyncio gRPC serves streams from one thread without a thread hand-off per message, which on
two cores carries about 2.5× the messages per second of the thread-pool server (measured in
benchmarks/learner_ingest.py). The rest of metaopt is synchronous, so the loop runs in a
daemon thread and this class is the bridge: handlers are added on the loop, `port` is known
when the constructor returns, `stop` works from any thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence

import grpc


class BackgroundServer:
    """Starts a grpc.aio server on `address` ("host:port", port 0 for any free one).

    `setup(server)` is awaited on the loop before the server starts (add services there; it
    may start tasks of its own); if it returns a callable, that is called once the server has
    stopped. Raises OSError if the address cannot be bound."""

    def __init__(self, address: str, setup: Callable[[grpc.aio.Server], Awaitable[None]],
                 credentials: grpc.ServerCredentials | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 options: Sequence[tuple[str, object]] = (), name: str = "grpc-aio"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()
        self._stopped: threading.Event | None = None
        self._cleanup = None
        try:
            start = self._start(address, setup, credentials, interceptors, options)
            self.port = asyncio.run_coroutine_threadsafe(start, self.loop).result()
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    def _run(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _start(self, address, setup, credentials, interceptors, options) -> int:
        self.server = grpc.aio.server(interceptors=list(interceptors), options=list(options))
        self._cleanup = await setup(self.server)
        try:
            port = (self.server.add_secure_port(address, credentials) if credentials is not None
                    else self.server.add_insecure_port(address))
        except RuntimeError as err:  # gRPC reports a key that does not match its certificate here
            raise OSError(f"could not bind a gRPC server to {address}: {err}") from None
        if port == 0:
            raise OSError(f"could not bind a gRPC server to {address}")
        await self.server.start()
        return port

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop serving (open calls get `grace` seconds to finish) and end the loop's thread;
        the event is set when that is done. Safe to call more than once."""
        if self._stopped is not None:
            return self._stopped
        self._stopped = threading.Event()

        async def shut_down():
            await self.server.stop(grace)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:  # the services' own tasks
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if callable(self._cleanup):
                self._cleanup()
            self.loop.stop()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shut_down(), self.loop)
            threading.Thread(target=lambda: (self._thread.join(), self._stopped.set()), daemon=True).start()
        else:
            self._stopped.set()
        return self._stopped
