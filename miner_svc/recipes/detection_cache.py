"""Run each (image, prompt) once at a floor threshold and keep the raw output on disk.

Key: image sha256 + detector model + prompt (or exemplar boxes) + floor. Every threshold at or
above the floor is then a CPU filter of cached rows; thresholds below the floor are refused
rather than extrapolated. Masks are stored bit-packed in a numeric .npz (never pickles).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from minehead.core.errors import InvalidArgument
from minehead.core.images import DecodedImage
from minehead.core.npz import load_arrays

from miner_svc.detectors.base import Detections, Detector, ImageState

# The floor: the lowest detector score kept from the one run per (image, prompt), unless a
# mining job names another (MiningSpec.floor_threshold). Thresholds below it are refused.
DEFAULT_FLOOR = 0.05


@dataclasses.dataclass(frozen=True)
class FloorRun:
    """One detector run at the floor, as the cache keeps it (memory, disk, Ray's object store).

    boxes: N x 4 float32 XYXY image pixels. scores: N float32. masks: N x ceil(h*w/8) uint8, the
    H x W bool masks bit-packed row-major (8x fewer bytes). shape: (N, h, w)."""

    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def pack(cls, d: Detections, h: int, w: int) -> "FloorRun":
        """A detector without masks (the locator's peaks) keeps N x 0 masks: nothing at the image
        size is allocated for it (a tiled orthomosaic has thousands of peaks; N x H x W zeros
        were 26 GiB for one)."""
        if d.masks is None:
            return cls(d.boxes.astype(np.float32), d.scores.astype(np.float32), np.zeros((len(d), 0), np.uint8),
                       (len(d), h, w))
        return cls(d.boxes.astype(np.float32), d.scores.astype(np.float32),
                   np.packbits(d.masks.reshape(len(d), h * w), axis=1), (len(d), h, w))

    def detections(self, masks: bool) -> Detections:
        """Boxes and scores; the masks unpacked only when asked for."""
        n, h, w = self.shape
        mk = None
        if masks and not (n and self.masks.shape[1] == 0):  # N x 0: the detector made no masks
            mk = np.unpackbits(self.masks, axis=1, count=h * w).reshape(n, h, w).astype(bool) if n else np.zeros((0, h, w), bool)
        return Detections(self.boxes, self.scores, mk)


class CachedDetector:
    def __init__(self, detector: Detector, cache_dir: Path, floor: float = DEFAULT_FLOOR, persist: bool = True) -> None:
        """cache_dir: the miner's detection cache (one folder per detector under it).
        persist=False keeps new runs in memory only (drafting: new images are seen once, so
        writing their raw output to disk buys nothing); the disk is still read."""
        self.detector = detector
        self.info = detector.info
        self.counters = detector.counters
        self.floor = floor
        self.cache_dir = Path(cache_dir)
        self.dir = self.cache_dir / hashlib.sha256(detector.cache_key.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.persist = persist
        self._mem: dict[Path, FloorRun] = {}
        self._by_image: dict[str, list[Path]] = {}

    def set_image(self, image: DecodedImage) -> ImageState:
        return self.detector.set_image(image)

    def _text_key(self, prompt: str) -> str:
        # A class-agnostic detector answers every prompt alike: one run an image, whichever
        # classes a job mines (mining green_triangle, then blue_circle + green_triangle, with
        # minisam-auto on 40 scenes ran its proposals twice: ~200 s each).
        return "text:" if self.info.class_agnostic else f"text:{prompt}"

    def _path(self, sha: str, what: str) -> Path:
        key = hashlib.sha256(f"{sha}|{what}|{self.floor:.6g}".encode()).hexdigest()
        return self.dir / key[:2] / f"{key}.npz"

    def _cached(self, path: Path, state: ImageState, run, masks: bool) -> Detections:
        """Boxes and scores from memory or disk (running the detector once if neither has them);
        masks are kept bit-packed and unpacked only when asked for."""
        rec = self._mem.get(path)
        if rec is None and path.is_file():
            boxes, scores, packed, shape = load_arrays(path, "boxes", "scores", "masks", "shape")
            rec = FloorRun(boxes, scores, packed, tuple(int(v) for v in shape))
        if rec is None:
            self.misses += 1
            rec = FloorRun.pack(run(), state.image.height, state.image.width)
            self._write(path, rec)
        else:
            self.hits += 1
        self._remember(path, state.image.sha256, rec)
        return rec.detections(masks)

    def _write(self, path: Path, rec: FloorRun) -> None:
        if self.persist:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, boxes=rec.boxes, scores=rec.scores, masks=rec.masks, shape=np.array(rec.shape))
            os.replace(tmp, path)

    def has_text(self, image_sha256: str, prompt: str) -> bool:
        """Whether a text prompt's floor run for the image is already in memory or on disk."""
        path = self._path(image_sha256, self._text_key(prompt))
        return path in self._mem or path.is_file()

    def put_text(self, state: ImageState, prompt: str, rec: FloorRun) -> None:
        """Store a floor run made elsewhere (a Ray worker, `miner_svc.scale`) as if this
        detector had made it: `rec` is the same detector's run at this floor. Counted as a
        miss, as the run it stands for would have been (a hit when it is already here: a
        class-agnostic detector's one run for every prompt, as in process)."""
        path = self._path(state.image.sha256, self._text_key(prompt))
        if path in self._mem:
            self.hits += 1
            return
        self.misses += 1
        self._write(path, rec)
        self._remember(path, state.image.sha256, rec)

    def _remember(self, path: Path, image_sha256: str, rec: FloorRun) -> None:
        if len(self._mem) > 20_000:  # a bound, not an LRU: a long job refills it from disk
            self._mem.clear()
            self._by_image.clear()
        if path not in self._mem:
            self._by_image.setdefault(image_sha256, []).append(path)
        self._mem[path] = rec

    def forget(self, image_sha256: str) -> None:
        """Drop one image's rows from memory (drafting is done with it)."""
        for p in self._by_image.pop(image_sha256, []):
            self._mem.pop(p, None)

    def text(self, state: ImageState, prompt: str, threshold: float | None = None, masks: bool = False) -> Detections:
        """Detections for a text prompt with score >= threshold (default: the floor)."""
        threshold = self._check(threshold)
        d = self._cached(self._path(state.image.sha256, self._text_key(prompt)), state,
                         lambda: self.detector.predict_text(state, prompt, self.floor), masks)
        return d.above(threshold)

    def exemplars(self, state: ImageState, boxes: np.ndarray, threshold: float | None = None, masks: bool = False) -> Detections:
        threshold = self._check(threshold)
        b = np.round(np.asarray(boxes, np.float64).reshape(-1, 4), 1)
        d = self._cached(self._path(state.image.sha256, "boxes:" + ",".join(f"{v:g}" for v in b.ravel())), state,
                         lambda: self.detector.predict_exemplars(state, b, self.floor), masks)
        return d.above(threshold)

    def _check(self, threshold: float | None) -> float:
        if threshold is None:
            return self.floor
        if threshold < self.floor - 1e-9:
            raise InvalidArgument(f"threshold {threshold:g} is below the cache floor {self.floor:g}; mine with a lower floor")
        return threshold
