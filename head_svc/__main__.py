"""minehead-head: Train classifier heads, keep the head registry, score crops.

Until its issue lands the HeadService methods answer UNIMPLEMENTED (the generated base servicer);
health, reflection and the Jobs service over this service's job store are live.
"""

from __future__ import annotations

from minehead.core.config import base_parser, config_from_args
from minehead.core.jobs_service import job_runtime
from minehead.core.logs import setup_logging
from minehead.core.server import ServiceBinding, serve_forever, start_server
from minehead.head.v1 import head_pb2_grpc


def build(config):
    """(runner, bindings) for a config; shared by main() and the tests."""
    runner, jobs = job_runtime(config)
    binding = ServiceBinding(head_pb2_grpc.add_HeadServiceServicer_to_server, head_pb2_grpc.HeadServiceServicer(),
                             "minehead.head.v1.HeadService")
    return runner, [binding, jobs]


def main(argv=None) -> None:
    args = base_parser("head", "Train classifier heads, keep the head registry, score crops.").parse_args(argv)
    config = config_from_args("head", args)
    setup_logging(config.log_format, config.log_level)
    runner, bindings = build(config)
    running = start_server(config, bindings)
    serve_forever(running, on_stop=runner.shutdown)


if __name__ == "__main__":
    main()
