"""One recipe step, the same at mining and at inference (design notes section 6).

    seeds    = detector(text=prompt) >= seed_threshold -> NMS(seed_dedupe_iou)
    veto seeds (background only) at stage seed or both             -> seed-stage veto count
    pick <= max_visual_seeds diverse kept seeds (farthest point in embedding space)
    expanded = detector(box exemplars=picked) >= expand_threshold
    gate everything output (kept seeds + expanded): min_prob / margin, and background when
    apply is FINAL or BOTH                                          -> final-stage veto count
    NMS(dedupe_iou) within the step, cap max_results; union over steps; NMS again.

If the background veto drops every seed of a step, the step retries once without it and logs a
warning; the final gate still applies, so nothing unfiltered is ever emitted. The prompt filter
skips expansion on an image when most of its seeds were vetoed (`BackgroundPolicy.drops_prompt`).

Arrays: boxes N x 4 XYXY pixels; probs N x C head probabilities in the head's class order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.geometry import nms
from minehead.heads.keep_rule import KEEP, KeepResult, Thresholds, apply_keep_rule
from miner_svc.detectors.base import Detections, ImageState
from miner_svc.recipes.background import BackgroundPolicy
from miner_svc.recipes.detection_cache import CachedDetector
from miner_svc.recipes.scorer import HeadScorer


@dataclasses.dataclass
class Step:
    """One step of a recipe: a text prompt with its detector thresholds (recipes.v2.Step)."""

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
    """The head's gate of a recipe: min_prob and margin (design notes section 4) and the
    background policy, whose margin is the recipe's (auto-tuned) per-class margin."""

    min_prob: float = 0.5
    margin: float = 0.0
    background: BackgroundPolicy = BackgroundPolicy()

    def final_thresholds(self) -> Thresholds:
        return Thresholds(self.min_prob, self.margin, self.background.at_final, self.background.margin)

    def seed_thresholds(self) -> Thresholds:
        # The seed stage vetoes background only: probability and margin are judged at the end.
        return Thresholds(-1.0, 0.0, True, self.background.margin)


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
    retried_without_veto: int = 0
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
    """A recipe's output on one image, after the union over steps."""

    boxes: np.ndarray  # N x 4 XYXY image pixels (float32)
    scores: np.ndarray  # N detector scores
    probs: np.ndarray  # N x C head probabilities, the head's class order
    step_index: np.ndarray  # N: the step that produced each box
    masks: np.ndarray | None  # N x H x W bool at the image size, when asked for
    stats: list[StepStats]  # per step, in recipe order
    warnings: list[str]


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
    """One step on one image -> (the detections kept, their head probabilities N x C, StepStats)."""
    bg = head.bundle.background_indices
    st = StepStats()
    seeds = det.text(state, step.prompt, step.seed_threshold, masks=masks)
    seeds = seeds.take(nms(seeds.boxes, seeds.scores, step.seed_dedupe_iou))
    vecs, probs = head.score(state, image_bytes, seeds.boxes)
    keep = np.ones(len(seeds), bool)
    st.seeds_checked = len(seeds)
    skip_expansion = False
    if gate.background.at_seed and bg and len(seeds):
        th = gate.seed_thresholds()
        veto, st.seeds_vetoed_background_only = _background_counts(
            apply_keep_rule(probs, np.full(len(seeds), target), th, bg), th, gate, bg)
        st.seeds_vetoed = int(veto.sum())
        keep = ~veto
        if not keep.any():
            st.retried_without_veto = 1
            warnings.append(f"step {step_index} ({step.prompt!r}): the background check vetoed all {len(seeds)} seeds; "
                            "retried without the veto (the final gate still applies)")
            keep[:] = True
        elif gate.background.drops_prompt(len(seeds), st.seeds_vetoed):
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
