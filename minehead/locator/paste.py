"""Crowded copies of the labelled images for the locator: other labelled objects pasted beside an
image's own (copy-paste augmentation, Ghiasi et al. 2021, with box crops instead of masks).

Why: users label the first, easiest images of a folder (sparse early frames) and draft the rest
(dense, touching). A locator fitted on sparse images only has seen objects with background around
them; on crowded images its confidence in real objects falls while its false peaks stay where
they were (docs/benchmarks.md, "Drafts under shift"), so no threshold recovers them. Pasting the
user's own objects next to each other shows it dense and touching scenes built from its labels.

How: each copy starts from one labelled image and pastes box crops of objects from the pool (the
labelled images of the same group: held-out images only with each other, so no held-out object
reaches a training map) until the image holds between CROWD_LOW and CROWD_HIGH times as many
objects as the densest labelled image, or no more fit. Most pastes go beside an object already
there (a gap of -5 % .. 15 % of the pasted side: touching, nearly touching), the rest anywhere.
A paste may overlap an earlier box by at most MAX_COVER of the smaller one (so no labelled object
is hidden). The crop takes a margin of MARGIN of its side around the box, faded linearly to the
image underneath so no hard edge marks a pasted object; pixels of the source's other labelled
objects are not carried along (they would be unlabelled objects in the copy). Half the copies
are flipped horizontally.

Arrays: pixels H x W x 3 uint8; boxes N x 4 XYXY in pixels; class ids N int64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from minehead.locator import augment

CROWD_LOW, CROWD_HIGH = 2, 4  # objects per copy, times the densest labelled image's count
MARGIN = 0.15  # of the pasted box's side, faded out
MAX_COVER = 0.1  # largest share of the smaller box a paste may overlap
ADJACENT = 0.7  # share of pastes placed beside an object already in the image
TRIES = 200  # placements tried per copy
PASTE_TO = 24  # auto: copies in all (at most 2 an image)
MAX_PER_IMAGE = 8


def copies_for(n_images: int, per_image: int | None) -> int:
    """How many crowded copies in all: per_image (0 = none, 1..MAX_PER_IMAGE) of every image, or
    for None (auto) two of each image up to PASTE_TO in all (from PASTE_TO images on, one copy of
    PASTE_TO of them): each copy costs one encoder pass."""
    if per_image is not None:
        if not 0 <= per_image <= MAX_PER_IMAGE:
            raise ValueError(f"crowded copies per image must be 0..{MAX_PER_IMAGE}, got {per_image}")
        return per_image * max(n_images, 0)
    return min(2 * max(n_images, 0), PASTE_TO)


@dataclasses.dataclass
class Cutout:
    """One labelled object ready to paste: crop h x w x 3 uint8 (the box and its margin), alpha
    h x w x 1 float32 (1 on the object, fading to 0 over the margin, 0 on the source's other
    objects), box XYXY float32 in crop pixels, class_id."""

    crop: np.ndarray
    alpha: np.ndarray
    box: np.ndarray
    class_id: int


def cutouts(pixels: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray) -> list[Cutout]:
    """Every labelled object of one image as a Cutout."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return [_cutout(pixels, boxes, j, int(class_ids[j])) for j in range(len(boxes))]


def crowd(rng: np.random.Generator, pixels: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray,
          pool: list[Cutout], target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One crowded copy of an image: pool's objects pasted until it holds `target` objects or
    TRIES placements were tried. -> (pixels, boxes, class ids), the image's own objects first."""
    px = pixels.copy()
    kept = [np.asarray(b, np.float32) for b in np.asarray(boxes, np.float32).reshape(-1, 4)]
    ids = [int(c) for c in class_ids]
    H, W = px.shape[:2]
    for _ in range(TRIES if pool else 0):
        if len(kept) >= target:
            break
        cut = pool[rng.integers(len(pool))]
        ch, cw = cut.crop.shape[:2]
        if ch >= H or cw >= W:
            continue
        w, h = cut.box[2] - cut.box[0], cut.box[3] - cut.box[1]
        x0, y0 = _place(rng, kept, w, h, W, H)
        ox, oy = int(round(x0 - cut.box[0])), int(round(y0 - cut.box[1]))
        if ox < 0 or oy < 0 or ox + cw > W or oy + ch > H:
            continue
        new = cut.box + np.array([ox, oy, ox, oy], np.float32)
        if kept and _cover(np.stack(kept), new).max() > MAX_COVER:
            continue
        under = px[oy:oy + ch, ox:ox + cw].astype(np.float32)
        px[oy:oy + ch, ox:ox + cw] = (cut.alpha * cut.crop + (1 - cut.alpha) * under).round().clip(0, 255).astype(np.uint8)
        kept.append(new)
        ids.append(cut.class_id)
    return px, np.asarray(kept, np.float32).reshape(-1, 4), np.asarray(ids, np.int64)


def _cutout(pixels: np.ndarray, boxes: np.ndarray, j: int, class_id: int) -> Cutout:
    x0, y0, x1, y1 = boxes[j]
    mx, my = int(round((x1 - x0) * MARGIN)) + 1, int(round((y1 - y0) * MARGIN)) + 1
    H, W = pixels.shape[:2]
    cx0, cy0 = max(0, int(math.floor(x0)) - mx), max(0, int(math.floor(y0)) - my)
    cx1, cy1 = min(W, int(math.ceil(x1)) + mx), min(H, int(math.ceil(y1)) + my)
    b = np.array([x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0], np.float32)
    yy, xx = np.mgrid[0:cy1 - cy0, 0:cx1 - cx0].astype(np.float32) + 0.5
    dx = np.maximum(np.maximum(b[0] - xx, xx - b[2]), 0) / mx
    dy = np.maximum(np.maximum(b[1] - yy, yy - b[3]), 0) / my
    alpha = np.clip(1 - np.maximum(dx, dy), 0, 1)
    inside = (dx == 0) & (dy == 0)
    for i, o in enumerate(boxes):  # the source's other objects stay behind
        if i != j:
            ox0, oy0, ox1, oy1 = o - np.array([cx0, cy0, cx0, cy0], np.float32)
            alpha[(xx >= ox0) & (xx <= ox1) & (yy >= oy0) & (yy <= oy1) & ~inside] = 0
    return Cutout(np.ascontiguousarray(pixels[cy0:cy1, cx0:cx1]), alpha[..., None], b, class_id)


def _place(rng: np.random.Generator, boxes: list, w: float, h: float, W: int, H: int) -> tuple[float, float]:
    """Top-left corner for a w x h box: beside a random box already there (ADJACENT of the time),
    else anywhere."""
    if not boxes or rng.random() >= ADJACENT:
        return rng.uniform(0, max(W - w, 0)), rng.uniform(0, max(H - h, 0))
    bx0, by0, bx1, by1 = boxes[rng.integers(len(boxes))]
    side, gap = rng.integers(4), rng.uniform(-0.05, 0.15)
    if side == 0:
        return bx1 + gap * w, rng.uniform(by0 - h / 2, by1 - h / 2)
    if side == 1:
        return bx0 - w - gap * w, rng.uniform(by0 - h / 2, by1 - h / 2)
    if side == 2:
        return rng.uniform(bx0 - w / 2, bx1 - w / 2), by1 + gap * h
    return rng.uniform(bx0 - w / 2, bx1 - w / 2), by0 - h - gap * h


def _cover(boxes: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per box: its intersection with new over the smaller of the two areas."""
    iw = np.clip(np.minimum(boxes[:, 2], new[2]) - np.maximum(boxes[:, 0], new[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], new[3]) - np.maximum(boxes[:, 1], new[1]), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return iw * ih / np.maximum(np.minimum(area, (new[2] - new[0]) * (new[3] - new[1])), 1e-6)


def crowded_copies(rng: np.random.Generator, load: Callable[[int], np.ndarray], boxes: list[np.ndarray],
                   class_ids: list[np.ndarray], groups: list, total: int) -> Iterator[tuple]:
    """`total` crowded copies of the labelled images (every image in turn, in an order drawn from
    rng), each pasted from the objects of the images in its own group (groups[i]: any hashable),
    half of them flipped horizontally.

    load(i): image i's pixels (decoded twice: once for the cutouts, once as a base, so that only
    the objects stay in memory). boxes[i], class_ids[i]: its objects. Yields (source index,
    pixels, boxes, class ids) lazily, deterministic for rng's state."""
    n = len(boxes)
    if total <= 0 or not n:
        return
    pools: dict = {}
    for i, g in enumerate(groups):
        if len(boxes[i]):
            pools.setdefault(g, []).extend(cutouts(load(i), boxes[i], class_ids[i]))
    densest = max(1, max(len(b) for b in boxes))
    order = rng.permutation(n)
    bases = sorted(int(order[k % n]) for k in range(total))  # each base decoded once
    pixels, last = None, -1
    for i in bases:
        if i != last:
            pixels, last = load(i), i
        target = int(rng.integers(CROWD_LOW * densest, CROWD_HIGH * densest + 1))
        px, b, c = crowd(rng, pixels, boxes[i], class_ids[i], pools.get(groups[i], []), target)
        if rng.random() < 0.5:
            px, b = augment.apply("hflip", px, b)
        yield i, np.ascontiguousarray(px), np.asarray(b, np.float32), c
