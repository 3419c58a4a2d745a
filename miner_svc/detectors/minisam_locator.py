"""Proposals from the head's locator on SAM TinyViT features: the offline default for heads that
carry a locator (trained from the user's own boxes, minehead.locator).

    minisam-locator      backbone once -> locator once -> heatmap peaks -> boxes

Per image: the TinyViT encoder runs once (the same 64 x 64 x 259 map the embedder serves and the
locator was trained on), the locator's small ONNX graph runs once (milliseconds), and each
class's 3 x 3 heatmap peaks at or above FLOOR become boxes from the predicted size and offset.
A box's score is its peak's probability, so mining tunes thresholds on peak scores exactly as
it tunes seed thresholds (the detection cache stores the peaks once, at the floor). No decoder
pass is spent on proposals: SAM's decoder runs only in `refine`, for boxes already kept.

Large images: an orthomosaic of 2,000+ px squeezed into the 1024 frame shrinks a 20 px tree to a
sub-cell speck the locator never saw. So an image much larger than the images the head's objects
came from is cut into overlapping square tiles of that size (`tiling.plan`), each tile gets its
own backbone pass and locator pass, and the boxes are merged across seams (`tiling.merge`).
The plan used is kept per image (`tiling_of`) for the drafting summary.

Prompts: a prompt naming a head class returns that class's peaks; an empty or unknown prompt
returns every class's (class-wise NMS). Without a head (or with a head without a locator) the
detector is the grid detector, so it stays usable anywhere. `Detections.sources` is "locator".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from minehead.core.errors import FailedPrecondition

from minehead import crops, roi
from minehead.geometry import iou_matrix, nms
from minehead.locator.decode import LocatorDetections
from minehead.locator.frame import FeatureFrame
from miner_svc.detectors import tiling
from miner_svc.detectors.base import Detections, DetectorInfo, ImageState
from miner_svc.detectors.minisam_auto import PROPOSALS_VERSION, MinisamAutoDetector, MinisamFeatures, one_blas_thread
from miner_svc.detectors.minisam_guided import EMBEDDER, class_index

MODEL_ID = "minisam-locator"
FLOOR = 0.02  # peaks below this are no proposal at all (mining's floor, 0.05, sits above it)
ALL_CLASSES_NMS_IOU = 0.7  # an empty prompt: one box per object even where two classes peak
# SAM's mask box replaces the locator's box only when they agree this well (held-out best F1 with
# refinement at 0.0 / 0.3 / 0.5 within 0.003 of each other; 0.7 refused SAM's corrections: brick
# 0.91 -> 0.87)
REFINE_MIN_IOU = 0.3
LOCATOR_VERSION = 1


@dataclasses.dataclass
class LocatorFeatures(MinisamFeatures):
    """MinisamFeatures plus the locator's work for the image: `locator`, every class's peaks (XYXY
    image px), and `tiling`, how the image was cut ({"tiles", "tile_px", "overlap_px"}). A tiled
    image never gets the whole image's `fmap`."""

    locator: LocatorDetections | None = None
    tiling: dict | None = None
    # A tiled image's crop embeddings, pooled from each tile's own map (the scale the head was
    # trained at), keyed by box (`_key`): kept per box, not per map (a 10,000 px slide has
    # hundreds of tiles). None for an image drafted whole.
    tile_vectors: dict | None = None


def _key(box: np.ndarray) -> bytes:
    return np.round(np.asarray(box, np.float32), 1).tobytes()


class MinisamLocatorDetector(MinisamAutoDetector):
    uses_head = True
    features_type = LocatorFeatures

    def __init__(self, model_id: str, models_dir: Path, offline: bool = True) -> None:
        super().__init__("minisam-auto", models_dir, offline)  # the encoder, decoder and 12 x 12 grid
        self.head = None
        self.info = DetectorInfo(MODEL_ID, class_agnostic=False,
                                 note="peaks of the head's locator (trained from the user's boxes) on SAM TinyViT "
                                      "features; without a locator, a 12x12 point grid")

    @property
    def cache_key(self) -> str:
        base = f"{MODEL_ID}@{PROPOSALS_VERSION}.{LOCATOR_VERSION}"
        oof = "|out-of-fold" if self.out_of_fold else ""
        return f"{base}|head={self.head.head_id}{oof}" if self.head is not None else f"{base}|grid"

    def with_head(self, head, out_of_fold: bool = False) -> "MinisamLocatorDetector":
        """A view sharing the loaded sessions that proposes with `head`'s locator."""
        if head is None:
            return self
        if head.embedder_model != EMBEDDER:
            raise FailedPrecondition(f"detector {MODEL_ID!r} reads {EMBEDDER} features; head {head.head_id} was trained "
                                     f"on {head.embedder_model!r} embeddings")
        if head.locator is None:
            raise FailedPrecondition(f"head {head.head_id} has no locator (trained with --no-locator, or before "
                                     "locators existed): retrain it, or use minisam-guided")
        if head.locator.in_channels != 259:
            raise FailedPrecondition(f"head {head.head_id}'s locator reads {head.locator.in_channels} channels; "
                                     f"{EMBEDDER}'s map has 259")
        return self._bind(head, out_of_fold)

    # -- proposals --------------------------------------------------------------------------
    def tiling_of(self, state: ImageState) -> dict:
        """How the image was cut: {"tiles": n, "tile_px": side, "overlap_px": o} (1 tile = whole)."""
        self.locator_proposals(state)
        return dict(state.features.tiling)

    @one_blas_thread
    def locator_proposals(self, state: ImageState) -> LocatorDetections:
        """Every class's peaks in the image (XYXY image px), computed once per image."""
        view = self.fold_view(state)
        if view is not self:
            return view.locator_proposals(state)
        f = self._state_features(state)  # tiled images never need the whole image's map
        if f.locator is not None:
            return f.locator
        H, W = state.image.height, state.image.width
        plan = tiling.plan(W, H, self.head.object_px, self.head.object_sides)
        if len(plan.tiles) == 1:
            fmap = self._features(state).fmap
            d = self._detect(fmap, W, H)
        else:
            parts, vectors = [], {}
            for x0, y0, x1, y1 in plan.tiles:
                tile = np.ascontiguousarray(state.image.pixels[y0:y1, x0:x1])
                x, scale = crops.prepare_image(tile, self.pre.input_size, self.pre.resize, self.pad)
                fmap = self.encoder.feature_maps(x[None])[0]
                self.counters.add(backbone=1)
                d = self._detect(fmap, x1 - x0, y1 - y0)
                parts.append((d, (x0, y0, x1, y1)))
                vecs = self._pool(fmap, scale, d.boxes, (y1 - y0, x1 - x0), self.head.crop_policy)
                for b, v in zip(d.boxes + np.array([x0, y0, x0, y0], np.float32), vecs):
                    vectors[_key(b)] = v
            d = tiling.merge(parts, W, H)
            f.tile_vectors = vectors
        f.locator, f.tiling = d, plan.describe()
        return d

    def _pool(self, fmap, scale, boxes, size_hw, policy) -> np.ndarray:
        regions = crops.crop_regions(np.asarray(boxes, np.float64).reshape(-1, 4), policy)
        v = roi.pool_regions(fmap, regions * scale, self.pre.input_size / fmap.shape[-1],
                             (size_hw[0] * scale, size_hw[1] * scale))
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def embeddings(self, state: ImageState, boxes: np.ndarray, policy: crops.CropPolicy | None = None) -> np.ndarray:
        """Crop embeddings (N x 4 XYXY image px -> N x D): from the tile a box was found in when
        the image was tiled (the scale the head was trained at), else from the image's map."""
        f = state.features
        vectors = f.tile_vectors if isinstance(f, LocatorFeatures) else None
        if vectors is not None and (policy is None or policy == self.head.crop_policy):
            got = [vectors.get(_key(b)) for b in np.asarray(boxes, np.float32).reshape(-1, 4)]
            if all(v is not None for v in got):
                return np.stack(got) if got else np.zeros((0, self.head.dim), np.float32)
        return super().embeddings(state, boxes, policy)

    def _detect(self, fmap: np.ndarray, w: int, h: int) -> LocatorDetections:
        loc = self.head.locator
        frame = FeatureFrame.for_image(w, h, self.pre.input_size, self.pre.resize, fmap.shape[1], fmap.shape[2])
        return loc.detect(fmap, frame, FLOOR)

    def proposals(self, state: ImageState) -> Detections:
        if self.head is None:
            return self.grid_proposals(state)
        return self._as_detections(self.locator_proposals(state), None)

    def _as_detections(self, d: LocatorDetections, k: int | None) -> Detections:
        if k is not None:
            d = d.take(np.flatnonzero(d.class_ids == k))
        elif len(d):
            d = d.take(nms(d.boxes, d.scores, ALL_CLASSES_NMS_IOU))
        return Detections(d.boxes.astype(np.float32), d.scores.astype(np.float32), None,
                          np.full(len(d), "locator"))

    # -- refinement -------------------------------------------------------------------------
    def refine(self, state: ImageState, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SAM's decoder on boxes already kept (N x 4 XYXY image px), one box prompt each: (boxes
        N x 4, masks N x H x W bool). Where SAM's mask box agrees with the given box (IoU >=
        REFINE_MIN_IOU) the mask's tight box replaces it; elsewhere the box stays and its mask is
        the box itself (SAM found something else there). A tiled image is not refined: SAM at the
        whole image's 1024 px scale would see specks."""
        H, W = state.image.height, state.image.width
        out_b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
        masks = np.zeros((len(out_b), H, W), bool)
        if isinstance(state.features, LocatorFeatures) and state.features.tile_vectors is not None:
            for i, (x0, y0, x1, y1) in enumerate(np.round(out_b).astype(int)):
                masks[i, max(y0, 0):y1, max(x0, 0):x1] = True
            return out_b, masks
        f = self._features(state)
        for i, b in enumerate(out_b):
            low, iou = self._decode(f, np.array([b[:2], b[2:]]) * f.scale, np.array([2.0, 3.0]))
            cands = self.masks_of(low[:1], np.minimum(iou[:1], 1.0), (H, W))
            if cands and iou_matrix(cands[0].box[None], b[None])[0, 0] >= REFINE_MIN_IOU:
                out_b[i] = cands[0].box
                masks[i] = cands[0].mask
            else:
                x0, y0, x1, y1 = np.round(b).astype(int)
                masks[i, max(y0, 0):y1, max(x0, 0):x1] = True
        return out_b, masks

    # -- the Detector interface -------------------------------------------------------------
    def predict_text(self, state: ImageState, prompt: str, threshold: float) -> Detections:
        if self.head is None:
            return self.grid_proposals(state).above(threshold)
        c = class_index(self.head.classes, prompt)
        real = self.head.real_classes
        k = real.index(self.head.classes[c]) if c is not None and self.head.classes[c] in real else None
        return self._as_detections(self.locator_proposals(state), k).above(threshold)
