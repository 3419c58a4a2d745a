"""The keep rule (design notes section 4): one function, used by scoring, mining, tuning and
inference alike, so a threshold means the same thing everywhere.

For a crop with head probabilities p (length C) and target class t:
  1. p[t] >= min_prob                                   else REJECT_LOW_PROB
  2. margin > 0:  p[t] - max(p[c], c real, c != t) >= margin   else REJECT_MARGIN
     (background classes are not "other" here, so checks 2 and 3 never double-count)
  3. guard on:    p[t] - max(p[bg]) >= background_margin      else REJECT_BACKGROUND
     (margin 0 means "reject if any background class scores higher")
The first failing check names the decision.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KEEP, REJECT_LOW_PROB, REJECT_MARGIN, REJECT_BACKGROUND = 1, 2, 3, 4
DECISION_NAMES = {KEEP: "keep", REJECT_LOW_PROB: "reject_low_prob", REJECT_MARGIN: "reject_margin",
                  REJECT_BACKGROUND: "reject_background"}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    min_prob: float = 0.5
    margin: float = 0.0
    background_guard: bool = True
    background_margin: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class KeepResult:
    """Per crop (N): decision codes, and the numbers they rest on."""

    decision: np.ndarray  # N int: KEEP / REJECT_*
    target_prob: np.ndarray  # N float
    best_other: np.ndarray  # N float: best real class other than the target (0 if none)
    best_background: np.ndarray  # N float (0 for heads without background classes)

    @property
    def keep(self) -> np.ndarray:
        return self.decision == KEEP


def split_scores(probs: np.ndarray, target: np.ndarray, background_indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """probs NxC, target N (class index) -> (p[target], best other real class, best background)."""
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    bg = np.zeros(c, bool)
    bg[list(background_indices)] = True
    rows = np.arange(n)
    tp = probs[rows, target]
    others = np.where(bg[None, :], -np.inf, probs)
    others[rows, target] = -np.inf
    best_other = others.max(axis=1) if c > 1 else np.zeros(n)
    best_other = np.where(np.isfinite(best_other), best_other, 0.0)
    best_bg = probs[:, bg].max(axis=1) if bg.any() else np.zeros(n)
    return tp, best_other, best_bg


def apply_keep_rule(probs: np.ndarray, target: np.ndarray, thresholds: Thresholds, background_indices) -> KeepResult:
    """Vectorised over N crops. A head without background classes never rejects as background."""
    target = np.asarray(target, dtype=np.int64)
    tp, best_other, best_bg = split_scores(probs, target, background_indices)
    decision = np.full(len(tp), KEEP, np.int64)
    guard = thresholds.background_guard and len(background_indices) > 0
    if guard:
        decision[tp - best_bg < thresholds.background_margin] = REJECT_BACKGROUND
    if thresholds.margin > 0:
        decision[tp - best_other < thresholds.margin] = REJECT_MARGIN
    decision[tp < thresholds.min_prob] = REJECT_LOW_PROB  # applied last: the first check wins
    return KeepResult(decision, tp, best_other, best_bg)
