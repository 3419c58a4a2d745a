"""A synthetic YOLO dataset for demos and tests: shapes on textured backgrounds.

    make_synthetic_dataset(DIR, images=60, seed=1)

Classes (a look-alike pair by design: red_square and crimson_square differ only in hue):
    red_square      box labels
    crimson_square  box labels, some with a trailing confidence
    blue_circle     polygon labels
    green_triangle  polygon labels
Every image also holds unlabelled clutter (grey and brown blobs, stripes): the background a
head's __bg_* classes should learn, and the false positives a detector will propose.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["red_square", "crimson_square", "blue_circle", "green_triangle"]
COLOURS = {
    "red_square": (214, 44, 38),
    "crimson_square": (170, 28, 78),
    "blue_circle": (44, 84, 212),
    "green_triangle": (46, 168, 64),
}
CLUTTER = [(128, 128, 128), (120, 92, 60), (150, 150, 140)]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    base = rng.integers(90, 190, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = (np.sin(xx / rng.uniform(25, 70) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(25, 70)))[..., None]
    img = base + grad * rng.uniform(10, 30) + rng.normal(0, 14, (h, w, 3))
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(2, 6)):  # texture strokes
        c = tuple(int(v) for v in (base + rng.integers(-40, 40, 3)).clip(0, 255))
        d.line([tuple(rng.integers(0, [w, h])) for _ in range(2)], fill=c, width=int(rng.integers(1, 4)))
    return im


def _jitter(rng, colour, amount=10):
    return tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-amount, amount + 1, 3), 0, 255))


def _place(rng, w, h, size, taken):
    for _ in range(50):
        x1, y1 = int(rng.integers(2, w - size - 2)), int(rng.integers(2, h - size - 2))
        box = (x1, y1, x1 + size, y1 + size)
        if all(box[2] + 4 < t[0] or t[2] + 4 < box[0] or box[3] + 4 < t[1] or t[3] + 4 < box[1] for t in taken):
            taken.append(box)
            return box
    return None


def draw_object(d: ImageDraw.ImageDraw, rng, name: str, box) -> list[tuple[float, float]]:
    """Draw one object; return its outline points (pixels) for a polygon label."""
    x1, y1, x2, y2 = box
    colour = _jitter(rng, COLOURS[name])
    if name.endswith("square"):
        d.rectangle(box, fill=colour)
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if name == "blue_circle":
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 16, endpoint=False)]
    else:
        a0 = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a0 + k * 2 * math.pi / 3), cy + r * math.sin(a0 + k * 2 * math.pi / 3)) for k in range(3)]
    d.polygon(pts, fill=colour)
    return pts


def make_synthetic_dataset(root: Path | str, images: int = 60, seed: int = 1, width: int = 320, height: int = 240,
                           max_objects: int = 4, clutter: int = 2, splits: bool = False) -> Path:
    """Write a YOLO dataset (images/, labels/, labelmap.txt, data.yaml) and return its root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in (("train", "val") if splits else ("",)):
        (root / sub / "images").mkdir(parents=True, exist_ok=True)
        (root / sub / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labelmap.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES)))
    for i in range(images):
        sub = ("val" if i % 4 == 3 else "train") if splits else ""
        im = _background(rng, width, height)
        d = ImageDraw.Draw(im)
        taken: list = []
        lines = []
        for _ in range(int(rng.integers(0, clutter + 1))):
            size = int(rng.integers(20, 60))
            box = _place(rng, width, height, size, taken)
            if box:
                c = _jitter(rng, CLUTTER[int(rng.integers(len(CLUTTER)))], 15)
                (d.ellipse if rng.random() < 0.6 else d.rectangle)((box[0], box[1] + size // 4, box[2], box[3] - size // 4), fill=c)
        # Every class appears regularly: cycle a class per image, plus random extra objects.
        names = [CLASSES[i % len(CLASSES)]] + [CLASSES[int(k)] for k in rng.integers(0, len(CLASSES), int(rng.integers(0, max_objects)))]
        for name in names:
            size = int(rng.integers(30, 72))
            box = _place(rng, width, height, size, taken)
            if box is None:
                continue
            pts = np.array(draw_object(d, rng, name, box))
            cid = CLASSES.index(name)
            if name.endswith("square"):
                cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
                bw, bh = (box[2] - box[0]) / width, (box[3] - box[1]) / height
                conf = f" {rng.uniform(0.5, 1):.3f}" if name == "crimson_square" and rng.random() < 0.5 else ""
                lines.append(f"{cid} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}{conf}")
            else:
                norm = (pts / [width, height]).clip(0, 1)
                lines.append(f"{cid} " + " ".join(f"{v:.6f}" for v in norm.ravel()))
        im = im.filter(ImageFilter.GaussianBlur(0.6))
        stem = f"img_{i:04d}"
        im.save(root / sub / "images" / f"{stem}.jpg", quality=92)
        (root / sub / "labels" / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return root
