"""Job tokens and TLS for the learner's gRPC server and its clients.

Two independent layers, usable together:

* A job token: a shared secret each worker sends as `authorization: Bearer <token>` metadata
  with every call. It stops a worker of another job (or anything else that can reach the port)
  from submitting estimates to this learner. Without TLS the token crosses the network in the
  clear, so it guards against mistakes, not against an attacker on the path.
* TLS: encrypts the traffic and proves the server's identity to workers; with a client CA on
  the server (mutual TLS) workers must also present a certificate signed by that CA.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)
TOKEN_METADATA_KEY = "authorization"
_BEARER = "bearer "
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


def read_token(path: str | os.PathLike) -> str:
    """The token in `path`, without surrounding whitespace (files usually end in a newline)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            e.errno, f"job token file {os.fspath(path)!r} does not exist: create it with the job's token "
            "(e.g. from the job's secret) or point the token path option at the right file", os.fspath(path),
        ) from None
    if not token:
        raise ValueError(f"job token file {os.fspath(path)!r} is empty: it must contain the job's token")
    return token


def token_call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client passes with each call (`metadata=` of a stub method)."""
    return ((TOKEN_METADATA_KEY, f"Bearer {token}"),)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that does not carry this job's bearer token
    (an interceptor for asyncio servers, as `learner.background` runs).

    Health checks (`/grpc.health.v1.Health/...`) pass without a token so that load balancers
    and Kubernetes probes, which know no token, can still see the server. `on_reject` is called
    with "missing_token" or "wrong_token" for each refused call (e.g. to count them).

    A server interceptor cannot abort a call itself: it returns the handler that will serve
    the call. So a refused call gets a stand-in handler whose behaviour aborts at once, of the
    same kind (unary or streaming, each way) as the real one, since gRPC drives the handler
    according to its kind. The stand-in has no deserializer: the refused request is never parsed.
    """

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None):
        if not token:
            raise ValueError("the job token must not be empty")
        self._token = token.encode("utf-8")
        self._on_reject = on_reject

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_HEALTH_PREFIX):
            return await continuation(handler_call_details)
        reason, detail = self._check(handler_call_details.invocation_metadata or ())
        if reason is None:
            return await continuation(handler_call_details)
        if self._on_reject is not None:
            try:
                self._on_reject(reason)
            except Exception:  # a broken counter must not turn the refusal into UNKNOWN
                log.exception("on_reject(%r) failed", reason)
        return _aborting_handler(await continuation(handler_call_details), detail)

    def _check(self, metadata) -> tuple[str | None, str]:
        """(None, "") for the right token, else (reason, detail for the client)."""
        values = [value for key, value in metadata if key == TOKEN_METADATA_KEY]
        if not values:
            return "missing_token", (f"missing bearer token: send metadata "
                                     f"'{TOKEN_METADATA_KEY}: Bearer <token>'")
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        if not value.lower().startswith(_BEARER):
            return "missing_token", f"missing bearer token: '{TOKEN_METADATA_KEY}' is not 'Bearer <token>'"
        presented = value[len(_BEARER):].strip().encode("utf-8")
        if not hmac.compare_digest(presented, self._token):  # constant time: leaks no prefix
            return "wrong_token", "wrong bearer token for this job"
        return None, ""


def _aborting_handler(handler: grpc.RpcMethodHandler | None, detail: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED.

    For an unknown method (`handler` None) the caller is still refused as unauthenticated
    rather than told UNIMPLEMENTED; a stream-stream handler serves any kind of call there."""

    async def abort(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    request_streaming = handler.request_streaming if handler is not None else True
    response_streaming = handler.response_streaming if handler is not None else True
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """The server's TLS files, as they come from the job's configuration.

    `ca_file` set means mutual TLS: clients must present a certificate signed by that CA."""

    cert_file: str
    key_file: str
    ca_file: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return server_credentials(self.cert_file, self.key_file, client_ca_file=self.ca_file)


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike,
                       client_ca_file: str | os.PathLike | None = None) -> grpc.ServerCredentials:
    """TLS credentials for `server.add_secure_port`.

    With `client_ca_file`, clients must present a certificate signed by that CA (mutual TLS).
    A key that does not match the certificate passes here; gRPC refuses it at `add_secure_port`
    with a RuntimeError ("Failed to bind ...")."""
    cert, key = _read_pem(cert_file, "CERTIFICATE"), _read_pem(key_file, "PRIVATE KEY")
    if client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    client_ca = _read_pem(client_ca_file, "CERTIFICATE")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


def channel_credentials(ca_file: str | os.PathLike, cert_file: str | os.PathLike | None = None,
                        key_file: str | os.PathLike | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for `grpc.secure_channel`: trust the CA in `ca_file` for the server.

    `cert_file` and `key_file` (both or neither) are the client's own certificate for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both a client certificate and its key for mutual TLS, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "CERTIFICATE"),
        private_key=_read_pem(key_file, "PRIVATE KEY") if key_file is not None else None,
        certificate_chain=_read_pem(cert_file, "CERTIFICATE") if cert_file is not None else None,
    )


def _read_pem(path: str | os.PathLike, kind: str) -> bytes:
    """The bytes of a PEM file holding a `kind` block, checked here because gRPC itself only
    fails later, at bind or handshake time, with a message that names neither file nor cause."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"TLS file {os.fspath(path)!r} does not exist") from None
    if b"-----BEGIN " not in data or f"{kind}-----".encode() not in data:
        raise ValueError(f"TLS file {os.fspath(path)!r} is not a PEM file with a {kind.lower()}")
    return data
