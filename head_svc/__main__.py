"""minehead-head: train classifier heads, keep the head registry, score crops (default 127.0.0.1:50052)."""

from __future__ import annotations

from minehead.client.channel import default_address
from minehead.core.config import base_parser, config_from_args, env
from minehead.core.jobs_service import job_runtime
from minehead.core.logs import setup_logging
from minehead.core.server import ServiceBinding, serve_forever, start_server
from minehead.head.v1 import head_pb2_grpc

from head_svc.servicer import HeadServicer


def build(config):
    """(runner, bindings) for a config; shared by main() and the tests."""
    runner, jobs = job_runtime(config)
    servicer = HeadServicer(config.service_dir, config.extra.get("embedder_addr") or default_address("embedder"),
                            config.allowed_roots, runner)
    runner.servicer = servicer
    binding = ServiceBinding(head_pb2_grpc.add_HeadServiceServicer_to_server, servicer, "minehead.head.v1.HeadService")
    return runner, [binding, jobs]


def parser():
    p = base_parser("head", "Train classifier heads, keep the head registry, score crops.")
    p.add_argument("--embedder-addr", default=env("embedder_addr"), help="embedder service (default MINEHEAD_EMBEDDER_ADDR or 127.0.0.1:50051)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    config = config_from_args("head", args, ("embedder_addr",))
    setup_logging(config.log_format, config.log_level)
    runner, bindings = build(config)
    running = start_server(config, bindings)
    serve_forever(running, on_stop=runner.shutdown)


if __name__ == "__main__":
    main()
