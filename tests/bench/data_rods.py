"""Synthetic phase-contrast frames of rod-shaped cells: the bench's analogue of a bacterial
time-lapse (issue 34), where a user labels the sparse early frames and drafts the crowded later
ones.

    pixels, boxes = rod_frame(rng, n=(2, 6))              # an early frame: a few separate cells
    pixels, boxes = rod_frame(rng, n=(12, 18), colony=True)  # a later one: microcolonies

A cell is a capsule (a rod with round ends) 26-56 px long and 8-12 px wide at any angle, dark
with a bright halo on a grey, uneven, noisy field, slightly blurred. In a colony the cells lie
side by side, nearly parallel (within 15 degrees of the colony's axis), 0-2 px apart, as
dividing cells do: their axis-aligned boxes overlap heavily when the colony is diagonal (two
touching rods at 45 degrees: box IoU ~0.5-0.6), so box-overlap suppression and peaks one cell
apart are what a crowded frame tests. Boxes: the capsule's extent, N x 4 XYXY pixels; one class.
"""

from __future__ import annotations

import numpy as np

CLASS = "cell"


def _capsule(xx: np.ndarray, yy: np.ndarray, c: np.ndarray, angle: float, length: float, width: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of every pixel (grids xx, yy) to a capsule: centre c (x, y)."""
    u = np.array([np.cos(angle), np.sin(angle)], np.float32)
    dx, dy = xx - c[0], yy - c[1]
    t = np.clip(dx * u[0] + dy * u[1], -(length - width) / 2, (length - width) / 2)
    return np.hypot(dx - t * u[0], dy - t * u[1]) - width / 2


def _box(c: np.ndarray, angle: float, length: float, width: float) -> np.ndarray:
    half = (length - width) / 2
    ex, ey = abs(np.cos(angle)) * half + width / 2, abs(np.sin(angle)) * half + width / 2
    return np.array([c[0] - ex, c[1] - ey, c[0] + ex, c[1] + ey], np.float32)


def rod_frame(rng: np.random.Generator, w: int = 640, h: int = 480, n: tuple[int, int] = (2, 6),
              colony: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One frame -> (pixels H x W x 3 uint8, boxes N x 4 XYXY float32)."""
    from PIL import Image, ImageFilter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = (rng.uniform(110, 150) + 12 * np.sin(xx / rng.uniform(80, 200) + rng.uniform(0, 6))
             * np.cos(yy / rng.uniform(80, 200)))
    img = field
    occupied = np.zeros((h, w), bool)
    boxes = []
    want = int(rng.integers(*n))
    axis = rng.uniform(0, np.pi)
    members: list = []  # the current colony's cells: (centre, width)
    misses = 0
    for _ in range(want * 60):
        if len(boxes) >= want:
            break
        length, width = rng.uniform(26, 56), rng.uniform(8, 12)
        if colony and members and misses < 30:
            # beside one of the colony's cells, nearly parallel, 0-2 px apart
            ca, cw = members[int(rng.integers(len(members)))]
            ang = axis + rng.uniform(-0.26, 0.26)
            normal = np.array([-np.sin(axis), np.cos(axis)], np.float32) * rng.choice([-1, 1])
            along = np.array([np.cos(axis), np.sin(axis)], np.float32)
            c = ca + normal * ((cw + width) / 2 + rng.uniform(0, 2)) + along * rng.uniform(-0.4, 0.4) * length
        else:
            axis = rng.uniform(0, np.pi)
            ang, members = axis, []  # a new colony (or, in a sparse frame, a lone cell)
            c = np.array([rng.uniform(30, w - 30), rng.uniform(30, h - 30)], np.float32)
        b = _box(c, ang, length, width)
        dist = None if b[0] < 2 or b[1] < 2 or b[2] > w - 2 or b[3] > h - 2 else _capsule(xx, yy, c, ang, length, width)
        if dist is None or (occupied & (dist < 1.0)).any():
            misses += 1
            continue
        misses = 0
        occupied |= dist < 0
        # phase contrast: a dark body, a bright halo just outside it
        body = rng.uniform(45, 70)
        img = np.where(dist < 0, body + 8 * np.tanh(-dist / 3), img)
        img = img + 40 * np.exp(-((dist - 2.0) ** 2) / 3.0) * (dist >= 0)
        boxes.append(b)
        members.append((c, width))
    img = img + rng.normal(0, 6, img.shape)
    px = np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    px = np.asarray(Image.fromarray(px).filter(ImageFilter.GaussianBlur(0.8)))
    return px, np.array(boxes, np.float32).reshape(-1, 4)
