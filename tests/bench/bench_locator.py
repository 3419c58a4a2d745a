"""`make bench` (drafting quality): train -> mine -> draft on images the head never saw, per data
set, through the real trio and its public clients, scored one-to-one at IoU 0.5.

    python -m tests.bench.bench_locator [--only trees,coins,brick,scenes,whole,speed]

Data sets (built here, held-out images only in every figure):
- trees: real NEON aerial tiles with tree boxes from the deepforest 2.1.0 wheel
  (tests/bench/data_trees.py): train on 24 tiles, draft the 22 others (chequerboard split).
- coins, brick: scikit-image's photos with the boxes in tests/fixtures/real_photos: train on one
  half of the photo, draft the other half, both ways (objects cut by the middle count for the
  half that holds their centre).
- scenes: the crowded synthetic scenes of bench_detector (640 x 480, 10-16 objects, touching,
  five shapes): train on 24, draft 10 others.
- whole: the 2299 x 2472 YELL image drafted whole (tiled by the miner) against its 36 tiles
  drafted one by one, both scored on the same trees.
- speed: a 640 x 480 image drafted by a 4-class set against one backbone pass, alternating
  (min / median / max), decoder passes per image; locator training time on 50 images with
  their feature maps cached.

Each figure: precision, recall, F1 (our one-to-one matcher) and pycocotools' AP50 of the same
drafts (coco.json) as a cross-check. Results go to var/bench/locator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.score_drafts import score
from tests.bench.trio import Trio

REPO = Path(__file__).resolve().parents[2]
TARGETS = {"trees": 0.6, "coins": 0.95, "brick": 0.9, "scenes": 0.9}


def write_yolo(root: Path, stem: str, pixels: np.ndarray, boxes: np.ndarray, names, classes: list[str]) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labelmap.txt").write_text("\n".join(classes) + "\n")
    Image.fromarray(pixels).save(root / "images" / f"{stem}.png")
    h, w = pixels.shape[:2]
    lines = [f"{classes.index(n)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
             f"{(b[3] - b[1]) / h:.6f}" for b, n in zip(boxes, names)]
    (root / "labels" / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def photo_halves(name: str, tmp: Path) -> list[tuple[str, Path, Path]]:
    """(label, train folder, held-out folder) for left->right and right->left."""
    from tests.bench.bench_detector import load_photo

    px, boxes, rec = load_photo(name)
    W = px.shape[1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    out = []
    halves = {"left": (0, W // 2), "right": (W // 2, W)}
    for side, (lo, hi) in halves.items():
        b = boxes[(cx >= lo) & (cx < hi)] - [lo, 0, lo, 0]
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, hi - lo)
        write_yolo(tmp / name / side, f"{name}_{side}", np.ascontiguousarray(px[:, lo:hi]), b, [rec["class"]] * len(b),
                   [rec["class"]])
    out.append((f"{name} left->right", tmp / name / "left", tmp / name / "right"))
    out.append((f"{name} right->left", tmp / name / "right", tmp / name / "left"))
    return out


def scenes(tmp: Path, train: int = 24, test: int = 10) -> tuple[Path, Path]:
    from tests.bench.bench_detector import SHAPES, crowded_scene

    for split, n, seed in (("train", train, 1), ("test", test, 2)):
        rng = np.random.default_rng(seed)
        for i in range(n):
            px, b, names = crowded_scene(rng)
            write_yolo(tmp / "scenes" / split, f"scene_{i:03d}", px, b, names, SHAPES)
    return tmp / "scenes" / "train", tmp / "scenes" / "test"


def run(trio: Trio, label: str, train: Path, test: Path, out: Path) -> dict:
    """Train a head (with its locator) and mine recipes on `train`, draft `test`, score it."""
    from google.protobuf import json_format

    from minehead.client.heads import HeadClient
    from minehead.client.miner import MinerClient
    from minehead.head.v1 import head_pb2
    from minehead.miner.v1 import drafting_pb2, miner_pb2

    t0 = time.perf_counter()
    with HeadClient(trio.head) as hc, MinerClient(trio.miner) as mc:
        tr = hc.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(train)), seed=1))
        t_train = time.perf_counter() - t0
        job = mc.start_mining(miner_pb2.MiningSpec(dataset=str(train), head=tr.head.head_id, seed=1))
        res = mc.jobs.result(job.name, miner_pb2.MiningResult)
        t_mine = time.perf_counter() - t0 - t_train
        drafts = out / label.replace(" ", "_").replace(">", "")
        shutil.rmtree(drafts, ignore_errors=True)
        spec = drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=res.recipe_set),
                                         folder=str(test / "images"), output_dir=str(drafts))
        dj = mc.start_drafting(spec)
        dres = mc.jobs.result(dj.name, drafting_pb2.DraftingResult)
        t_draft = time.perf_counter() - t0 - t_train - t_mine
    summary = json.loads((drafts / "summary.json").read_text())
    s = score(drafts, test)
    loc = json_format.MessageToDict(tr.report).get("locator", {}).get("held_out", {})
    return {"label": label, "score": s, "head": tr.head.head_id, "recipe_set": res.recipe_set,
            "detector": summary.get("detector"), "passes": summary.get("passes"), "images": dres.images,
            "seconds": {"train": round(t_train, 1), "mine": round(t_mine, 1), "draft": round(t_draft, 1)},
            "locator_held_out": {c: v.get("f1") for c, v in loc.items()}}


def print_row(r: dict, target: float | None) -> None:
    a = r["score"]["all"]
    verdict = "" if target is None else ("  met" if a["f1"] >= target else f"  below target {target}")
    print(f"  {r['label']:<22} P {a['precision']:.2f}  R {a['recall']:.2f}  F1 {a['f1']:.2f} "
          f"(tp {a['tp']}, fp {a['fp']}, gt {a['gt']}; pycocotools AP50 {r['score']['coco_ap50']})  "
          f"detector {r['detector']}, passes {r['passes']}, train/mine/draft s {r['seconds']}{verdict}")
    for c, v in r["score"].items():
        if c not in ("all", "coco_ap50") and len(r["score"]) > 3:
            print(f"      {c:<16} P {v['precision']:.2f}  R {v['recall']:.2f}  F1 {v['f1']:.2f}  (gt {v['gt']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="trees,coins,brick,scenes,whole")
    ap.add_argument("--json", default=str(REPO / "var" / "bench" / "locator.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("MINEHEAD_OFFLINE", "1")
    only = set(a.only.split(","))
    models = Path(os.environ.get("MINEHEAD_MODELS_DIR", REPO / "var" / "models"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-locator-"))
    results: dict = {"rows": []}
    print("drafting quality on held-out images (train -> mine -> draft through the trio; IoU 0.5 one-to-one)")
    with Trio(tmp, models) as trio:
        if "trees" in only or "whole" in only:
            from tests.bench.data_trees import build

            trees = REPO / "var" / "data" / "trees"
            build(trees, REPO / "var" / "cache")
            local = tmp / "trees"
            shutil.copytree(trees, local)
            r = run(trio, "trees", local / "train", local / "heldout", tmp / "drafts")
            results["rows"].append(r)
            print_row(r, TARGETS["trees"])
        for name in ("coins", "brick"):
            if name in only:
                for label, tr, te in photo_halves(name, tmp):
                    r = run(trio, label, tr, te, tmp / "drafts")
                    results["rows"].append(r)
                    print_row(r, TARGETS[name])
        if "scenes" in only:
            tr, te = scenes(tmp)
            r = run(trio, "crowded scenes", tr, te, tmp / "drafts")
            results["rows"].append(r)
            print_row(r, TARGETS["scenes"])
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
