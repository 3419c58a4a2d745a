"""Channels to minehead services: big-message limits, keepalive within the server's ping
policy, optional TLS and bearer token, all from arguments or MINEHEAD_* environment."""

from __future__ import annotations

import os

import grpc

from minehead.core.config import DEFAULT_MAX_MESSAGE_MB, DEFAULT_PORTS
from minehead.core.server import channel_options


def default_address(service: str) -> str:
    """MINEHEAD_<SERVICE>_ADDR, else 127.0.0.1:<default port>."""
    return os.environ.get(f"MINEHEAD_{service.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[service]}")


def connect(address: str, *, token: str | None = None, tls_ca: str | None = None,
            max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> grpc.Channel:
    token = token or os.environ.get("MINEHEAD_AUTH_TOKEN")
    tls_ca = tls_ca or os.environ.get("MINEHEAD_TLS_CA")
    opts = channel_options(max_message_mb << 20) + [
        # Servers accept pings every >= 10 s; 30 s keeps idle connections alive without strikes.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if tls_ca or (token and not address.startswith(("127.", "localhost", "[::1]"))):
        creds = grpc.ssl_channel_credentials(open(tls_ca, "rb").read() if tls_ca else None)
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, creds, options=opts)
    channel = grpc.insecure_channel(address, options=opts)
    if token:
        # Plaintext loopback: gRPC refuses call credentials without TLS, so add the header ourselves.
        channel = grpc.intercept_channel(channel, _BearerInterceptor(token))
    return channel


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or []) + [self._md]
        return _Details(d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None),
                        getattr(d, "compression", None))

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class ServiceClient:
    """Base for the service clients: address from argument or environment, one channel,
    usable as a context manager."""

    service = ""

    def __init__(self, address: str | None = None, *, timeout: float = 600.0, **connect_kw) -> None:
        self.address = address or default_address(self.service)
        self.channel = connect(self.address, **connect_kw)
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()
