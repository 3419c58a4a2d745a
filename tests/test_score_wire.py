"""Score's column-wise path gives exactly what the per-crop build gives: the reasons' numbers
(table lookup against f"{p:.3f}"), and the wire-encoded response against one CropScore message
built per crop through the protobuf API, for heads with and without background classes."""

from __future__ import annotations

import numpy as np
import pytest

from head_svc.estimators import LogRegHead
from head_svc.score_wire import score_response
from head_svc.scoring import effective_thresholds, format3, score_embeddings
from minehead.head.v1 import head_pb2
from minehead.heads.bundle import bundle_from_head
from minehead.heads.keep_rule import Thresholds

_DECISIONS = {"keep": head_pb2.CropScore.KEEP, "reject_low_prob": head_pb2.CropScore.REJECT_LOW_PROB,
              "reject_margin": head_pb2.CropScore.REJECT_MARGIN, "reject_background": head_pb2.CropScore.REJECT_BACKGROUND}


def _bundle(classes, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), dim))
    y = rng.integers(0, len(classes), 600)
    X = (centres[y] + rng.normal(size=(600, dim)) * 1.2).astype(np.float32)
    return bundle_from_head(LogRegHead().fit(X, y, len(classes)), classes, "test"), X


def _reference(res, head_id, include_probabilities):
    """The per-crop build the servicer used before (one message per row through the API)."""
    t = res.thresholds
    out = head_pb2.ScoreResponse(head_id=head_id, warnings=res.warnings,
                                 thresholds=head_pb2.Thresholds(min_prob=t.min_prob, margin=t.margin,
                                                                background_guard=t.background_guard,
                                                                background_margin=t.background_margin))
    for i, r in enumerate(res.rows):
        cs = out.scores.add(**{k: v for k, v in r.items() if k not in ("decision", "decision_code")})
        cs.decision = _DECISIONS[r["decision"]]
        if include_probabilities:
            cs.probabilities.extend(res.probabilities[i].tolist())
    return out


def test_format3_matches_fstrings_including_ties_and_out_of_range():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random(20000), rng.random(2000).astype(np.float32), np.arange(2001) / 2000,
                        [0.0, 1.0, 0.0625, 0.0005, 0.9995, -0.25, 1.5, 1e-9, 0.49999999999]])
    assert format3(x).tolist() == [f"{v:.3f}" for v in x]


LONG = "a_class_name_long_enough_for_a_two_byte_length_" * 4 + "é"


@pytest.mark.parametrize("classes", [["cat", "dog", "bird", "__bg_0", "__bg_1"], ["cat", LONG, "ünï"], ["only", "__bg_0"]])
@pytest.mark.parametrize("target", [None, "first"])
@pytest.mark.parametrize("include_probabilities", [False, True])
def test_wire_encoding_equals_the_per_crop_build(classes, target, include_probabilities):
    b, X = _bundle(classes)
    thresholds = [effective_thresholds(b), (Thresholds(0.3, 0.2, True, 0.05), []), (Thresholds(0.0, 0.9, False, 0.0), [])]
    for th, warnings in thresholds:
        res = score_embeddings(b, X[:300], classes[0] if target else None, th, warnings, ambiguity_margin=0.3)
        want = _reference(res, b.head_id, include_probabilities)
        got = score_response(res, b.head_id, include_probabilities)
        assert got == want
        assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    decisions = {s.decision for s in got.scores}
    assert len(decisions) >= 2, decisions  # the cases above exercise more than one decision


def test_reasons_name_the_numbers_and_empty_batches_encode_to_nothing():
    b, X = _bundle(["cat", "dog", "__bg_0"])
    res = score_embeddings(b, X[:50], "dog", Thresholds(0.5, 0.0, True, 0.0), [])
    for r, tp in zip(res.rows, res.target_prob):
        assert r["reason"].startswith(f"p(dog)={tp:.3f}")
    empty = score_embeddings(b, X[:0])
    assert len(score_response(empty, b.head_id).scores) == 0 and empty.rows == []


def _per_crop_rows(bundle, X, target_class, thresholds, ambiguity_margin):
    """The per-crop loop score_embeddings used before it went column-wise (the reference)."""
    from minehead.heads.keep_rule import DECISION_NAMES, KEEP, REJECT_BACKGROUND, REJECT_LOW_PROB, REJECT_MARGIN, apply_keep_rule

    classes = bundle.classes
    probs = bundle.predict_proba(X)
    n, bg = len(probs), bundle.background_indices
    real = np.array([i for i in range(len(classes)) if i not in set(bg)])
    order = np.argsort(-probs[:, real], axis=1, kind="stable")
    top1 = real[order[:, 0]]
    top2 = real[order[:, 1]] if len(real) > 1 else np.full(n, -1)
    target = np.full(n, classes.index(target_class)) if target_class else top1
    kr = apply_keep_rule(probs, target, thresholds, bg)
    best_bg = np.array(bg)[probs[:, bg].argmax(1)] if bg else np.full(n, -1)
    rows = []
    for i in range(n):
        p1 = float(probs[i, top1[i]])
        p2 = float(probs[i, top2[i]]) if top2[i] >= 0 else 0.0
        t, code = int(target[i]), int(kr.decision[i])
        tp, other, bgp = float(kr.target_prob[i]), float(kr.best_other[i]), float(kr.best_background[i])
        reason = {
            KEEP: f"p({classes[t]})={tp:.3f} passes min_prob {thresholds.min_prob:g}",
            REJECT_LOW_PROB: f"p({classes[t]})={tp:.3f} < min_prob {thresholds.min_prob:g}",
            REJECT_MARGIN: f"p({classes[t]})={tp:.3f} - best other {other:.3f} < margin {thresholds.margin:g}",
            REJECT_BACKGROUND: f"p({classes[t]})={tp:.3f} - {classes[best_bg[i]] if bg else 'background'} {bgp:.3f} "
                               f"< background_margin {thresholds.background_margin:g}",
        }[code]
        ambiguous = not target_class and top2[i] >= 0 and p1 - p2 < ambiguity_margin
        rows.append({
            "top1_class": classes[top1[i]], "top1_prob": p1,
            "top2_class": classes[top2[i]] if top2[i] >= 0 else "", "top2_prob": p2, "margin": p1 - p2,
            "best_background_class": classes[best_bg[i]] if bg else "", "best_background_prob": bgp,
            "decision": DECISION_NAMES[code], "decision_code": code, "reason": reason,
            "target_class": classes[t], "target_prob": tp, "ambiguous": bool(ambiguous),
            "ambiguity": f"unclear between {classes[top1[i]]} and {classes[top2[i]]}" if ambiguous else "",
        })
    return rows


@pytest.mark.parametrize("classes", [["cat", "dog", "bird", "__bg_0", "__bg_1"], ["only", "__bg_0"], ["a", "b"]])
@pytest.mark.parametrize("target", [None, "first"])
def test_columns_equal_the_per_crop_loop(classes, target):
    b, X = _bundle(classes, seed=3)
    for th in (Thresholds(0.5, 0.0, True, 0.0), Thresholds(0.3, 0.2, True, 0.05), Thresholds(0.0, 0.9, False, 0.0)):
        th, _ = effective_thresholds(b, th.min_prob, th.margin, th.background_guard, th.background_margin)
        tc = classes[0] if target else None
        assert score_embeddings(b, X[:300], tc, th, [], 0.3).rows == _per_crop_rows(b, X[:300], tc, th, 0.3)
