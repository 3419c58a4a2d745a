"""Large images in overlapping tiles, at the scale the head's objects were labelled at.

    p = plan(W, H, object_px, object_sides)     # tiles XYXY image px, or one tile = the image
    d = merge([(detections_in_tile, tile_box), ...], W, H)

Tile side: the labelled images' typical longest side, median object side in pixels / median
object side as a share of its image (both in the head's meta.json): a tile then shows objects as
large as the training images did. An image up to TILE_ONLY_ABOVE times that side is not cut.
Overlap: the largest labelled object (x 1.1), at least a tenth of the tile and at most half.

Seams: every tile owns a core, the part of it nearer its own centre than any neighbour's (the
middle of each overlap is the border between two cores), and keeps only boxes whose centre lies
in its core. With the overlap at least an object's size, an object whose centre lies in a core
lies wholly inside that core's tile, so an object cut by a seam comes out once, whole, from the
tile that saw all of it. A light NMS (same class, IoU 0.5) cleans what is left. (sahi does sliced
inference and merges by NMS / NMM over every tile's boxes; a core rule needs no merge threshold
and never joins two touching objects, and sahi's model wrappers do not fit a detector that runs
its own ONNX passes, so it is not used.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.geometry import nms
from minehead.locator.decode import LocatorDetections

TILE_ONLY_ABOVE = 1.5
MIN_TILE = 64
MERGE_NMS_IOU = 0.5


@dataclasses.dataclass
class TilePlan:
    tiles: list[tuple[int, int, int, int]]  # XYXY image px
    tile_px: int
    overlap_px: int

    def describe(self) -> dict:
        return {"tiles": len(self.tiles), "tile_px": self.tile_px, "overlap_px": self.overlap_px}


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    n = int(np.ceil((length - tile) / step)) + 1
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]  # evenly spread, overlap >= asked


def plan(width: int, height: int, object_px: list[float] | None, object_sides: list[float] | None) -> TilePlan:
    side = max(width, height)
    whole = TilePlan([(0, 0, width, height)], side, 0)
    if not object_px or not object_sides or object_sides[1] <= 0:
        return whole
    tile = max(MIN_TILE, int(round(object_px[1] / object_sides[1])))
    if side <= TILE_ONLY_ABOVE * tile:
        return whole
    overlap = int(min(tile // 2, max(1.1 * object_px[2], tile / 10)))
    tiles = [(x, y, min(width, x + tile), min(height, y + tile))
             for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]
    return TilePlan(tiles, tile, overlap)


def _cores(tiles: list[tuple[int, int, int, int]], width: int, height: int) -> list[tuple[float, float, float, float]]:
    """Each tile's core: bounded by the middle of its overlap with the neighbouring tiles."""
    xs = sorted({t[0] for t in tiles})
    ys = sorted({t[1] for t in tiles})
    ends_x = {t[0]: t[2] for t in tiles}
    ends_y = {t[1]: t[3] for t in tiles}

    def bounds(starts, ends, limit):
        out = {}
        for i, s in enumerate(starts):
            lo = 0.0 if i == 0 else (ends[starts[i - 1]] + s) / 2
            hi = float(limit) if i == len(starts) - 1 else (ends[s] + starts[i + 1]) / 2
            out[s] = (lo, hi)
        return out

    bx, by = bounds(xs, ends_x, width), bounds(ys, ends_y, height)
    return [(bx[t[0]][0], by[t[1]][0], bx[t[0]][1], by[t[1]][1]) for t in tiles]


def merge(parts: list[tuple[LocatorDetections, tuple[int, int, int, int]]], width: int, height: int) -> LocatorDetections:
    """Per-tile detections (boxes in tile px) -> one image's detections (image px), best first."""
    cores = _cores([t for _, t in parts], width, height)
    keep = [_empty()]  # tiles can all come back empty, or with peaks only in their neighbours' cores
    for (d, (x0, y0, _, _)), (cx0, cy0, cx1, cy1) in zip(parts, cores):
        if not len(d):
            continue
        b = d.boxes + np.array([x0, y0, x0, y0], np.float32)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        # The image's last row and column own their far edge too: a box clipped to it still counts.
        mine = (cx >= cx0) & ((cx < cx1) | (cx1 >= width)) & (cy >= cy0) & ((cy < cy1) | (cy1 >= height))
        keep.append(LocatorDetections(b[mine], d.scores[mine], d.class_ids[mine], d.cells[mine]))
    d = LocatorDetections(*(np.concatenate([getattr(k, f) for k in keep]) for f in ("boxes", "scores", "class_ids", "cells")))
    d.boxes = np.clip(d.boxes, 0, np.array([width, height, width, height], np.float32))
    idx = np.zeros(0, np.int64)
    for k in np.unique(d.class_ids):
        mine = np.flatnonzero(d.class_ids == k)
        idx = np.concatenate([idx, mine[nms(d.boxes[mine], d.scores[mine], MERGE_NMS_IOU)]])
    return d.take(idx[np.argsort(-d.scores[idx], kind="stable")])


def _empty() -> LocatorDetections:
    return LocatorDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                             np.zeros((0, 2), np.int64))
