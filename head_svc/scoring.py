"""Scoring crops with a head: probabilities -> top-1/top-2, background, decision and reason.

    scores = score_embeddings(bundle, X, target_class=None, thresholds=None)

Numpy in, plain dicts out (one per crop), so the servicer and the miner read the same thing.
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
    rows: list[dict]
    thresholds: Thresholds
    warnings: list[str]
    probabilities: np.ndarray  # N x C


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
    probs = bundle.predict_proba(X)
    n = len(probs)
    bg = bundle.background_indices
    real = np.array([i for i in range(len(classes)) if i not in set(bg)])
    real_p = probs[:, real]
    order = np.argsort(-real_p, axis=1)
    top1 = real[order[:, 0]]
    top2 = real[order[:, 1]] if len(real) > 1 else np.full(n, -1)
    if target_class:
        if target_class not in classes or target_class.startswith("__bg_"):
            raise InvalidArgument(f"target class {target_class!r} is not a real class of head {bundle.head_id} "
                                  f"({', '.join(bundle.real_classes)})")
        target = np.full(n, classes.index(target_class))
    else:
        target = top1
    kr = apply_keep_rule(probs, target, thresholds, bg)
    best_bg = np.array(bg)[probs[:, bg].argmax(1)] if bg else np.full(n, -1)
    rows = []
    for i in range(n):
        p1 = float(probs[i, top1[i]])
        p2 = float(probs[i, top2[i]]) if top2[i] >= 0 else 0.0
        t = int(target[i])
        code = int(kr.decision[i])
        tp, other, bgp = float(kr.target_prob[i]), float(kr.best_other[i]), float(kr.best_background[i])
        reason = {
            KEEP: f"p({classes[t]})={tp:.3f} passes min_prob {thresholds.min_prob:g}",
            REJECT_LOW_PROB: f"p({classes[t]})={tp:.3f} < min_prob {thresholds.min_prob:g}",
            REJECT_MARGIN: f"p({classes[t]})={tp:.3f} - best other {other:.3f} < margin {thresholds.margin:g}",
            REJECT_BACKGROUND: f"p({classes[t]})={tp:.3f} - {classes[best_bg[i]] if bg else 'background'} {bgp:.3f} "
                               f"< background_margin {thresholds.background_margin:g}",
        }[code]
        ambiguous = not target_class and top2[i] >= 0 and p1 - p2 < ambiguity_margin
        rows.append({
            "top1_class": classes[top1[i]], "top1_prob": p1,
            "top2_class": classes[top2[i]] if top2[i] >= 0 else "", "top2_prob": p2,
            "margin": p1 - p2,
            "best_background_class": classes[best_bg[i]] if bg else "", "best_background_prob": bgp,
            "decision": DECISION_NAMES[code], "decision_code": code, "reason": reason,
            "target_class": classes[t], "target_prob": tp,
            "ambiguous": bool(ambiguous),
            "ambiguity": f"unclear between {classes[top1[i]]} and {classes[top2[i]]}" if ambiguous else "",
        })
    return ScoreResult(rows, thresholds, warnings, probs)
