"""Masks out of the miner: COCO-style RLE and polygons. Masks are H x W bool."""

from __future__ import annotations

import numpy as np


def rle(mask: np.ndarray) -> str:
    """Uncompressed COCO RLE counts (column-major, starting with a run of zeros), space-separated."""
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return ""
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return " ".join(str(c) for c in counts)


def rle_decode(counts: str, height: int, width: int) -> np.ndarray:
    vals = [int(c) for c in counts.split()] if counts else []
    flat = np.zeros(height * width, bool)
    pos, on = 0, False
    for c in vals:
        if on:
            flat[pos:pos + c] = True
        pos += c
        on = not on
    return flat.reshape((height, width), order="F")


def polygon(mask: np.ndarray) -> list[float]:
    """The convex hull of the mask's pixels as flat x1, y1, x2, y2, … in pixels (empty mask: [])."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    # Pixel corners, so a one-pixel mask still has area.
    pts = np.unique(np.concatenate([np.stack([xs, ys], 1), np.stack([xs + 1, ys], 1), np.stack([xs, ys + 1], 1),
                                    np.stack([xs + 1, ys + 1], 1)]), axis=0)
    if len(pts) < 3:
        return pts.astype(float).ravel().tolist()
    from scipy.spatial import ConvexHull

    hull = ConvexHull(pts)
    return pts[hull.vertices].astype(float).ravel().tolist()
