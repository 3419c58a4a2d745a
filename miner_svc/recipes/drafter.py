"""Drafting: a recipe set applied to new images (the product's last step).

    drafter = Drafter(det, head, scorer, recipe_set, options)
    drafted = drafter.draft(data, "img_0001.jpg", index=0)      # -> miner.v1.DraftedImage

Per image the detector's backbone runs once (one ImageState), each distinct prompt across all
classes runs once (the detection cache), every candidate box is embedded and scored by the
head once (HeadScorer.score remembers the image's rows), and each class's recipe is then the
same executor as mining (`run_recipe`) filtering those rows. Between classes: two kept boxes of
different classes overlapping at IoU >= overlap_iou keep the higher head probability, and the
loser is recorded as the winner's runner-up. A box whose head margin (its class minus the best
other real class) is under the ambiguity margin is flagged ambiguous.

`uncertainty` orders the review queue: the smallest of the head margin and the slack to every
threshold the box passed (min_prob, margin, background margin, the step's detector threshold).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from minehead.core.errors import InvalidArgument, MineheadError
from minehead.core.images import decode_image
from minehead.geometry import iou_matrix, mask_nms
from minehead.heads.bundle import HeadBundle
from minehead.heads.keep_rule import apply_keep_rule, split_scores
from minehead.miner.v1 import drafting_pb2

from miner_svc.recipes import masks as mask_codec
from miner_svc.recipes.codec import gate_of, steps_of
from miner_svc.recipes.detection_cache import DEFAULT_FLOOR, CachedDetector
from miner_svc.recipes.executor import Gate, Step, run_recipe
from miner_svc.recipes.scorer import HeadScorer, feature_pool

log = logging.getLogger("minehead.drafting")

DEFAULT_OVERLAP_IOU = 0.7
DEFAULT_AMBIGUITY_MARGIN = 0.1
LOOKALIKE_MODES = ("relabel", "flag", "drop")
# Measured on held-out crowded scenes (red vs crimson squares; bench_locator): F1 flag 0.90,
# drop 0.82, relabel 0.75. A crop head that trusts its top-1 over the detector that found the
# box relabels right objects wrong more often than it corrects look-alikes.
DEFAULT_LOOKALIKES = "flag"
REFINED_NMS_IOU = 0.3  # refined boxes of one object converge on it; touching objects barely overlap


@dataclasses.dataclass
class _Row:
    """One kept box while an image is drafted. box: XYXY image px; probs: the head's, all classes;
    mask: H x W bool or None; note: how it came to be written as `cr`'s class, if not found so."""

    head_prob: float
    cr: "_ClassRecipe"
    box: np.ndarray
    score: float
    probs: np.ndarray
    step: int
    mask: np.ndarray | None
    found_as: "_ClassRecipe | None" = None  # the recipe that found it, when relabelled
    lookalike: bool = False  # the head calls it another class that could not take it


MAX_THRESHOLD_SCALE = 2.0


def threshold_scale(options: drafting_pb2.DraftOptions) -> float:
    """DraftOptions.threshold_scale checked (0 = unset = 1); INVALID_ARGUMENT outside (0, 2]."""
    s = options.threshold_scale or 1.0
    if not 0 < s <= MAX_THRESHOLD_SCALE:
        raise InvalidArgument(f"threshold_scale must be within (0, {MAX_THRESHOLD_SCALE:g}], got {options.threshold_scale:g}")
    return float(s)


def scaled_steps(steps: list[Step], scale: float) -> list[Step]:
    """A recipe's steps as a draft runs them: detector thresholds (seed and expansion) times
    DraftOptions.threshold_scale, kept within [0, 1]."""
    if scale == 1.0:
        return steps
    return [dataclasses.replace(st, seed_threshold=min(st.seed_threshold * scale, 1.0),
                                expand_threshold=min(st.expand_threshold * scale, 1.0)) for st in steps]


def draft_floor(recipe_set: drafting_pb2.RecipeSet, scale: float = 1.0) -> float:
    """The detection cache floor for a set: low enough for every threshold its steps use (times
    the draft's threshold_scale)."""
    return min([DEFAULT_FLOOR] + [min(t * scale, 1.0) for r in recipe_set.recipes for s in r.steps
                                  for t in (s.seed_threshold, s.expand_threshold) if t > 0])


def make_drafter(detector, head: HeadBundle, recipe_set: drafting_pb2.RecipeSet, options: drafting_pb2.DraftOptions,
                 embeds, model, cache_dir: Path) -> "Drafter":
    """A Drafter on a loaded detector (bound to `head` when it proposes with the head), built the
    same way in the miner (`MinerResources.drafter`) and on a Ray worker (`miner_svc.scale`).

    The detection cache is per drafter: new images are seen once, so nothing is written to disk
    and each image's rows are dropped when it is done (memory stays flat); the disk under
    `cache_dir` is still read (images that were mined). embeds: CropEmbeddingCache; model: the
    head embedder's embedder_pb2.Model."""
    det = CachedDetector(detector, cache_dir, draft_floor(recipe_set, threshold_scale(options)), persist=False)
    scorer = HeadScorer(head, embeds, model, pool=feature_pool(detector, head, model), keep_images=1)
    return Drafter(det, head, scorer, recipe_set, options)


@dataclasses.dataclass
class _ClassRecipe:
    recipe_id: str
    class_name: str
    target: int
    steps: list[Step]
    gate: Gate


class Drafter:
    def __init__(self, det: CachedDetector, head: HeadBundle, scorer: HeadScorer, recipe_set: drafting_pb2.RecipeSet,
                 options: drafting_pb2.DraftOptions) -> None:
        self.det, self.head, self.scorer = det, head, scorer
        self.recipe_set, self.options = recipe_set, options  # what a Ray worker rebuilds it from (unscaled)
        self.threshold_scale = threshold_scale(options)
        self.recipes = [_ClassRecipe(r.recipe_id, r.class_name, head.classes.index(r.class_name),
                                     scaled_steps(steps_of(r), self.threshold_scale), gate_of(r))
                        for r in recipe_set.recipes]
        self.polygons = options.polygons
        self.overlap_iou = options.overlap_iou or DEFAULT_OVERLAP_IOU
        self.ambiguity_margin = options.ambiguity_margin or DEFAULT_AMBIGUITY_MARGIN
        self.real = [i for i in range(len(head.classes)) if i not in set(head.background_indices)]
        self.lookalikes = options.lookalikes or DEFAULT_LOOKALIKES
        if self.lookalikes not in LOOKALIKE_MODES:
            raise InvalidArgument(f"lookalikes must be one of {', '.join(LOOKALIKE_MODES)}, got {options.lookalikes!r}")
        refine = getattr(det.detector, "refine", None)
        self.refine = refine if (options.refine_boxes if options.HasField("refine_boxes") else refine is not None) else None
        if options.HasField("refine_boxes") and options.refine_boxes and refine is None:
            raise InvalidArgument(f"refine_boxes: detector {det.info.model_id!r} cannot refine boxes (its boxes come "
                                  "from masks already)")
        self.by_target = {cr.target: cr for cr in self.recipes}
        self.relabelled = 0
        self.dropped = 0
        self.warnings: list[str] = []
        if self.threshold_scale != 1.0:
            self.warnings.append(f"threshold_scale {self.threshold_scale:g}: every step's detector threshold times "
                                 f"{self.threshold_scale:g}; the expected figures were measured at the thresholds mining chose")

    def draft(self, data: bytes, name: str, index: int) -> drafting_pb2.DraftedImage:
        """One image. An unreadable image comes back with `error` set and no boxes; an
        unexpected error while drafting it (a bug) with `failure` set, logged with its
        traceback: one image never fails a whole job or stream."""
        out = drafting_pb2.DraftedImage(image=name, index=index)
        try:
            image = decode_image(data, name)
        except MineheadError as e:
            out.error = str(e)
            return out
        out.width, out.height = image.width, image.height
        try:
            self._draft(image, data, out)
        except Exception as e:  # noqa: BLE001 - reported per image; the job goes on
            log.exception("drafting %s (image %d) failed", name, index)
            del out.boxes[:]
            out.ClearField("tiling")
            out.failure = f"{type(e).__name__}: {e}"
        finally:
            self.det.forget(image.sha256)
        return out

    def _draft(self, image, data: bytes, out: drafting_pb2.DraftedImage) -> None:
        state = self.det.set_image(image)
        rows: list[_Row] = []
        for cr in self.recipes:
            r = run_recipe(self.det, state, data, cr.steps, cr.gate, cr.target, self.scorer, masks=self.polygons)
            for w in r.warnings:
                if w not in self.warnings:
                    self.warnings.append(w)
            for j in range(len(r.boxes)):
                rows.append(_Row(float(r.probs[j, cr.target]), cr, r.boxes[j], float(r.scores[j]), r.probs[j],
                                 int(r.step_index[j]), r.masks[j] if r.masks is not None else None))
        kept = self._refine(state, self._resolve(self._lookalikes(rows)))
        for row, runner_up in kept:
            out.boxes.append(self._box(row, runner_up))
        tiling_of = getattr(self.det.detector, "tiling_of", None)
        if tiling_of is not None and getattr(self.det.detector, "head", None) is not None:
            out.tiling.CopyFrom(drafting_pb2.Tiling(**tiling_of(state)))

    def _lookalikes(self, rows: list[_Row]) -> list[_Row]:
        """A box whose head top-1 (among real classes) is another class than its recipe's: kept
        and flagged ("flag", the default), written as that class when that class's recipe gate
        accepts it, else flagged ("relabel"), or dropped ("drop")."""
        out = []
        for r in rows:
            top = self.real[int(np.argmax(r.probs[self.real]))]
            if top == r.cr.target:
                out.append(r)
                continue
            other = self.by_target.get(top)
            if self.lookalikes == "drop":
                self.dropped += 1
                continue
            if self.lookalikes == "relabel" and other is not None and apply_keep_rule(
                    r.probs[None], np.array([top]), other.gate.final_thresholds(), self.head.background_indices).keep[0]:
                self.relabelled += 1
                out.append(dataclasses.replace(r, head_prob=float(r.probs[top]), cr=other, found_as=r.cr))
            else:
                out.append(dataclasses.replace(r, lookalike=True))
        return out

    def _resolve(self, rows: list[_Row]) -> list[tuple[_Row, tuple[str, float] | None]]:
        """Cross-class overlaps: the higher detector score x head probability wins (both have a
        say: a locator's per-class peaks tell look-alikes apart better than a crop classifier
        does; crowded scenes F1 0.899 -> 0.907, the look-alike pair 0.83/0.77 -> 0.85/0.81); the
        loser is the runner-up. The same object found by two recipes and relabelled to one
        class stays once."""
        rows.sort(key=lambda r: -r.head_prob * r.score)
        if not rows:
            return []
        boxes = np.stack([r.box for r in rows]).astype(np.float64)
        iou = iou_matrix(boxes, boxes)
        kept: list[int] = []
        runner: dict[int, tuple[str, float]] = {}
        for i, r in enumerate(rows):
            if any(rows[k].cr is r.cr and iou[i, k] >= self.overlap_iou for k in kept) and r.found_as is not None:
                continue
            clash = [k for k in kept if rows[k].cr.class_name != r.cr.class_name and iou[i, k] >= self.overlap_iou]
            if clash:
                k = max(clash, key=lambda k: iou[i, k])
                runner.setdefault(k, (r.cr.class_name, r.head_prob))
                continue
            kept.append(i)
        return [(rows[k], runner.get(k)) for k in kept]

    def _refine(self, state, kept: list[tuple[_Row, tuple | None]]) -> list[tuple[_Row, tuple | None]]:
        """SAM's decoder on the kept boxes only (a box prompt each), then per-class NMS by mask
        overlap: refined masks of one object converge on it, while touching objects (two rods
        side by side on a diagonal: a high box IoU) barely share a pixel. Without refinement,
        the rows as they are."""
        if self.refine is None or not kept:
            return kept
        boxes, masks = self.refine(state, np.stack([r.box for r, _ in kept]))
        kept = [(dataclasses.replace(r, box=b, mask=m), ru) for (r, ru), b, m in zip(kept, boxes, masks)]
        out = []
        for name in dict.fromkeys(r.cr.class_name for r, _ in kept):
            mine = [k for k in kept if k[0].cr.class_name == name]
            keep = mask_nms(np.stack([r.box for r, _ in mine]), np.array([r.score for r, _ in mine]),
                            np.stack([r.mask for r, _ in mine]), REFINED_NMS_IOU)
            out += [mine[i] for i in keep]
        return out

    def _box(self, row: _Row, runner_up) -> drafting_pb2.DraftBox:
        cr, box, score, probs, step, mask = row.cr, row.box, row.score, row.probs, row.step, row.mask
        found = row.found_as or cr
        g = cr.gate
        tp, best_other, best_bg = (float(v[0]) for v in split_scores(probs[None], np.array([cr.target]),
                                                                        self.head.background_indices))
        others = [c for c in self.real if c != cr.target]
        second = self.head.classes[max(others, key=lambda c: probs[c])] if others else ""
        margin = tp - best_other
        st = found.steps[step]
        det_thr = st.seed_threshold if score >= st.seed_threshold else st.expand_threshold
        slack = {"head margin": margin, "min_prob": tp - g.min_prob, "detector threshold": score - det_thr}
        why = [f"head p={tp:.2f} >= min_prob {g.min_prob:.2f}"]
        if g.margin > 0:
            slack["margin"] = margin - g.margin
            why.append(f"margin {margin:.2f} >= {g.margin:.2f}")
        if g.background.at_final and self.head.background_indices:
            slack["background margin"] = tp - best_bg - g.background.margin
            why.append(f"background margin {tp - best_bg:.2f} >= {g.background.margin:.2f}")
        why.append(f"step {step} {st.prompt!r}: detector score {score:.2f} >= {det_thr:.2f}")
        if row.found_as is not None:
            why.append(f"found by the {row.found_as.class_name} recipe; the head calls it {cr.class_name} and its "
                       "recipe's gate accepts it (look-alike relabelled)")
        if row.lookalike:
            why.append(f"the head calls it {second}, whose recipe does not accept it (look-alike)")
        tightest = min(slack, key=slack.get)
        b = drafting_pb2.DraftBox(
            class_name=cr.class_name, score=score, head_prob=tp, head_probabilities=[float(v) for v in probs],
            recipe_id=found.recipe_id, step_index=step, prompt=st.prompt, margin=margin, second_class=second,
            ambiguous=bool(second) and (margin < self.ambiguity_margin or row.lookalike), uncertainty=float(slack[tightest]),
            reason="; ".join(why) + f" (tightest: {tightest})")
        b.box.x1, b.box.y1, b.box.x2, b.box.y2 = (float(v) for v in box)
        if runner_up:
            b.runner_up_class, b.runner_up_prob = runner_up
        if self.polygons and mask is not None:
            b.polygon.extend(mask_codec.polygon(mask))
        return b
