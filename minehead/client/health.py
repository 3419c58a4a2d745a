"""Standard grpc.health.v1 checks."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minehead.client.channel import connect


def check_health(address: str, service: str = "", timeout: float = 3.0, **kw) -> str:
    """'SERVING', 'NOT_SERVING', … or 'UNREACHABLE: <why>'."""
    ch = connect(address, **kw)
    try:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        return f"UNREACHABLE: {e.code().name}: {e.details()}"
    finally:
        ch.close()
