"""The locator's second look at each peak: a linear model on the frozen map, pooled over a grid
around the peak's box, that moves the box and says how likely it is to be an object's box.

    box_features  N x F float32, F = GRID * GRID * C + 2: the map's C channels averaged over
                  each of the GRID x GRID cells of the box grown CONTEXT times about its centre
                  (row-major, top-left first), then log(width), log(height) of the box in cells
    -> box_deltas  N x 4: (dx, dy) the centre's shift as a share of the box's width / height,
                  (dw, dh) log of the new width / height over the old
       box_quality N: P(the box overlaps an object's box at IoU >= 0.5)

Why: the locator's heatmap finds trees' centres but not their extent (aerial trees: of the
peaks within half a side of a tree's centre, 53 % had a box at IoU 0.5; sizes off by ~22 %),
and its peak scores do not tell a well placed box from a misplaced one. A peak's box is a
question the 3 x 3 convolutions cannot ask: what lies at the box's own edges, at the box's own
scale. Pooling a grid scaled to the box asks it, and a linear model of it is learned from the
user's boxes in seconds: boxes jittered about each object (shift JITTER_SHIFT of a side, size
JITTER_SCALE in log) teach the corrections, those and random boxes of the objects' sizes
teach the quality. Measured on 22 held-out aerial tiles (library level, best-F1 threshold):
the locator's peaks 0.34, refined twice and scored peak x quality 0.44 (settings within 0.03
of each other across grid 3-4, context 1.5-2, 32-64 components, 12-30 copies).

The fitted model is one linear map (PCA, standardisation, ridge and logistic regression folded
together), exported into the locator's ONNX graph as a second input and two outputs
(minehead.locator.export), so the head bundle keeps its files.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.geometry import nms
from minehead.locator.decode import LocatorDetections
from minehead.locator.frame import FeatureFrame

GRID = 3  # cells a side of the pooling grid
CONTEXT = 1.5  # the grid covers the box grown this much about its centre: its edges and beyond
ITERATIONS = 2  # corrections applied one after another (each from the moved box's features)
COMPONENTS = 32  # principal components of the channels kept per grid cell
COPIES = 12  # jittered boxes per object
NEGATIVES = 4  # random boxes (of the objects' sizes) per object
JITTER_SHIFT = 0.15  # sd of a jittered box's centre shift, as a share of the object's side
JITTER_SCALE = 0.25  # sd of its log size change
FIT_MIN_IOU = 0.3  # boxes farther off teach no correction (they belong to no object)
QUALITY_IOU = 0.5  # the overlap the quality output predicts
RIDGE_ALPHA = 10.0
LOGISTIC_C = 0.1
MAX_DELTA = (0.5, 0.7)  # |shift| as a share of the side, |log size change|: one step's limit
MIN_OBJECTS = 8  # fewer labelled objects than this fit no refiner
# Two refined peaks of one class whose boxes now overlap this much found one object: the better
# scored stays (refinement moves neighbouring peaks of one object onto it).
REFINED_NMS_IOU = 0.5


@dataclasses.dataclass
class Refiner:
    """The fitted linear map: out = box_features @ weight + bias (N x 5: 4 deltas, quality logit)."""

    weight: np.ndarray  # F x 5 float32
    bias: np.ndarray  # 5 float32

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    def outputs(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N x F -> (deltas N x 4, quality N), as the ONNX graph computes them."""
        out = np.asarray(features, np.float32) @ self.weight + self.bias
        return out[:, :4], 1.0 / (1.0 + np.exp(-out[:, 4]))


class Pooler:
    """Exact area-weighted means of one map (C x R x Cols) over boxes, in O(C) a box: the map is
    constant on each cell, so its summed-area table is bilinear inside a cell and is read at
    fractional corners exactly. Only the image's cells count (padding is cut off)."""

    def __init__(self, fmap: np.ndarray, frame: FeatureFrame) -> None:
        f = np.ascontiguousarray(np.moveaxis(np.asarray(fmap), 0, -1), dtype=np.float64)  # R x Cols x C
        R, W, C = f.shape
        self.sat = np.zeros((R + 1, W + 1, C), np.float64)
        self.sat[1:, 1:] = np.cumsum(np.cumsum(f, 0), 1)
        self.frame = frame
        self.vw = min(W, frame.image_width / frame.cell_w)  # the image's extent, cells
        self.vh = min(R, frame.image_height / frame.cell_h)

    @property
    def channels(self) -> int:
        return int(self.sat.shape[-1])

    def _at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The table at fractional (y, x) cells (N each) -> N x C."""
        y0 = np.minimum(np.floor(y).astype(np.int64), self.sat.shape[0] - 2)
        x0 = np.minimum(np.floor(x).astype(np.int64), self.sat.shape[1] - 2)
        u, v = (y - y0)[:, None], (x - x0)[:, None]
        s = self.sat
        return ((1 - u) * (1 - v) * s[y0, x0] + (1 - u) * v * s[y0, x0 + 1]
                + u * (1 - v) * s[y0 + 1, x0] + u * v * s[y0 + 1, x0 + 1])

    def pool(self, boxes: np.ndarray) -> np.ndarray:
        """N x 4 XYXY image pixels -> N x C float32 means over the part on the image (a box off
        the image reads the nearest sliver of it)."""
        c = self.frame.to_cells(np.asarray(boxes, np.float64)) if len(boxes) else np.zeros((0, 4))
        eps = 1e-3
        x1 = np.clip(c[:, 0], 0, self.vw - eps)
        y1 = np.clip(c[:, 1], 0, self.vh - eps)
        x2 = np.clip(c[:, 2], x1 + eps, self.vw)
        y2 = np.clip(c[:, 3], y1 + eps, self.vh)
        tot = self._at(y2, x2) - self._at(y1, x2) - self._at(y2, x1) + self._at(y1, x1)
        return (tot / ((x2 - x1) * (y2 - y1))[:, None]).astype(np.float32)


def pooler(fmap: np.ndarray, frame: FeatureFrame) -> Pooler:
    """The pooling side of one map (C x R x Cols) for box_features."""
    return Pooler(fmap, frame)


def box_features(pool: Pooler, frame: FeatureFrame, boxes: np.ndarray) -> np.ndarray:
    """boxes: N x 4 XYXY image pixels -> N x F float32 (see the module's docstring)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(b)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = np.maximum(b[:, 2] - b[:, 0], 1e-3), np.maximum(b[:, 3] - b[:, 1], 1e-3)
    gw, gh = w * CONTEXT / GRID, h * CONTEXT / GRID
    k = np.arange(GRID)
    x0 = (cx - w * CONTEXT / 2)[:, None] + gw[:, None] * k  # N x GRID
    y0 = (cy - h * CONTEXT / 2)[:, None] + gh[:, None] * k
    regions = np.stack([np.broadcast_to(x0[:, None, :], (n, GRID, GRID)),
                        np.broadcast_to(y0[:, :, None], (n, GRID, GRID)),
                        np.broadcast_to((x0 + gw[:, None])[:, None, :], (n, GRID, GRID)),
                        np.broadcast_to((y0 + gh[:, None])[:, :, None], (n, GRID, GRID))], -1).reshape(-1, 4)
    pooled = pool.pool(regions).reshape(n, GRID * GRID * pool.channels)
    sizes = np.log(np.stack([w / frame.cell_w, h / frame.cell_h], 1))
    return np.concatenate([pooled, sizes], 1).astype(np.float32)


def apply_deltas(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    d = np.clip(np.asarray(deltas, np.float64), [-MAX_DELTA[0]] * 2 + [-MAX_DELTA[1]] * 2, [MAX_DELTA[0]] * 2 + [MAX_DELTA[1]] * 2)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = (b[:, 0] + b[:, 2]) / 2 + d[:, 0] * w, (b[:, 1] + b[:, 3]) / 2 + d[:, 1] * h
    w, h = w * np.exp(d[:, 2]), h * np.exp(d[:, 3])
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def deltas_to(boxes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The deltas that take each box to its target box (N x 4 XYXY each) -> N x 4."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    tw, th = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    return np.stack([((targets[:, 0] + targets[:, 2]) - (boxes[:, 0] + boxes[:, 2])) / 2 / w,
                     ((targets[:, 1] + targets[:, 3]) - (boxes[:, 1] + boxes[:, 3])) / 2 / h,
                     np.log(tw / w), np.log(th / h)], 1)


def refine(model, pool: Pooler, frame: FeatureFrame, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """boxes N x 4 XYXY image pixels -> (moved boxes N x 4, clipped to the image; quality N).
    model: a Refiner, or features -> (deltas, quality) (the ONNX part's)."""
    run = model.outputs if isinstance(model, Refiner) else model
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(b):
        return b.astype(np.float32), np.zeros(0, np.float32)
    limit = np.array([frame.image_width, frame.image_height] * 2, np.float64)
    for _ in range(ITERATIONS):
        deltas, _ = run(box_features(pool, frame, b))
        moved = np.clip(apply_deltas(b, deltas), 0, limit)
        ok = (moved[:, 2] - moved[:, 0] >= 1) & (moved[:, 3] - moved[:, 1] >= 1)
        b = np.where(ok[:, None], moved, b)
    _, quality = run(box_features(pool, frame, b))
    return b.astype(np.float32), np.asarray(quality, np.float32)


def refine_detections(d: LocatorDetections, pool: Pooler, frame: FeatureFrame, classes, run) -> LocatorDetections:
    """Decoded peaks -> the same peaks with the boxes of `classes` (class indices) moved and
    scored peak x quality, then NMS per refined class at REFINED_NMS_IOU; best first. run:
    features -> (deltas, quality) (the ONNX part's, or a Refiner's `outputs`)."""
    mine = np.isin(d.class_ids, list(classes))
    if not mine.any():
        return d
    boxes, scores = d.boxes.copy(), d.scores.copy()
    boxes[mine], quality = refine(run, pool, frame, d.boxes[mine])
    scores[mine] = scores[mine] * quality
    keep = np.concatenate([np.flatnonzero(d.class_ids == k)[nms(boxes[d.class_ids == k], scores[d.class_ids == k],
                                                               REFINED_NMS_IOU if k in classes else 1.0)]
                           for k in np.unique(d.class_ids)])
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return LocatorDetections(boxes[keep], scores[keep].astype(np.float32), d.class_ids[keep], d.cells[keep])


def training_boxes(gt: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Boxes to learn from on one image: COPIES jittered boxes per object, then NEGATIVES random
    boxes per object of the objects' sizes (N x 4 XYXY image pixels)."""
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    if not len(gt):
        return np.zeros((0, 4))
    wh = np.stack([gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]], 1)
    c = (gt[:, :2] + gt[:, 2:]) / 2
    cs = np.repeat(c, COPIES, 0) + rng.normal(0, JITTER_SHIFT, (len(gt) * COPIES, 2)) * np.repeat(wh, COPIES, 0)
    ws = np.repeat(wh, COPIES, 0) * np.exp(rng.normal(0, JITTER_SCALE, (len(gt) * COPIES, 2)))
    n = len(gt) * NEGATIVES
    cn = rng.uniform([0, 0], [width, height], (n, 2))
    wn = wh[rng.integers(0, len(gt), n)] * np.exp(rng.normal(0, JITTER_SCALE, (n, 2)))
    out = np.concatenate([np.concatenate([cs - ws / 2, cs + ws / 2], 1), np.concatenate([cn - wn / 2, cn + wn / 2], 1)])
    out = np.clip(out, 0, [width, height, width, height])
    return out[(out[:, 2] - out[:, 0] >= 1) & (out[:, 3] - out[:, 1] >= 1)]


def fit(maps: list[np.ndarray], frames: list[FeatureFrame], boxes: list[np.ndarray], seed: int = 0) -> Refiner | None:
    """Fit on labelled maps: maps C x R x Cols, their frames, their objects' boxes (N x 4 XYXY
    image pixels, every class). None with fewer than MIN_OBJECTS objects."""
    from sklearn.linear_model import LogisticRegression

    from minehead.geometry import iou_matrix

    if sum(len(b) for b in boxes) < MIN_OBJECTS:
        return None
    rng = np.random.default_rng(seed)
    X, D, Q = [], [], []
    for fmap, frame, gt in zip(maps, frames, boxes):
        gt = np.asarray(gt, np.float64).reshape(-1, 4)
        cand = training_boxes(gt, frame.image_width, frame.image_height, rng)
        if not len(cand):
            continue
        iou = iou_matrix(cand, gt)
        X.append(box_features(pooler(fmap, frame), frame, cand))
        D.append(deltas_to(cand, gt[iou.argmax(1)]))
        Q.append(iou.max(1))
    X, D, Q = np.concatenate(X).astype(np.float64), np.concatenate(D), np.concatenate(Q)
    C = (X.shape[1] - 2) // (GRID * GRID)
    cells = X[:, :-2].reshape(-1, C)
    mean_c = cells.mean(0)
    # PCA of the channels, shared by every grid cell (SVD of a sample of the pooled vectors)
    sample = cells[rng.choice(len(cells), min(len(cells), 20000), replace=False)] - mean_c
    k = min(COMPONENTS, C)
    P = np.linalg.svd(sample, full_matrices=False)[2][:k].T  # C x k
    Z = np.concatenate([((X[:, :-2].reshape(len(X), GRID * GRID, C) - mean_c) @ P).reshape(len(X), -1), X[:, -2:]], 1)
    mu, sd = Z.mean(0), Z.std(0) + 1e-6
    Zs = (Z - mu) / sd
    near = Q >= FIT_MIN_IOU
    A = Zs[near]
    W_d = np.linalg.solve(A.T @ A + RIDGE_ALPHA * np.eye(A.shape[1]), A.T @ (D[near] - D[near].mean(0)))
    b_d = D[near].mean(0) - A.mean(0) @ W_d  # ridge with an unpenalised intercept
    positive = Q >= QUALITY_IOU
    if positive.all() or not positive.any():
        return None
    lr = LogisticRegression(C=LOGISTIC_C, max_iter=2000).fit(Zs, positive)
    W = np.concatenate([W_d, lr.coef_.T], 1) / sd[:, None]  # (G*G*k + 2) x 5, on Z
    b = np.concatenate([b_d, lr.intercept_]) - mu / sd @ np.concatenate([W_d, lr.coef_.T], 1)
    # Unfold Z = [(v_g - mean_c) @ P ..., sizes] onto the raw features
    G2 = GRID * GRID
    Wg = W[:-2].reshape(G2, k, 5)
    weight = np.concatenate([np.einsum("ck,gko->gco", P, Wg).reshape(G2 * C, 5), W[-2:]], 0)
    bias = b - np.einsum("c,ck,gko->o", mean_c, P, Wg)
    return Refiner(weight.astype(np.float32), bias.astype(np.float32))
