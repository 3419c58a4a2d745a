"""The guided detector's anchors (minisam_guided, steps 1-3): dense boxes over the encoder's
1024 x 1024 input frame, scored by the head through a summed-area table of the feature map,
picked per class for the decoder passes. Plain functions of the head's `predict_proba` and its
real-class columns, so each can be measured on its own.

Frames: anchor boxes are XYXY image pixels; crop regions and pooler windows are XYXY pixels of
the 1024 frame (image pixels x `scale`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from minehead import crops, roi
from minehead.geometry import nms

MIN_SIDE = 32.0  # smallest anchor side, 1024-frame pixels (20 px in a 640-wide image) ...
ANCHOR_MIN_SHARE = 2 ** -0.25  # ... from the size nearest the head's smallest training object (sizes step by sqrt 2)
ANCHOR_MIN_MARGIN = 0.0  # an anchor is a candidate for its best real class when it beats every other class
ANCHOR_NMS_IOU = 0.5
ANCHOR_TOPK = 1500  # per class, before NMS (NMS builds a k x k IoU matrix)
HEAT_SIDE = 32.0  # window side (input px) checked at an anchor's centre, where its point prompt goes
RING_GROWTH = 1.5  # the context ring around an anchor's crop region: 1.5 x its side

Predict = Callable[[np.ndarray], np.ndarray]  # N x D L2-normalised embeddings -> N x C head probabilities


def log_margins(p: np.ndarray) -> np.ndarray:
    """N x C probabilities -> N x C log p(c) - log max_{k != c} p(k) (float64; tiny floor)."""
    lp = np.log(np.maximum(np.asarray(p, np.float64), 1e-38))
    order = np.sort(lp, axis=1)
    best, second = order[:, -1:], order[:, -2:-1]
    return lp - np.where(lp >= best, second, best)


def anchor_boxes(size: tuple[int, int], scale: float, policy: crops.CropPolicy,
                 object_sides: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(anchor boxes N x 4 XYXY image pixels, their crop regions N x 4 XYXY 1024-frame pixels)
    for an image of size (H, W) mapped to the frame by `scale`, regions de-duplicated (a square
    policy maps every aspect ratio to one region). object_sides: the head's training objects'
    [min, median, max] relative sides (HeadBundle.object_sides); sizes below the one nearest the
    smallest are left out."""
    s = scale
    H, W = size
    vw, vh = W * s, H * s
    aspects = [1.0] if policy.square else [1.0, 2.0, 0.5]
    # Why: the head never saw a crop smaller than its smallest object, and scores such crops
    # at random. Measured in crowded scenes: the thin-diamond queue's top 20 anchors were all
    # 20 px crops on other objects' edges, and a centred diamond anchor came 46th.
    smallest = ANCHOR_MIN_SHARE * object_sides[0] * max(vw, vh) if object_sides else 0.0
    out = []
    side = MIN_SIDE
    while side < smallest:
        side *= np.sqrt(2)
    while side <= 1.05 * max(vw, vh):
        step = max(8.0, np.floor(side / 4 / 8) * 8)
        cx = np.arange(step / 2, vw, step)
        cy = np.arange(step / 2, vh, step)
        gx, gy = np.meshgrid(cx, cy)
        for a in aspects:
            bw, bh = side * np.sqrt(a), side / np.sqrt(a)
            out.append(np.stack([gx - bw / 2, gy - bh / 2, gx + bw / 2, gy + bh / 2], -1).reshape(-1, 4))
        side *= np.sqrt(2)
    boxes = np.concatenate(out) / s
    boxes = np.clip(boxes, 0, [W, H, W, H])
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 4) & (boxes[:, 3] - boxes[:, 1] >= 4)]
    regions = crops.crop_regions(boxes, policy) * s
    # Regions that pool the same half-cells score the same: keep one of each.
    _, first = np.unique(np.rint(regions / 8).astype(np.int64), axis=0, return_index=True)
    first = np.sort(first)
    return boxes[first], regions[first]


def anchor_scores(pooler: roi.RoiPooler, regions: np.ndarray, predict: Predict, real: list[int]) -> np.ndarray:
    """N x R anchor scores, R = the head's real classes (columns `real`): margin(class | crop
    region) minus max(0, margin(class | ring around it)); margin = log p(class) - log max p(any
    other class, background included); the ring is the region grown RING_GROWTH times (same
    centre) minus the region itself.

    Why log margins: calibrated heads still give probabilities of exactly 1.0 (float32) to
    most crops near an object, so probabilities cannot rank anchors; the log of the runner-up
    can. Why the ring: a head trained on padded object crops also scores a crop *inside* an
    object (all red) as that object, and inner crops would outscore the aligned one. An
    aligned crop has the class inside and not around it. The ring's mean comes from the same
    summed-area table (outer sum minus inner)."""
    inner, a_in = pooler.sums(regions)
    c = (regions[:, :2] + regions[:, 2:]) / 2
    half = (regions[:, 2:] - regions[:, :2]) / 2 * RING_GROWTH
    ring, a_out = pooler.sums(np.concatenate([c - half, c + half], 1))
    ring -= inner  # outer sum minus inner: the ring's sum (means are not needed: vectors are L2-normalised)
    has_ring = a_out - a_in > 0  # a region covering the whole image has no ring: nothing to compare
    score = _margins(inner, predict, real)
    score[has_ring] -= np.maximum(_margins(ring[has_ring], predict, real), 0.0)
    return score


def _margins(sums: np.ndarray, predict: Predict, real: list[int]) -> np.ndarray:
    """N x D pooled sums (float32, normalised in place) -> N x R real-class log margins."""
    sums /= np.maximum(np.sqrt(np.einsum("ij,ij->i", sums, sums)), 1e-12)[:, None]
    return log_margins(predict(sums))[:, real]


def pick_anchors(boxes: np.ndarray, scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(anchor indices, their real-class column) to refine, in order (scores: N x R from
    anchor_scores): per real class, the anchors whose best class it is with a positive
    score, NMS, best first; classes take turns."""
    top = scores.argmax(1)
    queues = []
    for r in range(scores.shape[1]):
        idx = np.flatnonzero((top == r) & (scores[:, r] > ANCHOR_MIN_MARGIN))
        idx = idx[np.argsort(-scores[idx, r], kind="stable")[:ANCHOR_TOPK]]
        queues.append(list(idx[nms(boxes[idx], scores[idx, r], ANCHOR_NMS_IOU)]))
    order: list[tuple[int, int]] = []
    while any(queues):
        for r, q in enumerate(queues):
            if q:
                order.append((int(q.pop(0)), r))
    # One anchor per object: skip an anchor centred in the central half of an anchor
    # already picked (of any class): the cluster of crops around one object costs nothing,
    # while a neighbour inside a large anchor covering two objects keeps its own.
    if not order:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx = np.array(order, np.int64)
    b = boxes[idx[:, 0]]
    centre, quarter = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 4  # quarter sides: the central half
    picked = np.zeros(min(limit, len(idx)), np.int64)  # rows of idx, a running array (no per-row copies)
    n = 0
    for k in range(len(idx)):
        if n and (np.abs(centre[k] - centre[picked[:n]]) <= quarter[picked[:n]]).all(1).any():
            continue
        picked[n] = k
        n += 1
        if n >= limit:
            break
    return idx[picked[:n], 0], idx[picked[:n], 1]


def centre_margins(pooler: roi.RoiPooler, boxes: np.ndarray, scale: float, cls: np.ndarray, predict: Predict,
                   real: list[int]) -> np.ndarray:
    """Per anchor (XYXY image px) and its real-class column: the class margin of a small
    window (HEAT_SIDE input px) at the anchor's centre, where its point prompt goes.
    Measured too noisy to skip anchors by (it dropped half the circles); it only decides
    whether a too-large mask deserves a box-bounded second pass."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2 * scale
    v = pooler.pool(np.concatenate([c - HEAT_SIDE / 2, c + HEAT_SIDE / 2], 1))
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    m = log_margins(predict(v))[:, real]
    return m[np.arange(len(boxes)), cls]
