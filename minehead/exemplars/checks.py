"""Exemplar input, checked once at the edge: every problem is an InvalidArgument naming it (the
gRPC status INVALID_ARGUMENT), so a client learns which box is wrong and why.

Boxes are XYXY image pixels (x right, y down, origin top-left) of a width x height image."""

from __future__ import annotations

import math

import numpy as np

from minehead.core.errors import InvalidArgument

DEFAULT_CLASS = "object"
MAX_EXEMPLARS = 256
MIN_SIDE_PX = 2.0  # a box narrower than this holds no object a 64 x 64 map can see


def check_box(box, width: int, height: int, what: str) -> np.ndarray:
    """One box -> float64 (4,), or InvalidArgument naming `what` and the problem."""
    b = np.asarray(box, np.float64).reshape(-1)
    if b.shape != (4,) or not all(math.isfinite(v) for v in b):
        raise InvalidArgument(f"{what}: a box is 4 finite numbers x1,y1,x2,y2 (pixels), got {list(b)}")
    x1, y1, x2, y2 = b
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        raise InvalidArgument(f"{what} ({x1:g},{y1:g},{x2:g},{y2:g}) has zero or negative area: x2 must exceed x1 "
                              "and y2 exceed y1")
    tol = 0.5  # a rounding pixel past the edge is the edge
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise InvalidArgument(f"{what} ({x1:g},{y1:g},{x2:g},{y2:g}) lies outside the {width} x {height} image")
    b = np.clip(b, 0, [width, height, width, height])
    if min(b[2] - b[0], b[3] - b[1]) < MIN_SIDE_PX:
        raise InvalidArgument(f"{what} ({x1:g},{y1:g},{x2:g},{y2:g}) is under {MIN_SIDE_PX:g} px on a side")
    return b


def check_exemplars(boxes, classes, width: int, height: int, negatives=(), known_classes=()) -> tuple[np.ndarray, list[str], np.ndarray]:
    """-> (N x 4 exemplar boxes, N class names, M x 4 negative boxes), clipped to the image.
    classes: one per box ("" = DEFAULT_CLASS). known_classes: when given, the only names allowed."""
    boxes, classes = list(boxes), list(classes)
    if not boxes:
        raise InvalidArgument("no exemplar: draw at least one box around an object to find more like it")
    if len(boxes) > MAX_EXEMPLARS:
        raise InvalidArgument(f"{len(boxes)} exemplars; at most {MAX_EXEMPLARS}")
    if len(classes) != len(boxes):
        raise InvalidArgument(f"{len(boxes)} exemplar boxes but {len(classes)} class names")
    names = [c.strip() or DEFAULT_CLASS for c in classes]
    known = [k for k in known_classes if k]
    if known:
        unknown = sorted({c for c in names if c not in known})
        if unknown:
            raise InvalidArgument(f"unknown class {', '.join(map(repr, unknown))}: the classes are {', '.join(known)}")
    out = np.stack([check_box(b, width, height, f"exemplar {i + 1}") for i, b in enumerate(boxes)])
    negs = [check_box(b, width, height, f"'not this' box {i + 1}") for i, b in enumerate(negatives)]
    return out, names, np.array(negs, np.float64).reshape(-1, 4)
