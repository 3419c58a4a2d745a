"""What every server shares: health, reflection, auth, UNIMPLEMENTED placeholders, graceful stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from minehead.client.channel import connect
from minehead.client.health import check_health
from minehead.core.server import start_server
from tests.conftest import REPO, make_config


@pytest.fixture
def head_and_miner(tmp_path):
    from head_svc.__main__ import build as build_head
    from miner_svc.__main__ import build as build_miner

    out = {}
    for svc, build in (("head", build_head), ("miner", build_miner)):
        cfg = make_config(svc, tmp_path / svc)
        runner, bindings = build(cfg)
        out[svc] = (start_server(cfg, bindings), runner)
    yield {k: f"127.0.0.1:{v[0].port}" for k, v in out.items()}
    for server, runner in out.values():
        server.stop(0.5)
        runner.shutdown()


def test_health_and_reflection(head_and_miner):
    addr = head_and_miner["miner"]
    assert check_health(addr) == "SERVING"
    assert check_health(addr, "minehead.miner.v1.MinerService") == "SERVING"
    assert check_health(addr, "minehead.common.v1.JobService") == "SERVING"
    ch = connect(addr)
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"minehead.miner.v1.MinerService", "minehead.common.v1.JobService", "grpc.health.v1.Health"} <= names
    with pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    ch.close()


def test_unimplemented_methods_say_so(tmp_path):
    """A servicer method that is not written (the generated base class raises
    NotImplementedError) answers UNIMPLEMENTED naming the method, not INTERNAL."""
    from minehead.core.server import ServiceBinding
    from minehead.miner.v1 import miner_pb2, miner_pb2_grpc

    cfg = make_config("miner", tmp_path)
    server = start_server(cfg, [ServiceBinding(miner_pb2_grpc.add_MinerServiceServicer_to_server, miner_pb2_grpc.MinerServiceServicer(),
                                               "minehead.miner.v1.MinerService")])
    try:
        with pytest.raises(grpc.RpcError) as e:
            miner_pb2_grpc.MinerServiceStub(connect(f"127.0.0.1:{server.port}")).ListRecipes(miner_pb2.ListRecipesRequest())
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "ListRecipes" in e.value.details()
    finally:
        server.stop(0.5)


def test_bearer_token(tmp_path):
    from minehead.common.v1 import common_pb2, common_pb2_grpc
    from miner_svc.__main__ import build

    cfg = make_config("miner", tmp_path, auth_token="s3cret")
    runner, bindings = build(cfg)
    server = start_server(cfg, bindings)
    addr = f"127.0.0.1:{server.port}"
    try:
        assert check_health(addr) == "SERVING"  # health stays public for load balancers
        with pytest.raises(grpc.RpcError) as e:
            common_pb2_grpc.JobServiceStub(connect(addr)).ListJobs(common_pb2.ListJobsRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            common_pb2_grpc.JobServiceStub(connect(addr, token="wrong")).ListJobs(common_pb2.ListJobsRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = common_pb2_grpc.JobServiceStub(connect(addr, token="s3cret")).ListJobs(common_pb2.ListJobsRequest())
        assert list(ok.jobs) == []
    finally:
        server.stop(0.5)
        runner.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_serves_then_stops_gracefully_on_sigterm(tmp_path):
    port = _free_port()
    env = dict(os.environ, MINEHEAD_DATA_DIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "head_svc", "--port", str(port), "--log-format", "json"],
                         cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while check_health(f"127.0.0.1:{port}", timeout=0.5) != "SERVING":
            assert time.time() - t0 < 30 and p.poll() is None
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
        log = p.stderr.read()
        assert '"msg": "serving"' in log and '"msg": "shutting down"' in log and "SIGTERM" in log
    finally:
        if p.poll() is None:
            p.kill()


def test_tls_with_token(tmp_path):
    """TLS on, bearer token on: a client with the CA and token gets through, a plaintext one does not."""
    from minehead.common.v1 import common_pb2, common_pb2_grpc
    from miner_svc.__main__ import build

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    cfg = make_config("miner", tmp_path, auth_token="tok", tls_cert=cert, tls_key=key)
    runner, bindings = build(cfg)
    server = start_server(cfg, bindings)
    addr = f"127.0.0.1:{server.port}"
    try:
        ok = common_pb2_grpc.JobServiceStub(connect(addr, token="tok", tls_ca=str(cert))).ListJobs(common_pb2.ListJobsRequest(), timeout=10)
        assert list(ok.jobs) == []
        with pytest.raises(grpc.RpcError) as e:
            common_pb2_grpc.JobServiceStub(connect(addr, token="tok")).ListJobs(common_pb2.ListJobsRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    finally:
        server.stop(0.5)
        runner.shutdown()
