"""Property-based tests (hypothesis) of the geometry core: tiling plans and seam merging, NMS,
the box formats drafts are written in and read back from (YOLO, COCO XYWH, Label Studio
percent), the feature-map frame (image px <-> cells) and the importers' coordinate checks.

Example counts are bounded (EXAMPLES each, no deadline) so the file runs in seconds; a failing
example is shrunk and printed by hypothesis, and the tests below the properties pin the ones
found so far.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minehead.core.errors import InvalidArgument
from minehead.datasets import parse_label_line
from minehead.drafts import formats
from minehead.geometry import iou_matrix, mask_nms, nms
from minehead.importers import SLACK, _box, _coord, _ls_region
from minehead.locator.decode import LocatorDetections
from minehead.locator.frame import FeatureFrame
from minehead.miner.v1 import drafting_pb2
from miner_svc.detectors import tiling

EXAMPLES = 60
prop = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies ------------------------------------------------------------------------------
@st.composite
def sized_plans(draw):
    """(W, H, object_px, object_sides): an image and the head's object statistics that size its tiles."""
    w, h = draw(st.integers(1, 4000)), draw(st.integers(1, 4000))
    med_side = draw(st.floats(0.01, 1.0))
    med_px = draw(st.floats(4, 400))
    big_px = med_px * draw(st.floats(1.0, 4.0))
    return w, h, [med_px / 2, med_px, big_px], [med_side / 2, med_side, min(1.0, med_side * 2)]


@st.composite
def boxes_in(draw, w, h, n_max=6, min_side=1.0):
    """N x 4 float XYXY boxes inside a w x h image, each at least min_side wide and high."""
    n = draw(st.integers(0, n_max))
    out = []
    for _ in range(n):
        x1 = draw(st.floats(0, max(0.0, w - min_side)))
        y1 = draw(st.floats(0, max(0.0, h - min_side)))
        x2 = draw(st.floats(min(w, x1 + min_side), w))
        y2 = draw(st.floats(min(h, y1 + min_side), h))
        out.append([x1, y1, x2, y2])
    return np.array(out, np.float64).reshape(-1, 4)


def _dets(boxes, scores=None, cls=0) -> LocatorDetections:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    s = np.asarray(scores if scores is not None else np.linspace(0.9, 0.5, len(b)), np.float32)
    return LocatorDetections(b, s, np.full(len(b), cls, np.int64), np.zeros((len(b), 2), np.int64))


def _tiled(draw_plan):
    w, h, px, sides = draw_plan
    return w, h, tiling.plan(w, h, px, sides)


# -- tiling plans ----------------------------------------------------------------------------
@prop
@given(sized_plans())
def test_tiles_cover_the_image_and_overlap_as_planned(p):
    w, h, plan = _tiled(p)
    assert plan.tiles, "a plan always has a tile"
    xs = sorted({t[0] for t in plan.tiles})
    ys = sorted({t[1] for t in plan.tiles})
    assert len(plan.tiles) == len(xs) * len(ys)  # a grid
    for x0, y0, x1, y1 in plan.tiles:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 <= plan.tile_px and y1 - y0 <= plan.tile_px
    # cover: the grid's columns and rows leave no gap, and reach both edges
    for starts, ends, limit in ((xs, {t[0]: t[2] for t in plan.tiles}, w), (ys, {t[1]: t[3] for t in plan.tiles}, h)):
        assert starts[0] == 0 and ends[starts[-1]] == limit
        for a, b in zip(starts, starts[1:]):
            assert ends[a] - b >= plan.overlap_px, "neighbouring tiles overlap at least as planned"
    if len(plan.tiles) > 1:
        assert plan.overlap_px >= min(plan.tile_px // 2, plan.tile_px / 10) - 1


@prop
@given(sized_plans(), st.data())
def test_cores_partition_the_image_and_lie_in_their_tiles(p, data):
    w, h, plan = _tiled(p)
    cores = tiling._cores(plan.tiles, w, h)
    for (x0, y0, x1, y1), (cx0, cy0, cx1, cy1) in zip(plan.tiles, cores):
        assert x0 <= cx0 < cx1 <= x1 and y0 <= cy0 < cy1 <= y1
    pts = data.draw(st.lists(st.tuples(st.floats(0, w, exclude_max=True), st.floats(0, h, exclude_max=True)),
                             min_size=1, max_size=20))
    for x, y in pts:
        owners = [k for k, (a, b, c, d) in enumerate(cores) if a <= x < c and b <= y < d]
        assert len(owners) == 1, (x, y, owners)


# -- merging tiles ---------------------------------------------------------------------------
@st.composite
def tiled_scenes(draw):
    """A tiled image, one object no larger than the overlap, and every tile's view of it (the
    object clipped to the tile, in tile px), plus arbitrary peaks anywhere in some tiles."""
    w, h, plan = _tiled(draw(sized_plans()))
    side_max = max(1.0, float(plan.overlap_px)) if len(plan.tiles) > 1 else float(min(w, h))
    bw = draw(st.floats(1.0, min(side_max, w)))
    bh = draw(st.floats(1.0, min(side_max, h)))
    x1, y1 = draw(st.floats(0, w - bw)), draw(st.floats(0, h - bh))
    obj = np.array([x1, y1, x1 + bw, y1 + bh])
    return w, h, plan, obj


@prop
@given(tiled_scenes())
def test_an_object_seen_by_several_tiles_comes_out_once_and_whole(scene):
    w, h, plan, obj = scene
    parts = []
    for t in plan.tiles:
        x0, y0, x1, y1 = t
        seen = np.array([max(obj[0], x0), max(obj[1], y0), min(obj[2], x1), min(obj[3], y1)])
        views = [seen - [x0, y0, x0, y0]] if seen[2] > seen[0] and seen[3] > seen[1] else []
        parts.append((_dets(views, [0.8] * len(views)), t))
    d = tiling.merge(parts, w, h)
    assert len(d) == 1, (plan.describe(), obj, d.boxes)
    np.testing.assert_allclose(d.boxes[0], obj, atol=1e-3 * max(w, h, 1))


@prop
@given(sized_plans(), st.data())
def test_merged_boxes_lie_in_the_image_best_first_and_never_crash(p, data):
    w, h, plan = _tiled(p)
    parts = []
    for t in plan.tiles:
        tw, th = t[2] - t[0], t[3] - t[1]
        b = data.draw(boxes_in(tw, th, n_max=3, min_side=0.0))
        scores = data.draw(st.lists(st.floats(0, 1), min_size=len(b), max_size=len(b)))
        classes = data.draw(st.integers(0, 2))
        parts.append((_dets(b, scores, classes), t))
    d = tiling.merge(parts, w, h)
    assert d.boxes.shape == (len(d), 4) and len(d.class_ids) == len(d) == len(d.cells)
    if len(d):
        assert (d.boxes >= 0).all() and (d.boxes[:, [0, 2]] <= w).all() and (d.boxes[:, [1, 3]] <= h).all()
        assert (np.diff(d.scores) <= 0).all()


@prop
@given(sized_plans(), st.data())
def test_peaks_only_in_the_neighbours_cores_give_an_empty_result(p, data):
    """The crash of issue 37: every tile has peaks, none in its own core."""
    w, h, plan = _tiled(p)
    cores = tiling._cores(plan.tiles, w, h)
    parts = []
    for t, (cx0, cy0, cx1, cy1) in zip(plan.tiles, cores):
        x0, y0, x1, y1 = t
        # a small box centred just past the tile's core, where the tile still reaches
        spots = [(cx1 + 0.5, (cy0 + cy1) / 2) if cx1 + 1 <= x1 and cx1 < w else None,
                 ((cx0 + cx1) / 2, cy1 + 0.5) if cy1 + 1 <= y1 and cy1 < h else None,
                 (cx0 - 0.5, (cy0 + cy1) / 2) if cx0 - 1 >= x0 and cx0 > 0 else None]
        spots = [s for s in spots if s is not None]
        pick = data.draw(st.lists(st.sampled_from(spots), max_size=2)) if spots else []
        b = [[sx - 0.5 - x0, sy - 0.5 - y0, sx + 0.5 - x0, sy + 0.5 - y0] for sx, sy in pick]
        parts.append((_dets(b), t))
    d = tiling.merge(parts, w, h)
    assert len(d) == 0 and d.boxes.shape == (0, 4)


def test_all_peaks_in_overlaps_gives_an_empty_result_not_a_crash():
    """The issue's report: two tiles, each with one peak past the middle of their overlap."""
    left, right = (0, 0, 400, 100), (300, 0, 700, 100)
    d = tiling.merge([(_dets([[360, 10, 390, 40]]), left), (_dets([[5, 10, 35, 40]]), right)], 700, 100)
    assert len(d) == 0 and d.boxes.shape == (0, 4) and d.scores.dtype == np.float32
    assert len(tiling.merge([(_dets([]), left), (_dets([]), right)], 700, 100)) == 0


# -- NMS -------------------------------------------------------------------------------------
@prop
@given(st.data(), st.floats(0.1, 0.9))
def test_mask_nms_of_filled_boxes_is_box_nms(data, thr):
    """Masks that fill their (integer) boxes overlap exactly as the boxes do: drafting's
    mask-overlap suppression then keeps what box NMS keeps."""
    n = data.draw(st.integers(0, 10))
    raw = data.draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(1, 20), st.integers(1, 20)),
                             min_size=n, max_size=n))
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in raw], np.float64).reshape(-1, 4)
    scores = np.array(data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n, unique=True)), np.float64)
    masks = np.zeros((n, 50, 50), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[i, y0:y1, x0:x1] = True
    assert mask_nms(boxes, scores, masks, thr).tolist() == nms(boxes, scores, thr).tolist()


def test_mask_nms_keeps_touching_diagonal_rods_that_box_nms_merges():
    """Two thin rods side by side on a diagonal: boxes IoU ~0.8, masks share no pixel."""
    H = W = 60
    yy, xx = np.mgrid[0:H, 0:W]
    rod = lambda off: (np.abs(yy - xx - off) <= 1) & (yy >= 5) & (yy < 55)  # noqa: E731
    masks = np.stack([rod(0), rod(4), rod(0) | rod(1)])  # the third: the first rod again, slightly wider
    boxes = np.array([[xx[m].min(), yy[m].min(), xx[m].max() + 1, yy[m].max() + 1] for m in masks], np.float64)
    scores = np.array([0.9, 0.8, 0.7])
    assert iou_matrix(boxes[:1], boxes[1:2])[0, 0] > 0.7 and len(nms(boxes, scores, 0.3)) == 1
    assert mask_nms(boxes, scores, masks, 0.3).tolist() == [0, 1]


@given(st.data(), st.floats(0.1, 0.9))
def test_nms_keeps_a_best_first_set_that_suppresses_everything_else(data, thr):
    b = data.draw(boxes_in(200, 200, n_max=12))
    s = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(b), max_size=len(b))))
    keep = nms(b, s, thr)
    assert len(set(keep.tolist())) == len(keep)
    assert (np.diff(s[keep]) <= 0).all()
    if len(keep) > 1:
        iou = iou_matrix(b[keep], b[keep])
        np.fill_diagonal(iou, 0)
        assert (iou <= thr + 1e-9).all(), "no two kept boxes overlap above the threshold"
    dropped = np.setdiff1d(np.arange(len(b)), keep)
    for i in dropped:  # each dropped box overlaps a kept box scoring at least as high
        assert any(iou_matrix(b[i:i + 1], b[k:k + 1])[0, 0] > thr and s[k] >= s[i] for k in keep)
    np.testing.assert_array_equal(np.sort(nms(b[keep], s[keep], thr)), np.arange(len(keep)))


# -- box formats -----------------------------------------------------------------------------
@st.composite
def drafted_images(draw):
    w, h = draw(st.integers(2, 5000)), draw(st.integers(2, 5000))
    boxes = draw(boxes_in(w, h, n_max=4, min_side=1.0))
    img = drafting_pb2.DraftedImage(image="a.png", width=w, height=h, index=0)
    for x1, y1, x2, y2 in boxes:
        b = img.boxes.add(class_name="obj", score=0.5, head_prob=0.7)
        b.box.x1, b.box.y1, b.box.x2, b.box.y2 = float(x1), float(y1), float(x2), float(y2)
    return img


def _xyxy(img) -> np.ndarray:
    return np.array([[b.box.x1, b.box.y1, b.box.x2, b.box.y2] for b in img.boxes], np.float64).reshape(-1, 4)


def _from_norm(c, w, h) -> list[float]:
    cx, cy, bw, bh = c
    return [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]


@prop
@given(drafted_images())
def test_yolo_lines_read_back_as_the_same_boxes(img):
    lines = formats.yolo_lines(img, {"obj": 0}, polygons=False)
    got = []
    for line in lines:
        r = parse_label_line(line, img.width, img.height, 1)
        assert not isinstance(r, str), (line, r)
        got.append(r[1])
    np.testing.assert_allclose(np.array(got).reshape(-1, 4), _xyxy(img), atol=2e-6 * max(img.width, img.height) + 1e-6)


@prop
@given(drafted_images())
def test_coco_xywh_imports_back_as_the_same_boxes(img):
    anns = formats.coco_annotations(img, 1, 1, {"obj": 1}, polygons=False)
    got = [_from_norm(_box(*a["bbox"], img.width, img.height), img.width, img.height) for a in anns]
    np.testing.assert_allclose(np.array(got).reshape(-1, 4), _xyxy(img), atol=0.011)


@prop
@given(drafted_images())
def test_label_studio_percent_imports_back_as_the_same_boxes(img):
    pred = formats.labelstudio_prediction(img, "v1", polygons=False)
    ids = {r["id"] for r in pred["result"]}
    got = []
    for r in pred["result"]:
        (name, c), = _ls_region(r, "test", None, ids)
        assert name == "obj"
        got.append(_from_norm(c, img.width, img.height))
    np.testing.assert_allclose(np.array(got).reshape(-1, 4), _xyxy(img), atol=1e-6 * 100 * max(img.width, img.height))


# -- the feature-map frame -------------------------------------------------------------------
@prop
@given(st.integers(1, 6000), st.integers(1, 6000), st.sampled_from(["longest_side_pad", "squash"]),
       st.sampled_from([(1024, 64), (224, 14), (518, 37)]), st.data())
def test_frame_cells_and_pixels_round_trip_and_every_pixel_has_a_valid_cell(w, h, resize, enc, data):
    size, cells = enc
    f = FeatureFrame.for_image(w, h, size, resize, cells, cells)
    b = data.draw(boxes_in(w, h, n_max=4, min_side=0.0))
    np.testing.assert_allclose(f.to_pixels(f.to_cells(b)), b, atol=1e-6 * max(w, h))
    x = data.draw(st.floats(0, w, exclude_max=True))
    y = data.draw(st.floats(0, h, exclude_max=True))
    r, c = int(y / f.cell_h), int(x / f.cell_w)
    assert r < f.rows and c < f.cols and f.valid[r, c], "a pixel of the image maps to a cell on the image"
    assert f.to_pixels(np.array([[-5, -5, f.cols + 5, f.rows + 5]]))[0].tolist() == [0, 0, w, h]


# -- the importers' coordinate checks --------------------------------------------------------
json_numbers = st.one_of(st.integers(-10 ** 400, 10 ** 400), st.floats(allow_nan=True, allow_infinity=True),
                         st.booleans(), st.none(), st.text(max_size=3))


@prop
@given(json_numbers, st.floats(1, 1e5))
def test_a_coordinate_is_accepted_in_the_slack_or_refused_by_name(v, size):
    try:
        x = _coord(v, "here", size)
    except InvalidArgument as e:
        assert "here" in str(e)
        return
    assert isinstance(x, float) and -SLACK * size <= x <= (1 + SLACK) * size


@prop
@given(st.fixed_dictionaries({"x": json_numbers, "y": json_numbers, "width": json_numbers, "height": json_numbers},
                             optional={"rotation": json_numbers}))
def test_a_label_studio_rectangle_is_read_or_refused_never_a_crash(value):
    r = {"id": "a", "type": "rectanglelabels", "original_width": 640, "original_height": 480,
         "value": {**value, "rectanglelabels": ["obj"]}}

    class Report:
        def drop(self, why):
            pass

    try:
        out = _ls_region(r, "task 1 result 0", Report(), {"a"})
    except InvalidArgument as e:
        assert "task 1 result 0" in str(e)
        return
    for _, c in out:
        assert all(math.isfinite(v) for v in c)
        if len(c) == 4:  # a box: normalised cx, cy, w, h inside [0, 1]
            cx, cy, bw, bh = c
            assert bw > 0 and bh > 0 and -1e-9 <= cx - bw / 2 and cx + bw / 2 <= 1 + 1e-9
        else:
            assert all(0 <= v <= 1 for v in c)


@pytest.mark.parametrize("v", [10 ** 400, -(10 ** 400)])
def test_a_huge_integer_coordinate_is_refused_not_an_overflow(v):
    with pytest.raises(InvalidArgument, match="not a finite number"):
        _coord(v, "here", 100)
