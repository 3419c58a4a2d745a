"""Cross-fitting: the head (and its locator) fitted K more times, each without one fold of the
labelled images, so that mining chooses its thresholds and reports its figures on scores of
images the models never saw (miner_svc.mining: HeadBundle.fold_for), while the shipped models are
fitted on every image.

Why: mining tuned thresholds on the scores of the very images the head and locator were fitted
on. Those scores are higher and cleaner than any new image gets, so the chosen thresholds kept
too few boxes on new images and the report overstated them (a coin class reported P 1.00 R 0.88
drafted R 0.08 on new images of the same generator; 12 sparse scenes' thresholds kept 25 of 56
crowded objects where the locator's peaks held 41). Out-of-fold scores are what a new image of
the same kind gets, from a model fitted on a little less data: the standard way to choose an
operating point without a separate labelled set.

    folds = assign_folds(image_classes, k, seed)      # per image: its fold, stratified by class
    heads = fit_fold_heads(p, fit, folds, head, ctx)   # K classifier heads, numpy in and out
(the locator's fold fits run beside its final fit: head_svc.locator_training).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from minehead.core.jobs import JobContext
from minehead.heads.bundle import MAX_FOLDS, MAX_IMAGE_IDS

# Off unless asked: with 2 folds (each fold model fitted on half the images) the drafts lost on
# every set measured (docs/recipes.md, "Cross-fitting"): half-data models score unlike the
# shipped one, so thresholds chosen on their scores do not carry over either.
DEFAULT_FOLDS = 0


@dataclasses.dataclass
class CrossFit:
    """What build_bundle ships: per dataset image its fold (N ints in 0..K-1), the K classifier
    heads, and the K locator graphs (ONNX bytes; empty without a locator)."""

    image_fold: np.ndarray
    heads: list
    locators: list[bytes] = dataclasses.field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.heads)


def assign_folds(image_classes: list[set[int]], k: int, seed: int) -> np.ndarray:
    """Per image its fold (0..k-1), stratified by class: images are dealt rarest class first,
    each to the fold holding the fewest images of that class (then the fewest images), so a
    class in two images has one in each of two folds. Deterministic for a seed."""
    n = len(image_classes)
    rng = np.random.default_rng(seed)
    count = np.zeros(max(k, 1), int)
    per_class: dict[int, np.ndarray] = {}
    freq: dict[int, int] = {}
    for cs in image_classes:
        for c in cs:
            freq[c] = freq.get(c, 0) + 1
    order = rng.permutation(n)
    rarest = [min(cs, key=lambda c: (freq[c], c)) if cs else None for cs in image_classes]
    order = sorted(order, key=lambda i: (freq[rarest[i]] if rarest[i] is not None else n + 1))
    fold = np.full(n, -1)
    for i in order:
        score = count.astype(float) / (n + 1)
        for c in image_classes[i]:
            score += per_class.setdefault(c, np.zeros(k, int))
        f = int(np.argmin(score))
        fold[i] = f
        count[f] += 1
        for c in image_classes[i]:
            per_class[c][f] += 1
    return fold


def folds_for(n_images: int, asked: int) -> int:
    """The fold count to fit: asked (0 = DEFAULT_FOLDS, 1 = none), 0 when there are fewer
    images than folds."""
    k = asked or DEFAULT_FOLDS
    if k in (0, 1):
        return 0
    if not 2 <= k <= MAX_FOLDS:
        raise ValueError(f"cross-fit folds must be 1 (none) or 2..{MAX_FOLDS}, got {asked}")
    return k if k <= n_images <= MAX_IMAGE_IDS else 0


def fit_fold_heads(p, fit: Callable, image_fold: np.ndarray, head, ctx: JobContext) -> list:
    """One classifier head per fold, fitted as the shipped head was on every crop outside the fold
    (hard negatives, group -1, in all), with the shipped head's calibration temperature.
    p: head_svc.training.Prepared; fit: Prepared -> fitted head (the shipped head's variant, its
    metrics quiet: training.fit_variant); head: the shipped head."""
    heads = []
    sample_fold = np.where(p.group >= 0, image_fold[np.maximum(p.group, 0)], -1)
    for f in range(int(image_fold.max()) + 1):
        ctx.check_cancelled()
        part = dataclasses.replace(p, train=sample_fold != f, hold=np.zeros(len(p.y), bool))
        fold_head = fit(part)
        fold_head.temperature_ = head.temperature_
        heads.append(fold_head)
    return heads


def meta_section(fit: CrossFit, image_ids: list[str], onnx_sha256: dict[str, str]) -> dict:
    """meta.json "cross_fit"."""
    return {"folds": fit.k, "image_fold": {h: int(f) for h, f in zip(image_ids, fit.image_fold)},
            "onnx_sha256": onnx_sha256,
            "note": (f"the head{' and locator' if fit.locators else ''} fitted {fit.k} more times, each without one "
                     "fold of the labelled images (stratified by class); mining scores each labelled image with its "
                     "fold's models, so its thresholds and figures come from images the models did not see")}
