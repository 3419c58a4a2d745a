"""Service configuration from flags and environment (flags win).

Every server takes the same base settings; each adds its own with `add_argument`. Environment
variables are MINEHEAD_<FLAG_IN_CAPS> (for example MINEHEAD_DATA_DIR), so `make run-all` and
containers can configure without flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

DEFAULT_PORTS = {"embedder": 50051, "head": 50052, "miner": 50053}
# gRPC's default receive limit is 4 MiB; image batches need far more.
DEFAULT_MAX_MESSAGE_MB = 128


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("MINEHEAD_" + name.upper().replace("-", "_"), default)


@dataclasses.dataclass
class ServiceConfig:
    service: str
    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path = Path("var")
    models_dir: Path = Path("var/models")
    allowed_roots: list[Path] = dataclasses.field(default_factory=list)
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    workers: int = 16
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_format: str = "text"
    log_level: str = "INFO"
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def service_dir(self) -> Path:
        """Where this service keeps its own state (job store, registry, caches)."""
        return self.data_dir / self.service


def base_parser(service: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"minehead-{service}", description=description)
    p.add_argument("--host", default=env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env(f"{service}_port", str(DEFAULT_PORTS[service]))))
    p.add_argument("--data-dir", default=env("data_dir", "var"), help="state: job store, registries, caches")
    p.add_argument("--models-dir", default=env("models_dir", None), help="local model weights (default DATA_DIR/models)")
    p.add_argument(
        "--allowed-roots",
        default=env("allowed_roots", ""),
        help="os.pathsep-separated folders that dataset/image paths may lie under (default: DATA_DIR and the cwd)",
    )
    p.add_argument("--max-message-mb", type=int, default=int(env("max_message_mb", str(DEFAULT_MAX_MESSAGE_MB))))
    p.add_argument("--workers", type=int, default=int(env("workers", "16")), help="gRPC handler threads")
    p.add_argument("--auth-token", default=env("auth_token"), help="require 'authorization: Bearer TOKEN' (off by default)")
    p.add_argument("--tls-cert", default=env("tls_cert"), help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", default=env("tls_key"))
    p.add_argument("--log-format", choices=["text", "json"], default=env("log_format", "text"))
    p.add_argument("--log-level", default=env("log_level", "INFO"))
    return p


def config_from_args(service: str, args: argparse.Namespace, extra_keys: tuple[str, ...] = ()) -> ServiceConfig:
    data_dir = Path(args.data_dir).expanduser().resolve()
    models_dir = Path(args.models_dir).expanduser().resolve() if args.models_dir else data_dir / "models"
    roots = [Path(r).expanduser().resolve() for r in (args.allowed_roots or "").split(os.pathsep) if r.strip()]
    if not roots:
        roots = [data_dir, Path.cwd().resolve()]
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    return ServiceConfig(
        service=service,
        host=args.host,
        port=args.port,
        data_dir=data_dir,
        models_dir=models_dir,
        allowed_roots=roots,
        max_message_mb=args.max_message_mb,
        workers=args.workers,
        auth_token=args.auth_token or None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        log_format=args.log_format,
        log_level=args.log_level,
        extra={k: getattr(args, k) for k in extra_keys},
    )
