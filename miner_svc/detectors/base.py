"""The detector interface, in the style of SAM's predictor: the expensive step once per image,
cheap prompts many times.

    state = detector.set_image(image)            # nothing runs yet: the backbone is lazy
    d = detector.predict_text(state, "red car", threshold=0.05)
    e = detector.predict_exemplars(state, boxes, threshold=0.3)

`Detections` arrays: boxes N x 4 XYXY pixels (float32), scores N (float32, 0..1), masks N x H x W
bool at the image size (or None), sources N str (or None): which proposal source produced each
box (e.g. "grid", "head"); reporting only, not kept by the detection cache. Counters say how many backbone, text and decoder passes ran,
so a run summary can show that the backbone ran once per image and the cache did its job.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from minehead.core.images import DecodedImage


@dataclasses.dataclass
class Detections:
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray | None = None
    sources: np.ndarray | None = None

    @classmethod
    def empty(cls, h: int = 0, w: int = 0) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, h, w), bool) if h else None)

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, idx) -> "Detections":
        idx = np.asarray(idx, np.int64)
        return Detections(self.boxes[idx], self.scores[idx], self.masks[idx] if self.masks is not None else None,
                          self.sources[idx] if self.sources is not None else None)

    def above(self, threshold: float) -> "Detections":
        return self.take(np.flatnonzero(self.scores >= threshold))


@dataclasses.dataclass
class DetectorInfo:
    model_id: str
    class_agnostic: bool = False
    meaningless: bool = False  # random weights: detections mean nothing
    note: str = ""


class PassCounters:
    """Model passes a detector ran: backbone (image encoder), text, decoder; and embedder_maps:
    images whose feature map came from the embedder's cache (`shared_maps`), so no encoder ran
    for them anywhere. A map the embedder computed at the detector's request is a backbone pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.backbone = 0
        self.text = 0
        self.decoder = 0
        self.embedder_maps = 0

    def add(self, backbone: int = 0, text: int = 0, decoder: int = 0, embedder_maps: int = 0) -> None:
        with self._lock:
            self.backbone += backbone
            self.text += text
            self.decoder += decoder
            self.embedder_maps += embedder_maps

    def snapshot(self) -> dict:
        return {"backbone_passes": self.backbone, "text_passes": self.text, "decoder_passes": self.decoder,
                "embedder_maps": self.embedder_maps}

    def since(self, before: dict) -> dict:
        """The passes counted since `before` (a snapshot), by the snapshot's names."""
        after = self.snapshot()
        return {k: after[k] - before.get(k, 0) for k in after}

    def add_passes(self, passes: dict) -> None:
        """Add passes counted elsewhere (a Ray worker's `since`), by the snapshot's names."""
        self.add(**{k.removesuffix("_passes"): v for k, v in passes.items()})


class ImageState:
    """One image for one detector.

    features: the detector's own per-image work, computed on first use and kept (None until
        then): a detector-specific object, e.g. `minisam_auto.MinisamFeatures` (feature map,
        its scale, the decoder's image side, proposals) or SAM3's vision output.
    pooled: crop embeddings of this image's boxes pooled from its feature map elsewhere (a Ray
        worker; `miner_svc.scale`), by box (the float32 XYXY pixel box's bytes) -> D float32;
        None when the image was not detected elsewhere. Read by the head's scorer
        (`miner_svc.recipes.scorer.feature_pool`) before it asks for `features`.
    lock: guards `features` (concurrent requests for one image)."""

    def __init__(self, image: DecodedImage) -> None:
        self.image = image
        self.features = None
        self.pooled: dict[bytes, np.ndarray] | None = None
        self.lock = threading.Lock()


class Detector:
    info: DetectorInfo
    # A detector that needs the head to propose boxes (head-guided proposals) says so; the miner
    # then binds each head with `with_head` and the detection cache keys on the head too.
    uses_head: bool = False

    def __init__(self) -> None:
        self.counters = PassCounters()

    @property
    def cache_key(self) -> str:
        """What identifies this detector's raw output in the detection cache."""
        return self.info.model_id

    def with_head(self, head, out_of_fold: bool = False) -> "Detector":
        """This detector bound to a head (a minehead.heads.bundle.HeadBundle). Detectors that do
        not use a head return themselves; those that do return a light view sharing the loaded
        models, whose `cache_key` names the head. out_of_fold (mining, a cross-fitted head): each
        labelled image is proposed for by its fold's models, which were not fitted on it
        (`fold_view`); the cache key says so."""
        return self

    out_of_fold = False

    def _bind(self, head, out_of_fold: bool) -> "Detector":
        """A view of this detector (the loaded sessions shared) bound to `head`, with its own pass
        counters; what every head-using detector's `with_head` starts from."""
        view = object.__new__(type(self))
        view.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_fold_views"})
        view.head = head
        view.out_of_fold = bool(out_of_fold and head.folds)
        view.counters = PassCounters()
        return view

    def fold_view(self, state: ImageState) -> "Detector":
        """The view to propose for this image with: bound to the image's fold head when this view
        is out-of-fold and the image is one the head was cross-fitted on, else this view. Fold
        views count their passes here."""
        if not self.out_of_fold:
            return self
        head = self.head.fold_for(state.image.sha256)
        if head is self.head:
            return self
        views = self.__dict__.setdefault("_fold_views", {})
        view = views.get(head.head_id)
        if view is None:
            view = views[head.head_id] = self.with_head(head)
            view.counters = self.counters
        return view

    def set_image(self, image: DecodedImage) -> ImageState:
        return ImageState(image)

    def predict_text(self, state: ImageState, prompt: str, threshold: float) -> Detections:
        raise NotImplementedError

    def predict_exemplars(self, state: ImageState, boxes: np.ndarray, threshold: float) -> Detections:
        raise NotImplementedError
