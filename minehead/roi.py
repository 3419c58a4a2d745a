"""Pooling box regions out of an encoder feature map (for `crop_mode == "roi"` encoders).

A feature map of C x h x w covers the encoder's S x S input at stride S/h. A region's
embedding is the area-weighted mean of the cells it covers (fractional coverage at the edges,
so a box smaller than one cell still gets that cell), restricted to the part of the input that
holds image pixels (longest-side resizing pads the rest).
"""

from __future__ import annotations

import numpy as np


def _coverage(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """Overlap of [lo, hi) with each unit cell [j, j+1), j < n: returns N x n."""
    j = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(hi[:, None], j + 1) - np.maximum(lo[:, None], j), 0.0, None)


def pool_regions(fmap: np.ndarray, regions: np.ndarray, stride: float, valid_hw: tuple[float, float]) -> np.ndarray:
    """fmap: C x h x w. regions: N x 4 XYXY in input pixels. valid_hw: (height, width) of the
    image inside the input, in input pixels. Returns N x C float32."""
    C, h, w = fmap.shape
    r = np.asarray(regions, dtype=np.float64).reshape(-1, 4) / stride
    vh, vw = valid_hw[0] / stride, valid_hw[1] / stride
    x1 = np.clip(r[:, 0], 0, vw)
    x2 = np.clip(r[:, 2], 0, vw)
    y1 = np.clip(r[:, 1], 0, vh)
    y2 = np.clip(r[:, 3], 0, vh)
    wx = _coverage(x1, x2, w)  # N x w
    wy = _coverage(y1, y2, h)  # N x h
    # A region squeezed to zero width by clipping still pools the cell it touches.
    empty_x = wx.sum(1) <= 0
    if empty_x.any():
        wx[empty_x, np.clip(np.floor(x1[empty_x]).astype(int), 0, w - 1)] = 1.0
    empty_y = wy.sum(1) <= 0
    if empty_y.any():
        wy[empty_y, np.clip(np.floor(y1[empty_y]).astype(int), 0, h - 1)] = 1.0
    f = fmap.astype(np.float32, copy=False)
    # sum_y sum_x wy[n,y] wx[n,x] f[c,y,x] / (sum wy * sum wx)
    tmp = np.einsum("nh,chw->ncw", wy.astype(np.float32), f, optimize=True)
    out = np.einsum("ncw,nw->nc", tmp, wx.astype(np.float32), optimize=True)
    return out / (wy.sum(1) * wx.sum(1))[:, None].astype(np.float32)



class RoiPooler:
    """Pooling for many regions of one feature map, through a summed-area table built once.

    The table is built on a grid `sub` times finer than the cells (each cell split into sub x
    sub equal parts: the same piecewise-constant map), so a region whose edges lie on that
    finer grid costs four table lookups, O(C), whatever its size: dense anchor scoring pools
    ~10^4-10^5 such regions an image in tens of milliseconds. Edges are rounded to the finer
    grid (at most half a sub-cell, 4 input px at sub=2 for a stride-16 map), so the vectors are
    close to, not equal to, `pool_regions`: good for ranking anchors; scores that matter are
    recomputed with `pool_regions`.
    """

    def __init__(self, fmap: np.ndarray, stride: float, valid_hw: tuple[float, float], sub: int = 2) -> None:
        C, h, w = fmap.shape
        f = np.moveaxis(fmap.astype(np.float32, copy=False), 0, -1)  # h x w x C
        if sub > 1:
            f = np.repeat(np.repeat(f, sub, 0), sub, 1)
        self.sub, self.h, self.w = sub, h * sub, w * sub
        self.unit = float(stride) / sub  # input pixels per fine cell
        # Valid (image) area in fine cells, rounded down: padding never enters a mean.
        self.vh = max(1, int(np.floor(valid_hw[0] / self.unit + 1e-6)))
        self.vw = max(1, int(np.floor(valid_hw[1] / self.unit + 1e-6)))
        sat = np.zeros((self.h + 1, self.w + 1, C), np.float64)  # sat[y, x] = sum over [0, y) x [0, x)
        sat[1:, 1:] = np.cumsum(np.cumsum(f, 0, dtype=np.float64), 1)
        self.sat = sat.astype(np.float32)

    def sums(self, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """regions: N x 4 XYXY in input pixels -> (N x C sums over the fine cells they cover,
        N areas in fine cells). Sums of nested regions subtract: a ring is outer minus inner."""
        r = np.rint(np.asarray(regions, dtype=np.float64).reshape(-1, 4) / self.unit).astype(np.int64)
        x1, x2 = np.clip(r[:, 0], 0, self.vw - 1), np.clip(r[:, 2], 1, self.vw)
        y1, y2 = np.clip(r[:, 1], 0, self.vh - 1), np.clip(r[:, 3], 1, self.vh)
        x2, y2 = np.maximum(x2, x1 + 1), np.maximum(y2, y1 + 1)  # at least one fine cell
        s = self.sat
        return s[y2, x2] - s[y1, x2] - s[y2, x1] + s[y1, x1], ((x2 - x1) * (y2 - y1)).astype(np.float32)

    def pool(self, regions: np.ndarray) -> np.ndarray:
        """regions: N x 4 XYXY in input pixels -> N x C float32 means (not normalised)."""
        tot, area = self.sums(regions)
        return tot / area[:, None]
