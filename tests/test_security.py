"""Job tokens and TLS (learner/security.py) against real gRPC servers on 127.0.0.1, with
certificates made here: a CA, a server certificate for localhost, a client certificate from the
same CA, and an unrelated CA for the negative cases (the `pki` fixture, tests/conftest.py)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from metaopt.learner.background import BackgroundServer
from metaopt.learner.security import (
    TLSConfig,
    TokenInterceptor,
    channel_credentials,
    read_token,
    server_credentials,
    token_call_metadata,
)

TOKEN = "s3cret-job-token"
TIMEOUT = 5.0
UNARY, STREAM = "/test.Echo/Unary", "/test.Echo/Stream"


# --- servers and clients --------------------------------------------------------------------

def _echo_service() -> grpc.GenericRpcHandler:
    """One unary-unary and one stream-stream method, bytes in and out (no serializers)."""

    async def unary(request, context):
        return request

    async def stream(requests, context):
        async for request in requests:
            yield request

    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })


@pytest.fixture
def start_server():
    """start_server(interceptors=(), credentials=None) -> port; every server is stopped after."""
    started: list[BackgroundServer] = []

    async def setup(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((_echo_service(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    def start(interceptors=(), credentials: grpc.ServerCredentials | None = None) -> int:
        server = BackgroundServer("127.0.0.1:0", setup, credentials, interceptors)
        started.append(server)
        return server.port

    yield start
    for server in started:
        assert server.stop(None).wait(10)


def _channel(port: int, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    # Dial the IP but verify the server's certificate for the name "localhost".
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                               options=[("grpc.ssl_target_name_override", "localhost")])


def _unary(channel: grpc.Channel, metadata=None) -> bytes:
    return channel.unary_unary(UNARY)(b"ping", metadata=metadata, timeout=TIMEOUT)


def _stream(channel: grpc.Channel, metadata=None) -> list[bytes]:
    return list(channel.stream_stream(STREAM)(iter([b"a", b"b"]), metadata=metadata, timeout=TIMEOUT))


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code()


# --- tokens ---------------------------------------------------------------------------------

def test_right_token_is_accepted_for_unary_and_stream(start_server):
    port = start_server([TokenInterceptor(TOKEN)])
    with _channel(port) as channel:
        assert _unary(channel, token_call_metadata(TOKEN)) == b"ping"
        assert _stream(channel, token_call_metadata(TOKEN)) == [b"a", b"b"]


def test_missing_token_is_rejected_as_unauthenticated(start_server):
    port = start_server([TokenInterceptor(TOKEN)])
    with _channel(port) as channel:
        for call in (_unary, _stream):
            with pytest.raises(grpc.RpcError) as info:
                call(channel)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert info.value.details().startswith("missing bearer token")
        assert _code(_unary, channel, [("authorization", TOKEN)]) == grpc.StatusCode.UNAUTHENTICATED


def test_wrong_token_is_rejected_as_unauthenticated(start_server):
    port = start_server([TokenInterceptor(TOKEN)])
    with _channel(port) as channel:
        for call in (_unary, _stream):
            with pytest.raises(grpc.RpcError) as info:
                call(channel, token_call_metadata("not-" + TOKEN))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert info.value.details() == "wrong bearer token for this job"


def test_health_check_needs_no_token(start_server):
    port = start_server([TokenInterceptor(TOKEN)])
    with _channel(port) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_on_reject_is_called_with_the_reason_of_each_refusal(start_server):
    reasons: list[str] = []
    port = start_server([TokenInterceptor(TOKEN, on_reject=reasons.append)])
    with _channel(port) as channel:
        _code(_unary, channel)
        _code(_stream, channel, token_call_metadata("wrong"))
        _unary(channel, token_call_metadata(TOKEN))
        _health(channel)
        _code(_unary, channel, token_call_metadata("wrong"))
    assert reasons == ["missing_token", "wrong_token", "wrong_token"]


def test_a_failing_on_reject_still_refuses_as_unauthenticated(start_server, caplog):
    def broken_counter(reason: str) -> None:
        raise RuntimeError("counter broke")

    port = start_server([TokenInterceptor(TOKEN, on_reject=broken_counter)])
    with _channel(port) as channel:
        assert _code(_unary, channel) == grpc.StatusCode.UNAUTHENTICATED
    assert "on_reject('missing_token') failed" in caplog.text


def test_unknown_method_without_token_is_unauthenticated_not_unimplemented(start_server):
    port = start_server([TokenInterceptor(TOKEN)])
    with _channel(port) as channel:
        unknown = channel.unary_unary("/test.Echo/Nope")
        assert _code(unknown, b"", timeout=TIMEOUT) == grpc.StatusCode.UNAUTHENTICATED
        metadata = token_call_metadata(TOKEN)
        assert _code(unknown, b"", metadata=metadata, timeout=TIMEOUT) == grpc.StatusCode.UNIMPLEMENTED


def test_empty_token_is_refused_by_the_interceptor():
    with pytest.raises(ValueError, match="empty"):
        TokenInterceptor("")


# --- TLS ------------------------------------------------------------------------------------

def test_tls_handshake_works_when_the_client_trusts_the_ca(start_server, pki):
    port = start_server(credentials=server_credentials(pki["server_cert"], pki["server_key"]))
    with _channel(port, channel_credentials(pki["ca"])) as channel:
        assert _unary(channel) == b"ping"
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_tls_client_trusting_another_ca_is_unavailable(start_server, pki):
    port = start_server(credentials=server_credentials(pki["server_cert"], pki["server_key"]))
    with _channel(port, channel_credentials(pki["other_ca"])) as channel:
        assert _code(_unary, channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_with_a_cert_from_the_ca(start_server, pki):
    tls = TLSConfig(pki["server_cert"], pki["server_key"], ca_file=pki["ca"])
    port = start_server(credentials=tls.server_credentials())
    with _channel(port, channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])) as channel:
        assert _unary(channel) == b"ping"
        assert _stream(channel) == [b"a", b"b"]


def test_mutual_tls_refuses_a_client_without_a_cert(start_server, pki):
    port = start_server(credentials=server_credentials(pki["server_cert"], pki["server_key"], pki["ca"]))
    with _channel(port, channel_credentials(pki["ca"])) as channel:
        assert _code(_unary, channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_cert_from_another_ca(start_server, pki):
    port = start_server(credentials=server_credentials(pki["server_cert"], pki["server_key"], pki["ca"]))
    creds = channel_credentials(pki["ca"], pki["other_client_cert"], pki["other_client_key"])
    with _channel(port, creds) as channel:
        assert _code(_unary, channel) == grpc.StatusCode.UNAVAILABLE


def test_token_and_tls_together(start_server, pki):
    port = start_server([TokenInterceptor(TOKEN)], server_credentials(pki["server_cert"], pki["server_key"]))
    with _channel(port, channel_credentials(pki["ca"])) as channel:
        assert _unary(channel, token_call_metadata(TOKEN)) == b"ping"
        assert _stream(channel, token_call_metadata(TOKEN)) == [b"a", b"b"]
        assert _code(_unary, channel) == grpc.StatusCode.UNAUTHENTICATED
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_tls_files_missing_or_not_pem_are_named(tmp_path, pki):
    missing = tmp_path / "nope.crt"
    with pytest.raises(ValueError, match="nope.crt.*does not exist"):
        server_credentials(missing, pki["server_key"])
    not_pem = tmp_path / "garbage.key"
    not_pem.write_text("not a key\n")
    with pytest.raises(ValueError, match="garbage.key.*not a PEM"):
        server_credentials(pki["server_cert"], not_pem)
    with pytest.raises(ValueError, match="garbage.key.*not a PEM"):
        channel_credentials(pki["ca"], pki["client_cert"], not_pem)
    with pytest.raises(ValueError, match="both"):
        channel_credentials(pki["ca"], cert_file=pki["client_cert"])


# --- token files ----------------------------------------------------------------------------

def test_read_token_strips_whitespace(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n\n")
    assert read_token(path) == TOKEN
    assert read_token(str(path)) == TOKEN


def test_read_token_refuses_an_empty_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        read_token(path)


def test_read_token_names_a_missing_file(tmp_path):
    path = tmp_path / "no-such-token"
    with pytest.raises(FileNotFoundError, match="no-such-token.*does not exist") as info:
        read_token(path)
    assert info.value.filename == str(path)

