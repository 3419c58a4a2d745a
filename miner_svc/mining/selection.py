"""Choosing steps and gates: metrics, the one objective, the vectorised gate sweep, set cover.

Everything here scores candidate recipes with the executor's own output (through the caches,
so it is CPU work after the first pass), which is why mining's metrics and ApplyRecipe's agree.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from minehead.heads.keep_rule import split_scores
from minehead.geometry import match

MIN_PROB_GRID = np.round(np.arange(0.0, 0.96, 0.05), 2)  # 0: the head adds nothing by probability
MARGIN_GRID = np.array([0.0, 0.05, 0.1, 0.2, 0.3])
BG_MARGIN_GRID = np.array([0.0, 0.05, 0.1, 0.2, 0.3])


@dataclasses.dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    dup: int = 0
    gt: int = 0
    top1_bg: int = 0
    checked: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def succession(self) -> float:
        """The rule of succession's precision, (tp + 1) / (tp + fp + 2): how far a precision
        measured on few boxes can be trusted (1 right of 1 reads 2/3)."""
        return (self.tp + 1) / (self.tp + self.fp + 2)

    @property
    def recall(self) -> float:
        return self.tp / self.gt if self.gt else 0.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + (self.gt - self.tp)) if self.tp else 0.0

    @property
    def bg_confusion_rate(self) -> float:
        return self.top1_bg / self.checked if self.checked else 0.0

    def add(self, other: "Counts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return {"precision": round(self.precision, 4), "recall": round(self.recall, 4), "true_positives": self.tp,
                "false_positives": self.fp, "duplicates": self.dup, "ground_truth": self.gt}


def count(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> tuple[Counts, np.ndarray]:
    """Counts for one image, and det_to_gt (N, -1 = false positive)."""
    d2g, dup = match(boxes, scores, gt, iou)
    return Counts(tp=int((d2g >= 0).sum()), fp=int((d2g < 0).sum()), dup=int(dup.sum()), gt=len(gt)), d2g


RULE_TARGET = "target precision on tune, then most matches"
RULE_FALLBACK = "best tune F1 (target unreachable)"


def meets_target(c: Counts, target_precision: float) -> bool:
    """Precision at or above the target, and still there by the rule of succession, (tp + 1) /
    (tp + fp + 2): one right box out of one is not evidence of 0.75 precision. With two labelled
    tree tiles a gate that kept a single right box "met" 0.75 and beat every setting that found
    half the trees (drafts F1 0.00); on tens of boxes the two estimates differ by a hair."""
    return c.tp + c.fp > 0 and c.precision >= target_precision and c.succession >= target_precision


def selection_rule(c: Counts, target_precision: float) -> str:
    """Which branch of `objective` chose a recipe with tune counts c (for the summary)."""
    return RULE_TARGET if meets_target(c, target_precision) else RULE_FALLBACK


def objective(c: Counts, target_precision: float, penalty: float = 0.0, looseness: float = 0.0) -> float:
    """The one score every search maximises.

    Meeting the target precision: 1 + recall, minus a little for false positives, plus a
    little for looser thresholds (looseness in [0, 1]). Missing it: the declared fallback, the
    F1 (< 1 whenever precision < 1), so any recipe that meets the target outranks every one that
    does not, and when no setting reaches the target the search ends at the best F1 rather than
    at the highest precision at any recall (which picked a threshold that found 1 object in 12).
    The background penalty subtracts penalty * bg_confusion_rate (seed brief 002:
    score' = score - lambda * rate)."""
    if c.tp + c.fp == 0:
        score = 0.0
    elif meets_target(c, target_precision):
        score = 1.0 + c.recall - 0.01 * c.fp / (c.tp + c.fp) + 0.001 * looseness
    else:
        score = c.f1
    return score - penalty * c.bg_confusion_rate


def image_level(per_image: list[tuple[np.ndarray, np.ndarray]], iou: float = 0.5) -> dict:
    """Per-class image-level and positive-image metrics as in SAM3's cgF1 evaluation
    (facebookresearch/sam3, sam3/eval/cgf1_eval.py, CGF1Eval), from (predicted boxes, gt boxes)
    per report image, the class's boxes only.

    - Image level: an image is predicted positive when the recipe outputs any box (the recipe's
      output is its operating point, as SAM3's score >= 0.5 cut is); TP/FP/FN/TN against "the
      class is in the image's ground truth". IL_MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)),
      0 when a margin of the table is empty (SAM3 adds 1e-6 to the denominator, which gives 0).
    - Positive micro-F1 (pmF1): boxes matched one-to-one by the assignment that maximises total
      IoU (Hungarian, as SAM3 does), a match counting when its IoU >= `iou`; TP and FN summed over
      images that contain the class, FP summed over images that contain the class and have a
      prediction (false positives on images without the class are scored by IL_MCC instead);
      pmF1 = 2PR / (P + R) with P = TP / (TP + FP), R = TP / (TP + FN). SAM3's headline cgF1
      averages this over IoU 0.5:0.95 (and reports IoU 0.5 too); here it is IoU 0.5 only, the
      threshold every other number of the summary uses.
    - cgF1 = pmF1 x IL_MCC."""
    from scipy.optimize import linear_sum_assignment

    from minehead.geometry import iou_matrix

    il = {"true_positives": 0, "false_positives": 0, "false_negatives": 0, "true_negatives": 0}
    tp = fp = fn = 0
    for pred, gt in per_image:
        has_gt, has_pred = len(gt) > 0, len(pred) > 0
        il[("true_" if has_gt == has_pred else "false_") + ("positives" if has_pred else "negatives")] += 1
        if not has_gt:
            continue
        m = 0
        if has_pred:
            ious = iou_matrix(pred, gt)
            r, c = linear_sum_assignment(-ious)
            m = int((ious[r, c] >= iou).sum())
            fp += len(pred) - m
        tp, fn = tp + m, fn + len(gt) - m
    a, b, c_, d = il["true_positives"], il["false_positives"], il["false_negatives"], il["true_negatives"]
    den = float(a + b) * (a + c_) * (d + b) * (d + c_)
    mcc = (a * d - b * c_) / den ** 0.5 if den > 0 else 0.0
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    pmf1 = 2 * p * r / (p + r) if p + r else 0.0
    return {**il, "il_mcc": mcc, "positive_micro_f1": pmf1, "cg_f1": pmf1 * mcc}


@dataclasses.dataclass(frozen=True)
class GateParams:
    """A head gate found by the sweep: min_prob, margin, background margin."""

    min_prob: float
    margin: float
    background_margin: float


@dataclasses.dataclass
class GateRows:
    """Candidate detections (before the head gate) pooled over images: the sweep's input."""

    target_prob: np.ndarray
    best_other: np.ndarray
    best_bg: np.ndarray
    is_tp: np.ndarray  # matched at the floor gate (approximation: see sweep_gate)
    top1_bg: np.ndarray
    gt: int

    @classmethod
    def from_probs(cls, probs: np.ndarray, target: int, background_indices, is_tp: np.ndarray, gt: int) -> "GateRows":
        t = np.full(len(probs), target)
        tp, bo, bb = split_scores(probs, t, background_indices) if len(probs) else (np.zeros(0),) * 3
        top1_bg = np.isin(probs.argmax(1), background_indices) if len(probs) and background_indices else np.zeros(len(probs), bool)
        return cls(tp, bo, bb, np.asarray(is_tp, bool), top1_bg, gt)


def sweep_gate(rows: GateRows, target_precision: float, veto: bool, penalty: float = 0.0,
               margins=MARGIN_GRID, bg_margins=BG_MARGIN_GRID, min_probs=MIN_PROB_GRID) -> tuple[GateParams | None, Counts]:
    """Best (min_prob, margin, background_margin) by the objective, over the grids (background
    margins only when the background veto is on), vectorised:
    for each (margin, background margin) pair the rows passing both are sorted by target
    probability once, and cumulative sums give TP / FP for every min_prob at once.

    Match status is taken from the ungated candidates (a gated-away true positive does not
    promote a lower duplicate): an approximation the final executor evaluation corrects."""
    bgm = bg_margins if veto else np.array([0.0])
    order = np.argsort(-rows.target_prob, kind="stable")
    tp_sorted = rows.target_prob[order]
    best = (-np.inf, None, None)
    asc = tp_sorted[::-1]
    for m, b in itertools.product(margins, bgm):
        ok = np.ones(len(order), bool)
        if m > 0:
            ok &= (rows.target_prob - rows.best_other)[order] >= m
        if veto:
            ok &= (rows.target_prob - rows.best_bg)[order] >= b
        ctp = np.concatenate([[0], np.cumsum(ok & rows.is_tp[order])])
        cfp = np.concatenate([[0], np.cumsum(ok & ~rows.is_tp[order])])
        cbg = np.concatenate([[0], np.cumsum(ok & rows.top1_bg[order])])
        # rows with target_prob >= p are a prefix of the sorted order
        n_at = len(asc) - np.searchsorted(asc, min_probs, side="left")
        for p, n in zip(min_probs, n_at):
            c = Counts(tp=int(ctp[n]), fp=int(cfp[n]), gt=rows.gt, top1_bg=int(cbg[n]), checked=int(ctp[n] + cfp[n]))
            looseness = 1.0 - (p + m + b) / 3.0
            s = objective(c, target_precision, penalty, looseness)
            if s > best[0]:
                best = (s, GateParams(float(p), float(m), float(b)), c)
    return best[1], best[2]


def sweep_threshold_and_gate(scores: np.ndarray, probs: np.ndarray, is_tp: np.ndarray, target: int, background_indices,
                             gt: int, thresholds, target_precision: float, veto: bool, penalty: float = 0.0
                             ) -> tuple[float, GateParams, Counts] | None:
    """The detector threshold and the head gate chosen together: for each threshold in
    `thresholds`, the gate sweep over the rows scoring at least it; the best by the objective
    (looseness counts the threshold too). Rows (N): detector scores, head probabilities N x C,
    matched or not at the lowest threshold. Greedy matching goes by score, so dropping the rows
    under a threshold leaves the others' matches as they were: one detector run at the floor
    serves every threshold. None when `thresholds` is empty."""
    best = None
    for t in thresholds:
        sel = scores >= t
        rows = GateRows.from_probs(probs[sel], target, background_indices, is_tp[sel], gt)
        params, counts = sweep_gate(rows, target_precision, veto, penalty)
        if not params:
            continue
        looseness = 1.0 - (t + params.min_prob + params.margin + params.background_margin) / 4.0
        score = objective(counts, target_precision, penalty, looseness)
        if best is None or score > best[0]:
            best = (score, float(t), params, counts)
    return best[1:] if best else None


def sweep_gate_loop(rows: GateRows, target_precision: float, veto: bool, penalty: float = 0.0,
                    margins=MARGIN_GRID, bg_margins=BG_MARGIN_GRID, min_probs=MIN_PROB_GRID) -> tuple[GateParams | None, Counts]:
    """The same search as a plain loop over rows (kept for the benchmark and as a check)."""
    bgm = bg_margins if veto else [0.0]
    best = (-np.inf, None, None)
    for m, b in itertools.product(margins, bgm):
        for p in min_probs:
            c = Counts(gt=rows.gt)
            for i in range(len(rows.target_prob)):
                t = rows.target_prob[i]
                if t < p or (m > 0 and t - rows.best_other[i] < m) or (veto and t - rows.best_bg[i] < b):
                    continue
                c.tp += int(rows.is_tp[i])
                c.fp += int(not rows.is_tp[i])
                c.top1_bg += int(rows.top1_bg[i])
            c.checked = c.tp + c.fp
            s = objective(c, target_precision, penalty, 1.0 - (p + m + b) / 3.0)
            if s > best[0]:
                best = (s, GateParams(float(p), float(m), float(b)), c)
    return best[1], best[2]


def threshold_grid(scores: np.ndarray, floor: float, n: int = 8) -> list[float]:
    """Candidate seed thresholds: the floor plus score quantiles above it."""
    s = np.asarray(scores)
    s = s[s >= floor]
    if len(s) == 0:
        return [floor]
    qs = np.quantile(s, np.linspace(0, 0.9, n))
    return sorted({round(float(floor), 4), *(round(float(q), 4) for q in qs)})
