"""Score a drafted folder against ground truth: boxes one-to-one at IoU 0.5, per class, pooled
over images, cross-checked with pycocotools.

    python -m tests.bench.score_drafts DRAFTS GROUND_TRUTH      # YOLO folders (labels/, labelmap.txt)

Drafts are scored as written (every box counts, no score threshold: what an annotator sees).
The pycocotools check: the drafts' coco.json boxes as results against the ground truth as a
COCO dataset; its AP50 must agree with ours in kind (it is a ranking metric, ours a count).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from minehead import geometry
from minehead.datasets import load_dataset


def read_yolo_boxes(folder: Path, stem: str, w: int, h: int, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    path = folder / "labels" / f"{stem}.txt"
    boxes, names = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            v = line.split()
            if len(v) < 5:
                continue
            c = int(v[0])
            nums = [float(x) for x in v[1:]]
            if len(nums) in (4, 5):
                cx, cy, bw, bh = nums[:4]
                boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            else:
                xs, ys = np.array(nums[0::2]) * w, np.array(nums[1::2]) * h
                boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            names.append(classes[c])
    return np.array(boxes, float).reshape(-1, 4), names


def score(drafts: Path, truth: Path, iou: float = 0.5) -> dict:
    gt = load_dataset(truth)
    dclasses = (drafts / "labelmap.txt").read_text().split()
    per: dict[str, list[int]] = {c: [0, 0, 0] for c in gt.classes}  # tp, fp, gt
    for rec in gt.images:
        db, dn = read_yolo_boxes(drafts, rec.path.stem, rec.width, rec.height, dclasses)
        for ci, c in enumerate(gt.classes):
            g = rec.boxes[rec.class_ids == ci]
            mine = np.array([n == c for n in dn], bool)
            d = db[mine]
            d2g, _ = geometry.match(d, np.ones(len(d)), g, iou)
            tp = int((d2g >= 0).sum())
            per[c][0] += tp
            per[c][1] += len(d) - tp
            per[c][2] += len(g)
    out = {}
    for c, (tp, fp, n) in per.items():
        p = tp / max(tp + fp, 1)
        r = tp / max(n, 1)
        out[c] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-12), 4),
                  "tp": tp, "fp": fp, "gt": n}
    tp, fp, n = (sum(v[i] for v in per.values()) for i in range(3))
    p, r = tp / max(tp + fp, 1), tp / max(n, 1)
    out["all"] = {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-12), 4),
                  "tp": tp, "fp": fp, "gt": n}
    out["coco_ap50"] = coco_ap50(drafts, gt)
    return out


def coco_ap50(drafts: Path, gt) -> float | None:
    """AP at IoU 0.5 from pycocotools: drafts' coco.json annotations (with score) as results."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return None
    cj = drafts / "coco.json"
    if not cj.is_file():
        return None
    d = json.loads(cj.read_text())
    by_name = {im["file_name"].split("/")[-1].rsplit(".", 1)[0]: im for im in d["images"]}
    cat_by_name = {c["name"]: c["id"] for c in d["categories"]}
    images, anns = [], []
    for i, rec in enumerate(gt.images):
        images.append({"id": i + 1, "width": rec.width, "height": rec.height, "file_name": rec.path.name})
        for b, c in zip(rec.boxes, rec.class_ids):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_by_name.get(gt.classes[c], 10 ** 6),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float((b[2] - b[0]) * (b[3] - b[1])),
                         "iscrowd": 0})
    stem_to_id = {rec.path.stem: i + 1 for i, rec in enumerate(gt.images)}
    old_to_new = {im["id"]: stem_to_id.get(stem) for stem, im in by_name.items()}
    results = [{"image_id": old_to_new[a["image_id"]], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": float(a.get("score", 1.0))} for a in d["annotations"] if old_to_new.get(a["image_id"])]
    if not results:
        return 0.0
    truth = COCO()
    truth.dataset = {"images": images, "annotations": anns, "categories": d["categories"]}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        res = truth.loadRes(results)
        ev = COCOeval(truth, res, "bbox")
        ev.params.maxDets = [1, 10, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return round(float(ev.stats[1]), 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drafts")
    ap.add_argument("truth")
    a = ap.parse_args(argv)
    json.dump(score(Path(a.drafts), Path(a.truth)), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
