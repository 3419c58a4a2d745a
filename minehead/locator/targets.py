"""Training targets for the locator from boxes (CenterNet, "Objects as Points").

Per class a heatmap with a Gaussian at each object's centre cell (sigma from the object's size in
cells, so big objects get wide bumps and touching small ones stay apart), and at each centre
cell the object's size (log of width and height in cells) and the centre's sub-cell offset.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.locator.frame import FeatureFrame

# Why a size target around the centre: a peak one cell off the centre then reads a trained size
# (held-out F1 on one training image: coins right->left 0.63 -> 1.0, brick left->right 0.36 ->
# 0.85; trees unchanged).
SIGMA_PER_SIDE = 1 / 6  # a Gaussian's sigma, as a share of the object's side (cells)
MIN_SIGMA = 0.5  # cells


def sigma(side):
    """The heatmap Gaussian's sigma (cells) for an object side (cells; a number or an array):
    what the targets put around a centre, and what decode.separate_peaks expects of a peak."""
    return np.maximum(MIN_SIGMA, SIGMA_PER_SIDE * np.asarray(side))


@dataclasses.dataclass
class Targets:
    heat: np.ndarray  # K x R x C float32 in [0, 1]; exactly 1 at object centres
    size: np.ndarray  # 2 x R x C float32: log(width), log(height) in cells, at centres
    offset: np.ndarray  # 2 x R x C float32: centre - cell index - 0 (x, y) in [0, 1), at centres
    centres: np.ndarray  # R x C bool: cells that carry a size and offset target
    # R x C bool: cells on the image (padding excluded from every loss); or K x R x C, per class,
    # for the heatmap loss (minehead.locator.adapt's pseudo-labels teach their own class only)
    valid: np.ndarray
    # R x C bool: cells that carry a size target (the centres, and with size_radius > 0 their
    # neighbours too, so a peak one cell off the centre still reads a trained size); None = centres
    size_mask: np.ndarray | None = None


def build(boxes: np.ndarray, class_ids: np.ndarray, frame: FeatureFrame, n_classes: int,
          size_radius: int = 1) -> Targets:
    """boxes: N x 4 XYXY image pixels; class_ids: N ints in [0, n_classes). size_radius: the
    object's size is also the target at cells within this many cells (Chebyshev) of its centre
    cell and inside the box (a smaller object's size wins where two meet)."""
    R, C = frame.rows, frame.cols
    heat = np.zeros((n_classes, R, C), np.float32)
    size = np.zeros((2, R, C), np.float32)
    offset = np.zeros((2, R, C), np.float32)
    centres = np.zeros((R, C), bool)
    size_mask = np.zeros((R, C), bool)
    centre_sizes = []
    cells = frame.to_cells(boxes)
    ys, xs = np.mgrid[0:R, 0:C].astype(np.float32) + 0.5
    # Larger objects first, so where two share a centre cell the smaller one's size wins: it is
    # the one a wrong size would lose.
    order = np.argsort(-(cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1]), kind="stable")
    for i in order:
        x0, y0, x1, y1 = cells[i]
        w, h = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        c, r = min(int(cx), C - 1), min(int(cy), R - 1)
        sx, sy = sigma(w), sigma(h)
        g = np.exp(-((xs - (c + 0.5)) ** 2) / (2 * sx * sx) - ((ys - (r + 0.5)) ** 2) / (2 * sy * sy))
        k = int(class_ids[i])
        np.maximum(heat[k], g, out=heat[k])
        heat[k, r, c] = 1.0
        if size_radius > 0:
            ra, rb = max(0, r - size_radius, int(y0)), min(R, r + size_radius + 1, int(np.ceil(y1)))
            ca, cb = max(0, c - size_radius, int(x0)), min(C, c + size_radius + 1, int(np.ceil(x1)))
            size[:, ra:rb, ca:cb] = np.log([w, h])[:, None, None]
            size_mask[ra:rb, ca:cb] = True
        size[:, r, c] = np.log([w, h])
        size_mask[r, c] = True
        centre_sizes.append((r, c, np.log([w, h])))
        offset[:, r, c] = [cx - c, cy - r]
        centres[r, c] = True
    for r, c, wh in centre_sizes:  # a centre keeps its own object's size, not a neighbour's
        size[:, r, c] = wh
    return Targets(heat, size, np.clip(offset, 0, 1), centres, frame.valid, size_mask)
