"""Background boxes and the held-out split: the two places randomness enters training.

Arrays: boxes are Nx4 XYXY pixels.
"""

from __future__ import annotations

import math

import numpy as np

from minehead.crops import crop_regions, CropPolicy
from minehead.geometry import iou_matrix


def intersection_over_candidate(cand: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """For one candidate box (4,) and M object boxes (Mx4): |cand ∩ obj| / |cand| per object.

    Not IoU: a small candidate inside a large object scores 1 here (and is rejected), where its
    IoU with the large object would be tiny."""
    if len(objects) == 0:
        return np.zeros(0)
    iw = np.clip(np.minimum(cand[2], objects[:, 2]) - np.maximum(cand[0], objects[:, 0]), 0, None)
    ih = np.clip(np.minimum(cand[3], objects[:, 3]) - np.maximum(cand[1], objects[:, 1]), 0, None)
    return iw * ih / max((cand[2] - cand[0]) * (cand[3] - cand[1]), 1e-9)


def sample_background_boxes(width: int, height: int, objects: np.ndarray, n: int, rng: np.random.Generator, *,
                            min_frac: float = 0.08, max_frac: float = 0.40, padding_ratio: float = 0.08,
                            max_overlap: float = 0.0, tries_per_box: int = 30) -> np.ndarray:
    """Up to n random boxes (sides 8-40 % of the image side) that overlap no padded object."""
    padded = crop_regions(objects, CropPolicy(padding_ratio=padding_ratio, square=False)) if len(objects) else objects
    out = []
    for _ in range(n * tries_per_box):
        if len(out) >= n:
            break
        w = rng.uniform(min_frac, max_frac) * width
        h = rng.uniform(min_frac, max_frac) * height
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        cand = np.array([x1, y1, x1 + w, y1 + h])
        if len(padded) and intersection_over_candidate(cand, padded).max() > max_overlap:
            continue
        out.append(cand)
    return np.array(out, float).reshape(-1, 4)


def sample_misaligned_boxes(width: int, height: int, objects: np.ndarray, n: int, rng: np.random.Generator, *,
                            max_iou: float = 0.3, tries_per_box: int = 30) -> np.ndarray:
    """Up to n boxes at the objects' own scale that match no object (IoU < max_iou with each):
    a pair of neighbours in one box, half an object, an object with its surroundings.

    Background for images the objects fill (a canopy, a wall, a shelf), where no box fits between
    them: these are exactly what a detector proposes wrongly there, as Fast R-CNN's background
    (IoU 0.1-0.5) is. Each is an object's box scaled 0.5-2.5 per side, placed at random."""
    if len(objects) == 0:
        return np.zeros((0, 4))
    sides = np.stack([objects[:, 2] - objects[:, 0], objects[:, 3] - objects[:, 1]], 1)
    out = []
    for _ in range(n * tries_per_box):
        if len(out) >= n:
            break
        w, h = sides[rng.integers(len(sides))] * np.exp(rng.uniform(np.log(0.15), np.log(2.5), 2))
        w, h = min(max(w, 4.0), width), min(max(h, 4.0), height)
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        cand = np.array([x1, y1, x1 + w, y1 + h])
        if iou_matrix(cand, objects).max() >= max_iou:
            continue
        out.append(cand)
    return np.array(out, float).reshape(-1, 4)


def group_split(image_classes: list[set[int]], holdout_fraction: float, rng: np.random.Generator,
                class_names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Split images (groups) into train / held-out, stratified so every class with at least two
    images has images on both sides. Returns (train indices, held-out indices, notes)."""
    n = len(image_classes)
    order = rng.permutation(n)
    side = np.full(n, -1)  # -1 unassigned, 0 train, 1 held-out
    notes = []
    by_class: dict[int, list[int]] = {}
    for i in order:
        for c in image_classes[i]:
            by_class.setdefault(c, []).append(int(i))
    for c in sorted(by_class, key=lambda c: len(by_class[c])):  # rarest first
        imgs = by_class[c]
        if len(imgs) < 2:
            for i in imgs:
                if side[i] == -1:
                    side[i] = 0
            notes.append(f"class {class_names[c]!r} appears in only {len(imgs)} image: all its examples are for "
                         "training, so it has no held-out metrics")
            continue
        want_hold = min(max(1, math.floor(holdout_fraction * len(imgs) + 0.5)), len(imgs) - 1)
        for i in imgs:
            if (side[imgs] == 1).sum() >= want_hold:
                break
            if side[i] == -1:
                side[i] = 1
        if not (side[imgs] == 0).any():
            free = [i for i in imgs if side[i] == -1]
            if free:
                side[free[0]] = 0
            else:
                notes.append(f"class {class_names[c]!r}: every image was needed on the held-out side by rarer classes; "
                             "it has no training examples")
    target = int(round(holdout_fraction * n))
    for i in order:
        if side[i] == -1:
            side[i] = 1 if (side == 1).sum() < target else 0
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1), notes
