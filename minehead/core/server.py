"""Server bootstrap shared by every minehead service.

`serve(config, services)` builds a grpc.Server with:
- the standard grpc.health.v1 service (each service SERVING once registered, NOT_SERVING while
  shutting down) and server reflection;
- explicit message size limits and keepalive settings that tolerate client pings;
- interceptors: optional bearer-token auth, access logs, and the error mapping that turns
  minehead.core.errors exceptions into status codes (unexpected ones into INTERNAL, logged);
- optional TLS; graceful shutdown on SIGTERM / SIGINT.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from minehead.core.config import ServiceConfig
from minehead.core.errors import MineheadError
from minehead.core.logs import log_event

log = logging.getLogger("minehead.server")

# Methods reachable without a token: health checks and reflection (load balancers, grpcurl).
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options shared by servers and the client library: big messages, polite keepalive."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return channel_options(max_message_bytes) + [
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients ping every 30 s (minehead.client.channel); accept anything >= 10 s so they are never
        # answered with GOAWAY too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def _abort_for(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, MineheadError):
        context.abort(exc.code, str(exc))
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        # An error from a service we called (the embedder, say) keeps its code and words.
        context.abort(exc.code(), f"{exc.details()}")
    if isinstance(exc, NotImplementedError):
        # The generated base servicers raise this for methods whose issue has not landed yet.
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    log.exception("unhandled error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


class _Interceptor(grpc.ServerInterceptor):
    """Auth check, access log and error mapping around every handler."""

    def __init__(self, auth_token: str | None) -> None:
        self._token = auth_token

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        token_ok = self._authorised(details)

        def wrap_unary(fn):
            def inner(request_or_iter, context):
                if not token_ok:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
                t0 = time.perf_counter()
                code = "OK"
                try:
                    return fn(request_or_iter, context)
                except Exception as e:  # noqa: BLE001 - the mapping is the point
                    code = type(e).__name__
                    if _is_abort(e, context):
                        raise
                    _abort_for(context, e, method)
                finally:
                    log_event(log, "rpc", logging.DEBUG, method=method, ms=round((time.perf_counter() - t0) * 1e3, 2), outcome=code)

            return inner

        def wrap_stream(fn):
            def inner(request_or_iter, context):
                if not token_ok:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
                try:
                    yield from fn(request_or_iter, context)
                except Exception as e:  # noqa: BLE001
                    if _is_abort(e, context):
                        raise
                    _abort_for(context, e, method)

            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer)

    def _authorised(self, details) -> bool:
        if not self._token or details.method.startswith(PUBLIC_METHOD_PREFIXES):
            return True
        md = dict(details.invocation_metadata or ())
        return md.get("authorization") == f"Bearer {self._token}"


def _is_abort(e: BaseException, context) -> bool:
    # context.abort() records the status on the context and raises a bare Exception(); that
    # one must pass through untouched or the status would be overwritten with INTERNAL.
    state = getattr(context, "_state", None)
    return bool(getattr(state, "aborted", False)) or (type(e) is Exception and not e.args)


@dataclasses.dataclass
class ServiceBinding:
    """One gRPC service to expose: its generated add_*_to_server function, the servicer, and
    its full name ("minehead.embedder.v1.EmbedderService") for health and reflection."""

    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any
    full_name: str


class RunningServer:
    def __init__(self, server: grpc.Server, port: int, health_servicer: health.HealthServicer, names: list[str]) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.names = names

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(config: ServiceConfig, bindings: Iterable[ServiceBinding]) -> RunningServer:
    """Build, bind and start a server; `config.port` 0 picks a free port (see .port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix=f"{config.service}-rpc"),
        interceptors=[_Interceptor(config.auth_token)],
        options=server_options(config.max_message_bytes),
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for b in bindings:
        b.add_to_server(b.servicer, server)
        names.append(b.full_name)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = config.address
    if config.tls_cert:
        creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"{config.service}: cannot bind {address} (in use?)")
    server.start()
    for name in names + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_event(log, "serving", service=config.service, address=f"{config.host}:{port}", tls=bool(config.tls_cert), auth=bool(config.auth_token))
    return RunningServer(server, port, health_servicer, names)


def serve_forever(running: RunningServer, on_stop: Callable[[], None] | None = None, grace: float = 5.0) -> None:
    """Block until SIGTERM / SIGINT, then shut down gracefully and run `on_stop`."""
    stop = threading.Event()

    def handler(signum, _frame):
        log_event(log, "shutting down", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()
    running.stop(grace)
    if on_stop:
        on_stop()
