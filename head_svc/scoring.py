"""Scoring crops with a head: probabilities -> top-1/top-2, background, decision and reason.

    scores = score_embeddings(bundle, X, target_class=None, thresholds=None)

Numpy in, columns out (one array per field, for the whole batch: `ScoreResult.rows` gives one
dict per crop), so the servicer and the miner read the same thing. Nothing loops over crops in
Python: reasons are built by object-array string concatenation with a lookup table for the
"%.3f" numbers, which was most of the cost of a Score call (~20 µs a crop before).
Auto-class (no target class): the best real class is the target, and the ambiguity guard
flags "unclear between A and B" when top-1 and top-2 are closer than `ambiguity_margin`
instead of silently picking A.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.core.errors import InvalidArgument

from minehead.heads.bundle import HeadBundle
from minehead.heads.keep_rule import (DECISION_NAMES, KEEP, REJECT_BACKGROUND, REJECT_LOW_PROB, REJECT_MARGIN, Thresholds,
                                apply_keep_rule)

DEFAULT_AMBIGUITY_MARGIN = 0.1


@dataclasses.dataclass
class ScoreResult:
    """Per crop columns (length N, numpy), computed for the whole batch at once.

    Class columns hold indices into `classes` (-1 where there is none: top2 of a one-class
    head, best background of a head without background classes). `rows` gives the same as one
    dict per crop, for readers who want that shape.
    """

    classes: list[str]
    thresholds: Thresholds
    warnings: list[str]
    probabilities: np.ndarray  # N x C float32
    top1: np.ndarray
    top2: np.ndarray
    target: np.ndarray
    best_background: np.ndarray
    top1_prob: np.ndarray
    top2_prob: np.ndarray
    target_prob: np.ndarray
    best_other_prob: np.ndarray
    best_background_prob: np.ndarray
    decision: np.ndarray  # keep_rule codes
    ambiguous: np.ndarray  # bool
    reasons: list[str]
    ambiguity: list[str]

    def __len__(self) -> int:
        return len(self.decision)

    @property
    def margin(self) -> np.ndarray:
        return self.top1_prob - self.top2_prob

    @property
    def rows(self) -> list[dict]:
        names = self.classes + [""]  # index -1 reads ""
        return [{"top1_class": names[t1], "top1_prob": p1, "top2_class": names[t2], "top2_prob": p2, "margin": p1 - p2,
                 "best_background_class": names[b], "best_background_prob": bp, "decision": DECISION_NAMES[d],
                 "decision_code": d, "reason": r, "target_class": names[t], "target_prob": tp, "ambiguous": a,
                 "ambiguity": am}
                for t1, p1, t2, p2, b, bp, d, r, t, tp, a, am in zip(
                    self.top1.tolist(), self.top1_prob.tolist(), self.top2.tolist(), self.top2_prob.tolist(),
                    self.best_background.tolist(), self.best_background_prob.tolist(), self.decision.tolist(),
                    self.reasons, self.target.tolist(), self.target_prob.tolist(), self.ambiguous.tolist(), self.ambiguity)]


# "%.3f" of k / 1000 for every k a probability can round to.
_FMT3 = np.array([f"{k / 1000:.3f}" for k in range(1001)], dtype=object)


def format3(x: np.ndarray) -> np.ndarray:
    """Object array of f"{v:.3f}" strings, by table lookup for values in [0, 1]. Values whose
    x * 1000 lies within rounding error of a .5 tie, or outside [0, 1], are formatted by Python
    so every string equals what an f-string gives."""
    x = np.asarray(x, np.float64)
    scaled = x * 1000.0
    k = np.rint(scaled)
    slow = ~((x >= 0.0) & (x <= 1.0)) | (np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-6)
    out = _FMT3[np.where(slow, 0, k).astype(np.int64)]
    for i in np.flatnonzero(slow):
        out[i] = f"{x[i]:.3f}"
    return out


def _reasons(names: np.ndarray, res_target: np.ndarray, decision: np.ndarray, tp: np.ndarray, other: np.ndarray,
             bgp: np.ndarray, bg_names: np.ndarray, t: Thresholds) -> list[str]:
    """The decision in words, built column-wise (object-array string concatenation)."""
    out = np.empty(len(decision), dtype=object)
    if not len(decision):
        return []
    head = "p(" + names[res_target] + ")=" + format3(tp)
    tails = {KEEP: lambda m: head[m] + f" passes min_prob {t.min_prob:g}",
             REJECT_LOW_PROB: lambda m: head[m] + f" < min_prob {t.min_prob:g}",
             REJECT_MARGIN: lambda m: head[m] + " - best other " + format3(other[m]) + f" < margin {t.margin:g}",
             REJECT_BACKGROUND: lambda m: (head[m] + " - " + bg_names[m] + " " + format3(bgp[m])
                                           + f" < background_margin {t.background_margin:g}")}
    for code, build in tails.items():
        m = decision == code
        if m.any():
            out[m] = build(m)
    return out.tolist()


def effective_thresholds(bundle: HeadBundle, min_prob=None, margin=None, background_guard=None,
                         background_margin=None) -> tuple[Thresholds, list[str]]:
    """Request values over the head's defaults; the guard is forced off without __bg_* classes."""
    d = bundle.default_thresholds
    t = Thresholds(min_prob=d.min_prob if min_prob is None else float(min_prob),
                   margin=d.margin if margin is None else float(margin),
                   background_guard=d.background_guard if background_guard is None else bool(background_guard),
                   background_margin=d.background_margin if background_margin is None else float(background_margin))
    warnings = []
    if not bundle.background_indices:
        if t.background_guard:
            warnings.append(f"head {bundle.head_id} has no __bg_* classes: background guard disabled")
        t = dataclasses.replace(t, background_guard=False)
    for name, v in (("min_prob", t.min_prob), ("margin", t.margin), ("background_margin", t.background_margin)):
        if not np.isfinite(v) or not -1.0 <= v <= 1.0:
            raise InvalidArgument(f"threshold {name}={v} must be within [-1, 1]")
    return t, warnings


def score_embeddings(bundle: HeadBundle, X: np.ndarray, target_class: str | None = None,
                     thresholds: Thresholds | None = None, warnings: list[str] | None = None,
                     ambiguity_margin: float = DEFAULT_AMBIGUITY_MARGIN) -> ScoreResult:
    if thresholds is None:
        thresholds, warnings = effective_thresholds(bundle)
    warnings = list(warnings or [])
    classes = bundle.classes
    if target_class and (target_class not in classes or target_class.startswith("__bg_")):
        raise InvalidArgument(f"target class {target_class!r} is not a real class of head {bundle.head_id} "
                              f"({', '.join(bundle.real_classes)})")
    probs = bundle.predict_proba(X)
    n = len(probs)
    rows = np.arange(n)
    bg = bundle.background_indices
    real = np.array([i for i in range(len(classes)) if i not in set(bg)])
    real_p = probs[:, real]
    if len(real) > 1:
        # Two argmax passes instead of a sort; ties go to the lower class index.
        i1 = real_p.argmax(1)
        rest = real_p.copy()
        rest[rows, i1] = -np.inf
        top1, top2 = real[i1], real[rest.argmax(1)]
        top2_prob = probs[rows, top2].astype(np.float64)
    else:
        top1, top2 = np.full(n, real[0]), np.full(n, -1)
        top2_prob = np.zeros(n)
    top1_prob = probs[rows, top1].astype(np.float64)
    target = np.full(n, classes.index(target_class)) if target_class else top1
    kr = apply_keep_rule(probs, target, thresholds, bg)
    best_bg = np.asarray(bg)[probs[:, bg].argmax(1)] if bg else np.full(n, -1)
    names = np.array(classes + ["background"], dtype=object)  # index -1: the reason's word for "none"
    ambiguous = (top2 >= 0) & (top1_prob - top2_prob < ambiguity_margin) if not target_class else np.zeros(n, bool)
    ambiguity = np.full(n, "", dtype=object)
    if ambiguous.any():
        ambiguity[ambiguous] = "unclear between " + names[top1[ambiguous]] + " and " + names[top2[ambiguous]]
    reasons = _reasons(names, target, kr.decision, kr.target_prob, kr.best_other, kr.best_background,
                       names[best_bg], thresholds)
    return ScoreResult(classes=list(classes), thresholds=thresholds, warnings=warnings, probabilities=probs,
                       top1=top1, top2=top2, target=np.asarray(target), best_background=best_bg,
                       top1_prob=top1_prob, top2_prob=top2_prob, target_prob=kr.target_prob,
                       best_other_prob=kr.best_other, best_background_prob=kr.best_background,
                       decision=kr.decision, ambiguous=ambiguous, reasons=reasons, ambiguity=ambiguity.tolist())
