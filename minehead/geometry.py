"""Box geometry for mining: IoU, NMS, one-to-one matching. Boxes are Nx4 XYXY pixels."""

from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """N x M IoU between boxes a (Nx4) and b (Mx4)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS, in descending score order (a box is dropped when its IoU
    with a kept, higher-scoring box exceeds `iou`).

    Greedy NMS commutes with score thresholds (a detection is only ever suppressed by a
    higher-scoring one), so NMS at the floor then filtering equals filtering then NMS.
    Each kept box is compared with the boxes still alive only (no N x N matrix): dense anchors
    keep a few hundred of a few thousand."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    if iou >= 1.0 or len(order) <= 1:
        return order
    b = np.asarray(boxes, np.float64).reshape(-1, 4)[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    rest = np.arange(len(order))
    keep = []
    while len(rest):
        i, rest = rest[0], rest[1:]
        keep.append(i)
        r = b[rest]
        iw = np.clip(np.minimum(b[i, 2], r[:, 2]) - np.maximum(b[i, 0], r[:, 0]), 0, None)
        ih = np.clip(np.minimum(b[i, 3], r[:, 3]) - np.maximum(b[i, 1], r[:, 1]), 0, None)
        inter = iw * ih
        rest = rest[inter / np.maximum(area[i] + area[rest] - inter, 1e-9) <= iou]
    return order[np.array(keep, np.int64)]


def mask_nms(boxes: np.ndarray, scores: np.ndarray, masks: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS by mask overlap: indices kept, best score first. boxes: N x 4 XYXY pixels (the
    masks' boxes); masks: N x H x W bool. A mask is dropped when its IoU with a kept,
    higher-scoring mask exceeds `iou`. Two touching diagonal rods have a high box IoU and almost
    no mask overlap: box NMS drops one of them, this keeps both. Masks lie inside their boxes, so
    only pairs whose boxes overlap are compared, pixel by pixel within the boxes' intersection."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    if iou >= 1.0 or len(order) <= 1:
        return order
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = masks.reshape(len(masks), -1).sum(1)
    box_iou = iou_matrix(b, b)
    keep: list[int] = []
    for i in order:
        drop = False
        for k in keep:
            if box_iou[i, k] <= 0:
                continue
            x0, y0 = int(max(b[i, 0], b[k, 0])), int(max(b[i, 1], b[k, 1]))
            x1, y1 = int(np.ceil(min(b[i, 2], b[k, 2]))), int(np.ceil(min(b[i, 3], b[k, 3])))
            inter = int((masks[i, y0:y1, x0:x1] & masks[k, y0:y1, x0:x1]).sum())
            if inter / max(int(area[i] + area[k]) - inter, 1) > iou:
                drop = True
                break
        if not drop:
            keep.append(int(i))
    return np.array(keep, np.int64)


def match(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one greedy matching by descending score (COCO convention).

    Returns (det_to_gt: N, -1 = false positive; duplicate: N bool, a false positive whose best
    ground truth was already taken by a higher-scoring detection). Like NMS, the result for any
    score threshold is this result restricted to the detections above it."""
    n = len(boxes)
    det_to_gt = np.full(n, -1, np.int64)
    dup = np.zeros(n, bool)
    if n == 0 or len(gt) == 0:
        return det_to_gt, dup
    ious = iou_matrix(boxes, gt)
    taken = np.zeros(len(gt), bool)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        cand = np.where(~taken & (ious[i] >= iou))[0]
        if len(cand):
            j = cand[np.argmax(ious[i, cand])]
            det_to_gt[i] = j
            taken[j] = True
        elif (ious[i] >= iou).any():
            dup[i] = True
    return det_to_gt, dup


def relative_sides(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes N x 4 XYXY pixels in a width x height image -> N longest sides as a share of the
    image's longest side (how big an object is, whatever the image's resolution)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / max(width, height)


def side_summary(sides: np.ndarray) -> list[float]:
    """Relative sides (relative_sides) -> [min, median, max], rounded; [] when there are none."""
    sides = np.asarray(sides, np.float64)
    if not len(sides):
        return []
    return [round(float(x), 5) for x in (sides.min(), np.median(sides), sides.max())]
