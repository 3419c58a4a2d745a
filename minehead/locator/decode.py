"""Heatmap peaks -> boxes (numpy; what the miner runs per image after one locator pass).

A peak is a cell whose probability is the largest in its 3 x 3 neighbourhood (CenterNet's
max-pool NMS) and at least `floor`. Its box: centre = cell + offset, width and height =
exp(size) cells, mapped to image pixels through the FeatureFrame.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.locator.frame import FeatureFrame

MAX_PEAKS_PER_CLASS = 300


@dataclasses.dataclass
class LocatorDetections:
    boxes: np.ndarray  # N x 4 XYXY image pixels, float32
    scores: np.ndarray  # N heatmap peak probabilities, float32
    class_ids: np.ndarray  # N indices into the locator's classes
    cells: np.ndarray  # N x 2 (row, col) of each peak

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, idx) -> "LocatorDetections":
        idx = np.asarray(idx, np.int64)
        return LocatorDetections(self.boxes[idx], self.scores[idx], self.class_ids[idx], self.cells[idx])


def local_maxima(heat: np.ndarray) -> np.ndarray:
    """K x R x C -> bool, True where a cell equals the max of its 3 x 3 neighbourhood."""
    K, R, C = heat.shape
    p = np.full((K, R + 2, C + 2), -np.inf, heat.dtype)
    p[:, 1:-1, 1:-1] = heat
    m = heat.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            np.maximum(m, p[:, dy:dy + R, dx:dx + C], out=m)
    return heat >= m


def decode(heat: np.ndarray, size: np.ndarray, offset: np.ndarray, frame: FeatureFrame, floor: float,
           max_per_class: int = MAX_PEAKS_PER_CLASS) -> LocatorDetections:
    """heat K x R x C, size 2 x R x C, offset 2 x R x C (one image's locator outputs)."""
    keep = local_maxima(heat) & (heat >= floor) & frame.valid[None]
    ks, rs, cs = np.nonzero(keep)
    scores = heat[ks, rs, cs]
    if max_per_class and len(scores):
        order = np.lexsort((-scores, ks))
        rank = np.arange(len(order)) - np.searchsorted(ks[order], ks[order])
        sel = order[rank < max_per_class]
        ks, rs, cs, scores = ks[sel], rs[sel], cs[sel], scores[sel]
    cx = cs + offset[0, rs, cs]
    cy = rs + offset[1, rs, cs]
    w = np.exp(np.clip(size[0, rs, cs], -4, 6))
    h = np.exp(np.clip(size[1, rs, cs], -4, 6))
    boxes = frame.to_pixels(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)).astype(np.float32)
    good = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    order = np.argsort(-scores[good], kind="stable")
    return LocatorDetections(boxes[good][order], scores[good][order].astype(np.float32), ks[good][order],
                             np.stack([rs, cs], 1)[good][order])
