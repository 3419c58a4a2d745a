"""Where the sparse arm's drafts are lost (issue 34): the locator's peak scores on the labelled
images against the new ones, true and false peaks apart, and the drafts' F1 per class at the
recipe's threshold against the best threshold chosen with the new images' truth (an oracle: how
much a better operating point could win at most).

    python -m tests.bench.shift_scores BENCH_SHIFT_TMP [--arm sparse]

BENCH_SHIFT_TMP: the folder `python -m tests.bench.bench_shift` printed nothing about but left
behind (/tmp/bench-shift-*: its train arms, `test`, and the miner's recipe sets). Every peak of a
class at or above 0.05 is a row (score, the head's probability for the class, matched one-to-one
at IoU 0.5); the recipe's head gate (min_prob) applies throughout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from minehead.core.images import decode_image
from minehead.datasets import load_dataset
from minehead.geometry import match
from minehead.heads.bundle import HeadBundle

REPO = Path(__file__).resolve().parents[2]


def peak_rows(det, head, ds_path: Path) -> tuple[dict, dict]:
    """Per class: rows N x 3 (peak score, head probability, matched) and the truth's count."""
    ds = load_dataset(ds_path)
    rows = {c: [] for c in head.real_classes}
    gts = dict.fromkeys(head.real_classes, 0)
    for rec in ds.images:
        st = det.set_image(decode_image(rec.path.read_bytes(), rec.path.name))
        peaks = det.locator_proposals(st)
        for k, c in enumerate(head.real_classes):
            gt = rec.boxes[rec.class_ids == ds.classes.index(c)]
            gts[c] += len(gt)
            m = (peaks.class_ids == k) & (peaks.scores >= 0.05)
            b, s = peaks.boxes[m], peaks.scores[m]
            if len(b):
                p = head.predict_proba(det.embeddings(st, b, head.crop_policy))[:, head.classes.index(c)]
                d2g, _ = match(b, s, gt, 0.5)
                rows[c] += [(s[j], p[j], d2g[j] >= 0) for j in range(len(b))]
    return {c: np.array(v, float).reshape(-1, 3) for c, v in rows.items()}, gts


def f1_at(rows: np.ndarray, gt: int, t: float, min_prob: float) -> float:
    k = (rows[:, 0] >= t) & (rows[:, 1] >= min_prob)
    tp, n = rows[k, 2].sum(), k.sum()
    p, r = (tp / n if n else 0.0), (tp / gt if gt else 0.0)
    return 2 * p * r / (p + r) if p + r else 0.0


def quantiles(rows: np.ndarray, matched: bool) -> str:
    s = rows[rows[:, 2] == matched, 0]
    return "/".join(f"{q:.2f}" for q in np.quantile(s, [0.1, 0.5, 0.9])) if len(s) else "-"


def main(argv=None) -> int:
    from miner_svc.detectors import create_detector

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tmp", type=Path)
    ap.add_argument("--arm", default="sparse", help="the train arm's folder under TMP (sparse, crowded)")
    a = ap.parse_args(argv)
    drafts = next(p for p in sorted((a.tmp / "drafts").iterdir()) if p.name.startswith(f"{a.arm}_-_"))
    rsid = json.loads((drafts / "summary.json").read_text())["recipe_set"].split("/")[-1]
    folder = a.tmp / "miner" / "recipe_sets" / rsid
    rset = json.loads((folder / "recipe_set.json").read_text())
    head = HeadBundle.from_zip((folder / "head.zip").read_bytes())
    thr = {r["class_name"]: (r["steps"][0]["seed_threshold"] if r.get("steps") else 1.0) for r in rset["recipes"]}
    gate = {r["class_name"]: r.get("gate", {}).get("min_prob", 0.5) for r in rset["recipes"]}
    det = create_detector("minisam-locator", REPO / "var" / "models").with_head(head)
    train, _ = peak_rows(det, head, a.tmp / a.arm)
    test, gt = peak_rows(det, head, a.tmp / "test")
    print(f"{a.arm} arm ({drafts.name}): peak score quantiles 10/50/90 %, labelled -> new images; drafts F1 per class")
    for c in head.real_classes:
        t = test[c]
        best = max(np.unique(t[:, 0]), key=lambda x: f1_at(t, gt[c], x, gate[c])) if len(t) else 1.0
        print(f"  {c:<15} true peaks {quantiles(train[c], True)} -> {quantiles(t, True)}; false peaks "
              f"{quantiles(train[c], False)} -> {quantiles(t, False)}; F1 at the recipe's threshold {thr[c]:.2f}: "
              f"{f1_at(t, gt[c], thr[c], gate[c]):.2f}, at the best one ({best:.2f}, oracle): "
              f"{f1_at(t, gt[c], best, gate[c]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
