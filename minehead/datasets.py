"""YOLO datasets: images, labels and class names, read once into typed pixel boxes.

Layouts accepted (class names from labelmap.txt, one per line, or data.yaml `names:` as a list
or an {id: name} mapping):

    DIR/images/*.jpg  DIR/labels/*.txt                       (one split; the service splits it)
    DIR/train/images  DIR/train/labels  DIR/val/images  DIR/val/labels   (given splits)
    DIR/images/train  DIR/labels/train  DIR/images/val  DIR/labels/val   (the Ultralytics variant)

Label lines:
    c cx cy w h          a box, normalised to the image size
    c cx cy w h conf     a box with a trailing confidence (still a box, not a polygon)
    c x1 y1 x2 y2 x3 y3 …  a polygon (an even number >= 6 of normalised coordinates); its box is
                          the min/max of its points
Every other line is dropped and reported as "file:line: reason", never skipped silently.
Normalised coordinates become `boxes` (Nx4 XYXY pixels) here, exactly once.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from PIL import Image

from minehead.core.errors import InvalidArgument

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Normalised coordinates may overshoot [0, 1] by rounding in exporters; more is an error.
_TOL = 0.02
# One pixel, less what 6-decimal normalised labels lose to rounding (a 1 px box of a 3 px image
# reads back 0.999999 px high): the drafts' own YOLO lines must read back.
MIN_SIDE_PX = 0.99


@dataclasses.dataclass
class ImageRecord:
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # Nx4 float64, XYXY pixels
    class_ids: np.ndarray  # N int64, indices into Dataset.classes
    split: str = ""  # "train" | "val" | "" (not given)

    @property
    def key(self) -> str:
        return self.path.name


@dataclasses.dataclass
class Dataset:
    root: Path
    classes: list[str]
    images: list[ImageRecord]
    dropped: list[str]  # "labels/a.txt:3: unknown class id 7"
    has_splits: bool = False

    @property
    def label_count(self) -> int:
        return int(sum(len(r.class_ids) for r in self.images))

    def counts(self) -> dict[str, int]:
        c = np.zeros(len(self.classes), int)
        for r in self.images:
            np.add.at(c, r.class_ids, 1)
        return {name: int(n) for name, n in zip(self.classes, c)}


def read_class_names(root: Path) -> list[str]:
    lm = root / "labelmap.txt"
    if lm.is_file():
        names = [ln.strip() for ln in lm.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if names:
            return names
    for fname in ("data.yaml", "data.yml", "dataset.yaml"):
        y = root / fname
        if y.is_file():
            import yaml

            try:
                data = yaml.safe_load(y.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise InvalidArgument(f"{y.name} is not valid YAML: {e}") from None
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, dict):
                try:
                    ids = sorted(int(k) for k in names)
                except (TypeError, ValueError):
                    raise InvalidArgument(f"{y.name}: names keys must be class ids") from None
                if ids != list(range(len(ids))):
                    raise InvalidArgument(f"{y.name}: class ids must run 0..{len(ids) - 1}, got {ids}")
                return [str(names[k] if k in names else names[str(k)]) for k in ids]
            if isinstance(names, list) and names:
                return [str(n) for n in names]
            raise InvalidArgument(f"{y.name} has no `names:` list or mapping")
    raise InvalidArgument(f"dataset {root} has no class names: add labelmap.txt (one name a line) or data.yaml (names:)")


def split_dirs(root: Path) -> list[tuple[str, Path, Path]]:
    """(split, images dir, labels dir) for each split present."""
    if (root / "train" / "images").is_dir():
        return [(s, root / s / "images", root / s / "labels") for s in ("train", "val", "valid", "test")
                if (root / s / "images").is_dir() and s != "test"]
    if (root / "images" / "train").is_dir():
        return [(s, root / "images" / s, root / "labels" / s) for s in ("train", "val", "valid")
                if (root / "images" / s).is_dir()]
    if (root / "images").is_dir():
        return [("", root / "images", root / "labels")]
    raise InvalidArgument(f"dataset {root} has no images/ folder (nor train/images, images/train)")


def parse_label_line(line: str, width: int, height: int, n_classes: int) -> tuple[int, np.ndarray] | str:
    """One label line -> (class id, XYXY pixel box), or the reason it is dropped."""
    parts = line.split()
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        return "not all fields are numbers"
    if len(vals) < 5:
        return f"{len(vals)} fields; a box needs 5 (class cx cy w h)"
    cls_f = vals[0]
    if not cls_f.is_integer():
        return f"class id {parts[0]} is not an integer"
    cls = int(cls_f)
    if not 0 <= cls < n_classes:
        return f"unknown class id {cls} (the labelmap has {n_classes} classes)"
    coords = vals[1:]
    if any(not math.isfinite(v) for v in coords):
        return "a coordinate is NaN or infinite"
    if len(coords) in (4, 5):  # box, or box + confidence
        cx, cy, w, h = coords[:4]
        if w <= 0 or h <= 0:
            return f"box has zero or negative size (w={w:g}, h={h:g})"
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        pts = np.array([[x1, y1], [x2, y2]])
    elif len(coords) >= 6 and len(coords) % 2 == 0:
        pts = np.array(coords).reshape(-1, 2)
    else:
        return f"{len(coords)} coordinates: not a box (4, or 5 with a confidence) nor a polygon (even, >= 6)"
    if pts.min() < -_TOL or pts.max() > 1 + _TOL:
        return "coordinates outside [0, 1] (YOLO labels are normalised)"
    pts = pts.clip(0, 1)
    x1, y1 = pts.min(0)
    x2, y2 = pts.max(0)
    box = np.array([x1 * width, y1 * height, x2 * width, y2 * height])
    if box[2] - box[0] < MIN_SIDE_PX or box[3] - box[1] < MIN_SIDE_PX:
        return "box is under one pixel wide or high"
    return cls, box


def load_dataset(root: Path | str) -> Dataset:
    """Read a YOLO dataset folder. InvalidArgument when it is not one; bad lines are reported."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgument(f"dataset {root} is not a folder")
    classes = read_class_names(root)
    if len(set(classes)) != len(classes):
        raise InvalidArgument(f"dataset {root}: duplicate class names in the labelmap")
    bad = [c for c in classes if c.startswith("__bg_")]
    if bad:
        raise InvalidArgument(f"dataset {root}: class names starting with __bg_ are reserved for background ({bad[0]})")
    splits = split_dirs(root)
    images, dropped = [], []
    for split, img_dir, lbl_dir in splits:
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
                continue
            try:
                with Image.open(p) as im:
                    width, height = im.size
            except Exception as e:  # noqa: BLE001 - reported and skipped
                dropped.append(f"{p.relative_to(root)}: unreadable image ({type(e).__name__})")
                continue
            boxes, ids = [], []
            lbl = lbl_dir / (p.stem + ".txt")
            if lbl.is_file():
                rel = lbl.relative_to(root)
                for i, line in enumerate(lbl.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    r = parse_label_line(line, width, height, len(classes))
                    if isinstance(r, str):
                        dropped.append(f"{rel}:{i}: {r}")
                    else:
                        ids.append(r[0])
                        boxes.append(r[1])
            images.append(ImageRecord(p, width, height, np.array(boxes, float).reshape(-1, 4),
                                      np.array(ids, np.int64), split=split.replace("valid", "val")))
    if not images:
        raise InvalidArgument(f"dataset {root} has no images")
    return Dataset(root, classes, images, dropped, has_splits=any(r.split for r in images))
