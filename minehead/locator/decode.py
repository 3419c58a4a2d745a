"""Heatmap peaks -> boxes (numpy; what the miner runs per image after one locator pass).

A peak is a cell whose probability is the largest in its 3 x 3 neighbourhood (CenterNet's
max-pool NMS) and at least `floor`; with `separate` (the heads trained since meta.json
locator.peaks), also a cell next to such a peak that the peak's own bump does not explain
(separate_peaks). Its box: centre = cell + offset, width and height = exp(size) cells, mapped to
image pixels through the FeatureFrame.

Why separate: on a 64 x 64 map a cell is ~10 px of a 640 px image, and rod-shaped cells lying
side by side in a microcolony (8-12 px wide) have their centres in adjacent cells, where max-pool
keeps one of each pair. A locator trained on such frames found 48 % of them at its floor with
max-pool and 71 % with separate peaks; its best-threshold F1 0.63 -> 0.77 (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.locator.frame import FeatureFrame

MAX_PEAKS_PER_CLASS = 300
# separate_peaks' tolerance: a cell beside a peak stays when its heat is above SEPARATE_TOL x the
# peak's bump there. Best-threshold F1 on touching rods: 2.0 and 3.0 both 0.77 (3.0: P 0.85 R 0.71,
# 2.0: P 0.81 R 0.73), 1.0 0.74; the higher one adds fewer peaks where nothing is touching.
SEPARATE_TOL = 3.0


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


def sides(log_size: np.ndarray) -> np.ndarray:
    """The size output (log of a side in cells) -> the side in cells, clipped to a sane range."""
    return np.exp(np.clip(log_size, -4, 6))


def separate_peaks(heat: np.ndarray, size: np.ndarray, tol: float = SEPARATE_TOL) -> np.ndarray:
    """K x R x C heat, 2 x R x C size -> bool: the local maxima (local_maxima), and next to them
    the cells that their bump does not explain. A cell that is not a local maximum stays only
    where every higher neighbour is a local maximum q and the cell's heat is above tol x q's heat
    x the Gaussian the targets put at that distance from q's centre (sigma from q's predicted
    size, as minehead.locator.targets builds it). Two small objects whose centres fall in
    adjacent cells (touching rods side by side) both stay; a wide bump's shoulder and slopes
    (a large object) go as with max-pool."""
    from minehead.locator.targets import sigma

    K, R, C = heat.shape
    lm = local_maxima(heat)
    sx, sy = sigma(sides(size[0])), sigma(sides(size[1]))
    pad = lambda a, v: np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], constant_values=v)  # noqa: E731
    ph, plm, psx, psy = pad(heat, -np.inf), pad(lm, False), pad(sx, 1.0), pad(sy, 1.0)
    keep = np.ones_like(heat, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            win = (slice(1 + dy, 1 + dy + R), slice(1 + dx, 1 + dx + C))
            q = ph[(slice(None),) + win]
            g = np.exp(-dx * dx / (2 * psx[win] ** 2) - dy * dy / (2 * psy[win] ** 2))
            keep &= ~((q > heat) & (~plm[(slice(None),) + win] | (heat <= tol * g[None] * q)))
    return lm | keep


def decode(heat: np.ndarray, size: np.ndarray, offset: np.ndarray, frame: FeatureFrame, floor: float,
           max_per_class: int = MAX_PEAKS_PER_CLASS, separate: float | None = None) -> LocatorDetections:
    """heat K x R x C, size 2 x R x C, offset 2 x R x C (one image's locator outputs). separate:
    peaks by separate_peaks with this tol (None: local maxima only)."""
    peaks = local_maxima(heat) if separate is None else separate_peaks(heat, size, separate)
    keep = peaks & (heat >= floor) & frame.valid[None]
    ks, rs, cs = np.nonzero(keep)
    scores = heat[ks, rs, cs]
    if max_per_class and len(scores):
        order = np.lexsort((-scores, ks))
        rank = np.arange(len(order)) - np.searchsorted(ks[order], ks[order])
        sel = order[rank < max_per_class]
        ks, rs, cs, scores = ks[sel], rs[sel], cs[sel], scores[sel]
    cx = cs + offset[0, rs, cs]
    cy = rs + offset[1, rs, cs]
    w, h = sides(size[0, rs, cs]), sides(size[1, rs, cs])
    boxes = frame.to_pixels(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)).astype(np.float32)
    good = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    order = np.argsort(-scores[good], kind="stable")
    return LocatorDetections(boxes[good][order], scores[good][order].astype(np.float32), ks[good][order],
                             np.stack([rs, cs], 1)[good][order])
