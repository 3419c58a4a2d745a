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


def _cells(pixels: np.ndarray, step: int) -> np.ndarray:
    """HxWx3 -> ceil(H/step) x ceil(W/step) x 3 float: mean colour per step x step cell."""
    f = pixels.astype(np.float32)
    H, W = f.shape[:2]
    h, w = -(-H // step), -(-W // step)
    return np.pad(f, ((0, h * step - H), (0, w * step - W), (0, 0)), mode="edge").reshape(h, step, w, step, 3).mean((1, 3))


def _window_sums(sat: np.ndarray, k: tuple[int, int]) -> np.ndarray:
    """Sum over the k = (kw, kh) window centred on each cell (clipped at the border), from a
    summed-area table sat of shape (h+1) x (w+1) x C. Returns h x w x C."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    yy, xx = np.arange(h), np.arange(w)
    y1, y2 = np.clip(yy - k[1] // 2, 0, h), np.clip(yy - k[1] // 2 + k[1], 0, h)
    x1, x2 = np.clip(xx - k[0] // 2, 0, w), np.clip(xx - k[0] // 2 + k[0], 0, w)
    return sat[y2][:, x2] - sat[y1][:, x2] - sat[y2][:, x1] + sat[y1][:, x1]


def thing_maps(pixels: np.ndarray, sizes, exclude: np.ndarray | None = None, step: int = 4) -> list[np.ndarray]:
    """Per window size (width, height) pixels in `sizes`: how much a window of that size centred
    on each step x step cell differs in colour from the ring around it (twice its size): L1
    over RGB of the two means, leaving out the cells of the `exclude` boxes (Nx4 XYXY pixels:
    the labelled objects, which would otherwise make their own surroundings look like things).
    Each map is ceil(H/step) x ceil(W/step) float, 0 where a window holds no cell to compare.
    High where a thing of about that size sits on a background; low on flat ground, noise
    (means cancel it) and thin strokes. The cells and their summed-area table are built once
    for all sizes."""
    f = _cells(pixels, step)
    h, w = f.shape[:2]
    keep = np.ones((h, w, 1), np.float64)
    for x1, y1, x2, y2 in np.asarray(exclude if exclude is not None else [], float).reshape(-1, 4) / step:
        keep[max(int(y1), 0):max(int(np.ceil(y2)), 0), max(int(x1), 0):max(int(np.ceil(x2)), 0)] = 0
    sat = np.zeros((h + 1, w + 1, 4), np.float64)
    sat[1:, 1:] = np.concatenate([f * keep, keep], 2).cumsum(0).cumsum(1)
    maps = []
    for size in sizes:
        k = np.maximum(1, np.round(np.asarray(size, float) / step).astype(int))
        inner = _window_sums(sat, tuple(k))
        ring = _window_sums(sat, tuple(2 * k)) - inner
        ok = (inner[..., 3] > 0) & (ring[..., 3] > 0) & (keep[..., 0] > 0)
        diff = np.abs(inner[..., :3] / np.maximum(inner[..., 3:], 1e-9) - ring[..., :3] / np.maximum(ring[..., 3:], 1e-9)).sum(2)
        maps.append(np.where(ok, diff, 0.0))
    return maps


def sample_thing_boxes(pixels: np.ndarray, objects: np.ndarray, n: int, rng: np.random.Generator, *,
                       padding_ratio: float = 0.08, tries_per_box: int = 30) -> np.ndarray:
    """Up to n boxes at the labelled objects' own sizes, centred on unlabelled things (colour
    contrast with their surroundings, `thing_maps`), overlapping no padded object (intersection
    over the candidate, as above).

    Why: random boxes of 8-40 % of the side teach a head what empty background looks like, but
    not an unlabelled *thing* at object scale (a grey blob on a green field, a sign beside the
    cars), and those are what a detector proposes: a head that never saw one calls it the class
    whose colour or shape it shares, with certainty. Centres are drawn with probability
    proportional to the squared contrast, so the most distinct things come first."""
    if len(objects) == 0 or n <= 0:
        return np.zeros((0, 4))
    H, W = pixels.shape[:2]
    sides = np.stack([objects[:, 2] - objects[:, 0], objects[:, 3] - objects[:, 1]], 1)
    padded = crop_regions(objects, CropPolicy(padding_ratio=padding_ratio, square=False))
    med = np.median(sides, 0)
    step = int(np.clip(round(float(med.min()) / 10), 2, 32))  # cells of a tenth of an object: cheap, fine enough
    # Two window sizes, as a thing smaller than the objects (a blob beside the cars) is diluted
    # in an object-sized window; each map relative to its own median, so a background's slow
    # shading (strong at the larger size) does not outrank a small blob's sharp contrast.
    maps = thing_maps(pixels, [med, med * 0.5], padded, step)
    c = np.maximum(*[m / max(float(np.median(m[m > 0])) if (m > 0).any() else 1.0, 1e-6) for m in maps])
    p = c.ravel().astype(np.float64) ** 2
    if not np.isfinite(p).all() or p.sum() <= 0:
        return np.zeros((0, 4))
    p /= p.sum()
    h, w = c.shape
    out = []
    for cell in rng.choice(len(p), size=n * tries_per_box, p=p):
        if len(out) >= n:
            break
        cy, cx = (np.array(divmod(int(cell), w)) + 0.5) * step
        bw, bh = sides[rng.integers(len(sides))] * np.exp(rng.uniform(np.log(0.8), np.log(1.25), 2))
        bw, bh = min(bw, W), min(bh, H)
        bx1, by1 = float(np.clip(cx - bw / 2, 0, W - bw)), float(np.clip(cy - bh / 2, 0, H - bh))
        cand = np.array([bx1, by1, bx1 + bw, by1 + bh])
        if intersection_over_candidate(cand, padded).max() > 0:
            continue
        if out and iou_matrix(cand, np.array(out)).max() > 0.3:
            continue  # one box per thing, not the same blob thrice
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
