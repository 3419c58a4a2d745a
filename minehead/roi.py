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
