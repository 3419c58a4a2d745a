"""`make bench` (drafts under shift, issue 34): the user labels sparse images and drafts crowded
ones. How far do the drafts fall against a user who labelled images like the new ones?

    python -m tests.bench.bench_shift [--train 12] [--test 10] [--data shapes|rods] [--json PATH]

Crowded synthetic scenes (tests.bench.bench_detector.crowded_scene: 640 x 480, five shapes, some
touching): one head and recipe set trained and mined on `--train` SPARSE scenes (2-5 objects), one
on as many CROWDED scenes (12-17 objects, another seed), both draft the same `--test` crowded
scenes, which nothing was fitted on. Scored one-to-one at IoU 0.5 with pycocotools' AP50 beside
(tests/bench/score_drafts.py). Per arm: P / R / F1, and the recall split by how crowded a true box
is (its nearest neighbour's gap in box sides: touching < 0.1, near < 0.5, apart), which tells
merged or suppressed neighbours from objects not found at all.

`--data rods`: the time-lapse itself, synthetic (tests.bench.data_rods): phase-contrast frames of
rod-shaped cells, 2-5 separate cells in the labelled frames, 12-17 in touching, nearly parallel
microcolonies in the drafted ones (diagonal neighbours' boxes overlap at IoU up to ~0.4).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from tests.bench.bench_locator import crowded_variants, print_row, run, write_yolo
from tests.bench.trio import Trio

REPO = Path(__file__).resolve().parents[2]
SPARSE, CROWDED = (2, 6), (12, 18)


def make_split(root: Path, n: int, seed: int, objects: tuple[int, int], data: str = "shapes") -> Path:
    """n scenes of `objects` objects: shapes (bench_detector's crowded scenes) or rods (phase-contrast
    frames of rod-shaped cells, tests.bench.data_rods: the crowded ones in microcolonies)."""
    from tests.bench.bench_detector import SHAPES, crowded_scene
    from tests.bench.data_rods import CLASS, rod_frame

    rng = np.random.default_rng(seed)
    for i in range(n):
        if data == "rods":
            px, b = rod_frame(rng, n=objects, colony=objects[0] >= CROWDED[0])
            write_yolo(root, f"frame_{i:03d}", px, b, [CLASS] * len(b), [CLASS])
        else:
            px, b, names = crowded_scene(rng, n=objects)
            write_yolo(root, f"scene_{i:03d}", px, b, names, SHAPES)
    return root


def gap_class(boxes: np.ndarray) -> np.ndarray:
    """Per box (N x 4 XYXY): 0 touching (nearest neighbour's gap < 0.1 of the smaller side),
    1 near (< 0.5), 2 apart."""
    if len(boxes) < 2:
        return np.full(len(boxes), 2)
    x0, y0, x1, y1 = (boxes[:, k][:, None] for k in range(4))
    gx = np.maximum(0, np.maximum(x0 - x1.T, x0.T - x1))
    gy = np.maximum(0, np.maximum(y0 - y1.T, y0.T - y1))
    side = np.minimum(x1 - x0, y1 - y0)
    gap = np.hypot(gx, gy) / np.minimum(side, side.T)
    np.fill_diagonal(gap, np.inf)
    g = gap.min(1)
    return np.where(g < 0.1, 0, np.where(g < 0.5, 1, 2))


def recall_by_crowding(drafts: Path, test: Path) -> dict:
    """Recall (class-aware, one-to-one at IoU 0.5) of the true boxes per gap class."""
    from minehead.datasets import load_dataset
    from minehead.geometry import match
    from tests.bench.score_drafts import read_yolo_boxes

    ds = load_dataset(test)
    dclasses = (drafts / "labelmap.txt").read_text().split()
    found, total = np.zeros(3), np.zeros(3)
    for rec in ds.images:
        boxes, names = read_yolo_boxes(drafts, rec.path.stem, rec.width, rec.height, dclasses)
        g = gap_class(rec.boxes)
        for ci, c in enumerate(ds.classes):
            gt = np.flatnonzero(rec.class_ids == ci)
            d = boxes[np.array([n == c for n in names], bool).reshape(-1)]
            d2g, _ = match(d, np.ones(len(d)), rec.boxes[gt], 0.5)
            hit = np.zeros(len(gt), bool)
            hit[d2g[d2g >= 0]] = True
            for k in range(3):
                total[k] += int((g[gt] == k).sum())
                found[k] += int((hit & (g[gt] == k)).sum())
    return {name: {"recall": round(float(found[k] / total[k]), 3) if total[k] else None, "gt": int(total[k])}
            for k, name in enumerate(("touching", "near", "apart"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=12)
    ap.add_argument("--test", type=int, default=10)
    ap.add_argument("--arms", default="sparse,crowded,sparse-matched",
                    help="sparse: --train sparse scenes; crowded: --train crowded ones; sparse-matched: sparse scenes "
                         "until they hold as many objects as the crowded arm's (more labels, not fewer, per object)")
    ap.add_argument("--adapt", action="store_true", help="also draft each arm's test scenes with --adapt")
    ap.add_argument("--cross-fit", type=int, default=0, metavar="K", help="train each arm's head with K cross-fitting "
                    "folds (mining out of fold), and also mine it in fold and draft with that set, to compare")
    ap.add_argument("--crowded-copies", default="", metavar="N[,N...]", help="heads trained with this many crowded "
                    "copies an image (auto, or 0..8); several, comma-separated, run each arm once per value, side by side")
    ap.add_argument("--data", default="shapes", choices=("shapes", "rods"), help="shapes: bench_detector's scenes; rods: "
                    "phase-contrast frames of rod-shaped cells, the crowded ones in touching microcolonies")
    ap.add_argument("--json", default=str(REPO / "var" / "bench" / "shift.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("MINEHEAD_OFFLINE", "1")
    models = Path(os.environ.get("MINEHEAD_MODELS_DIR", REPO / "var" / "models"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-shift-"))
    test = make_split(tmp / "test", a.test, 2, CROWDED, a.data)
    from minehead.datasets import load_dataset

    crowded = make_split(tmp / "crowded", a.train, 3, CROWDED, a.data)
    n_objects = sum(len(r.boxes) for r in load_dataset(crowded).images)
    arms = {}
    if "sparse" in a.arms.split(","):
        arms["sparse -> crowded"] = make_split(tmp / "sparse", a.train, 1, SPARSE, a.data)
    if "crowded" in a.arms.split(","):
        arms["crowded -> crowded"] = crowded
    if "sparse-matched" in a.arms.split(","):
        # as many sparse scenes as it takes to hold the crowded arm's objects (the same seed's first ones)
        n = a.train
        while sum(len(r.boxes) for r in load_dataset(make_split(tmp / "sparse-m", n, 1, SPARSE, a.data)).images) < n_objects:
            n += 4
        arms[f"sparse x{n} -> crowded"] = tmp / "sparse-m"
    print(f"drafts of {a.test} crowded scenes ({CROWDED[0]}-{CROWDED[1] - 1} objects) by heads trained on {a.train} "
          "scenes (IoU 0.5 one-to-one)")
    rows = []
    with Trio(tmp, models) as trio:
        variants = crowded_variants(a.crowded_copies)
        for (label, train), v in ((arm, v) for arm in arms.items() for v in variants):
            if len(variants) > 1:
                label += f" [crowded copies {'auto' if v is None else v}]"
            r = run(trio, label, train, test, tmp / "drafts", adapt=a.adapt, cross_fit=a.cross_fit, crowded=v)
            drafts = tmp / "drafts" / label.replace(" ", "_").replace(">", "")
            r["recall_by_crowding"] = recall_by_crowding(drafts, test)
            rows.append(r)
            print_row(r, None)
            print("      recall by crowding: " + ", ".join(f"{k} {v['recall']} (gt {v['gt']})"
                                                         for k, v in r["recall_by_crowding"].items()))
            if "adapted" in r:
                ad = r["adapted"]
                ad["recall_by_crowding"] = recall_by_crowding(Path(str(drafts) + "_adapt"), test)
                print_row({**r, "label": label + " --adapt", "score": ad["score"]}, None)
                print("      recall by crowding: " + ", ".join(f"{k} {v['recall']} (gt {v['gt']})"
                                                             for k, v in ad["recall_by_crowding"].items())
                      + f"; adapt: {json.dumps({k: (ad['adapt'] or {}).get(k) for k in ('pseudo_labels', 'unsure_drafts', 'labelled_images', 'seconds')})}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
