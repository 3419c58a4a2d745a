"""Box detections against ground truth: one-to-one at IoU 0.5 (greedy by score, COCO's rule),
pooled over images, summarised at the threshold with the best F1."""

from __future__ import annotations

import numpy as np

from minehead import geometry


def best_f1(per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], iou: float = 0.5) -> dict:
    """per_image: (boxes N x 4 XYXY, scores N, ground truth M x 4 XYXY), one class. Returns
    {f1, precision, recall, threshold, tp, fp, gt, ap50} at the best-F1 threshold, where ap50 is
    the area under the precision envelope (all-points)."""
    scores, matched, n_gt = [], [], 0
    for boxes, s, gt in per_image:
        d2g, _ = geometry.match(boxes, s, gt, iou)
        scores.append(np.asarray(s, np.float64))
        matched.append(d2g >= 0)
        n_gt += len(gt)
    s = np.concatenate(scores) if scores else np.zeros(0)
    m = np.concatenate(matched) if matched else np.zeros(0, bool)
    if not len(s) or not n_gt:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": 1.0, "tp": 0, "fp": int(len(s)), "gt": n_gt,
                "ap50": 0.0}
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(m[order])
    k = np.arange(1, len(order) + 1)
    p, r = tp / k, tp / n_gt
    f = 2 * p * r / np.maximum(p + r, 1e-12)
    j = int(f.argmax())
    env = np.maximum.accumulate(p[::-1])[::-1]
    ap = float(np.sum(np.diff(np.concatenate([[0.0], r])) * env))
    return {"f1": round(float(f[j]), 4), "precision": round(float(p[j]), 4), "recall": round(float(r[j]), 4),
            "threshold": round(float(s[order][j]), 4), "tp": int(tp[j]), "fp": int(k[j] - tp[j]), "gt": n_gt,
            "ap50": round(ap, 4)}
