"""The locator's refiner (minehead.locator.refiner): exact pooling, a fit that moves jittered
boxes onto objects and scores good boxes above bad ones, its part of the locator's ONNX graph
(parity, the two sessions, detect), and the bundle's checks of it.

Real parts: the linear map is fitted for real on small synthetic feature maps (the toy maps of
test_locator: objects visible in two channels), the graph runs in onnxruntime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from minehead import roi
from minehead.core.errors import InvalidArgument
from minehead.geometry import iou_matrix, nms
from minehead.heads.bundle import HeadBundle, meta_json
from minehead.locator import export, refiner
from minehead.locator.decode import decode
from minehead.locator.frame import FeatureFrame
from minehead.locator.model import Locator
from minehead.locator.refiner import REFINED_NMS_IOU
from tests.test_locator import _bundle_files, _toy_maps, toy_locator  # noqa: F401 - the fixture


def _jitter(boxes, rng, shift=0.2, scale=0.3):
    wh = boxes[:, 2:] - boxes[:, :2]
    c = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.normal(0, shift, wh.shape) * wh
    wh = wh * np.exp(rng.normal(0, scale, wh.shape))
    return np.concatenate([c - wh / 2, c + wh / 2], 1)


@pytest.fixture(scope="module")
def fitted():
    data = _toy_maps(20, 0)
    ref = refiner.fit([m for m, _, _ in data], [f for _, f, _ in data], [b for _, _, (b, _) in data], seed=0)
    return ref, data


def test_pooling_is_the_exact_area_mean_of_the_image_cells():
    """Fractional boxes, boxes over the padding and off the image: the same means as
    roi.pool_regions (area-weighted, padding excluded), which sums cell by cell."""
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(5, 16, 16)).astype(np.float32)
    frame = FeatureFrame.for_image(300, 200, 256, "longest_side_pad", 16, 16)  # the bottom third is padding
    boxes = np.concatenate([rng.uniform(0, 280, (40, 2)), np.zeros((40, 2))], 1)
    boxes[:, 2:] = boxes[:, :2] + rng.uniform(3, 90, (40, 2))
    boxes[0] = [250, 150, 400, 260]  # past the image's right and bottom edges
    got = refiner.pooler(fmap, frame).pool(boxes)
    clipped = np.clip(boxes, 0, [300, 200, 300, 200])
    want = roi.pool_regions(fmap, clipped * frame.scale_x, frame.stride_x, (200 * frame.scale_y, 300 * frame.scale_x))
    assert np.abs(got - want).max() < 1e-4


def test_the_refiner_moves_jittered_boxes_onto_unseen_objects(fitted):
    ref, _ = fitted
    rng = np.random.default_rng(5)
    before, after = [], []
    for m, frame, (gt, _) in _toy_maps(10, 42):
        j = _jitter(gt, rng)
        moved, _ = refiner.refine(ref, refiner.pooler(m, frame), frame, j)
        before += list(np.diag(iou_matrix(j, gt)))
        after += list(np.diag(iou_matrix(moved, gt)))
    before, after = np.array(before), np.array(after)
    assert np.median(after) >= np.median(before) + 0.1, (np.median(before), np.median(after))
    assert (after >= 0.5).mean() > (before >= 0.5).mean()


def test_quality_ranks_an_objects_box_above_a_box_beside_it(fitted):
    ref, _ = fitted
    good, bad = [], []
    rng = np.random.default_rng(6)
    for m, frame, (gt, _) in _toy_maps(10, 43):
        pool = refiner.pooler(m, frame)
        good += list(ref.outputs(refiner.box_features(pool, frame, gt))[1])
        wh = gt[:, 2:] - gt[:, :2]
        off = gt + np.concatenate([wh, wh], 1) * rng.choice([-0.8, 0.8], (len(gt), 1))  # beside, same size
        bad += list(ref.outputs(refiner.box_features(pool, frame, np.clip(off, 0, frame.image_width)))[1])
    good, bad = np.array(good), np.array(bad)
    auc = (good[:, None] > bad[None]).mean()
    assert auc >= 0.85, auc


def test_too_few_objects_fit_no_refiner():
    data = _toy_maps(1, 3)[:1]
    m, f, (b, _) = data[0]
    assert refiner.fit([m], [f], [b[:refiner.MIN_OBJECTS - 1]]) is None


def _meta_section(ref):
    return {"grid": refiner.GRID, "context": refiner.CONTEXT, "iterations": refiner.ITERATIONS,
            "in_features": ref.in_features, "classes": ["a"]}


def test_the_refiner_is_a_part_of_the_locator_graph_and_detect_uses_it(toy_locator, fitted):  # noqa: F811
    net = toy_locator[0]
    ref, data = fitted
    maps = [m for m, _, _ in data[:4]]
    onnx_bytes = export.to_onnx(net, ref)
    feats = refiner.box_features(refiner.pooler(data[0][0], data[0][1]), data[0][1], data[0][2][0])
    assert export.parity(net, onnx_bytes, maps, ref, feats) <= 1e-4
    loc_part, ref_part = export.parts(onnx_bytes)
    assert ref_part is not None and export.parts(export.to_onnx(net))[1] is None
    loc = Locator(onnx_bytes, {"in_channels": 6, "classes": ["a"], "refiner": _meta_section(ref)})
    m, frame, _ = data[5]
    d = loc.detect(m, frame, 0.05)
    # by hand: the peaks, refined by the numpy map, scored peak x quality, NMS
    raw = decode(*loc.run(m), frame, 0.05)
    boxes, q = refiner.refine(ref, refiner.pooler(m, frame), frame, raw.boxes)
    scores = raw.scores * q
    keep = nms(boxes, scores, REFINED_NMS_IOU)
    assert len(d) == len(keep) and len(d) > 0
    assert np.allclose(d.boxes, boxes[keep], atol=1e-3) and np.allclose(d.scores, scores[keep], atol=1e-5)
    assert np.all(np.diff(d.scores) <= 0)
    # a class the refiner does not refine keeps its peaks as decoded (here: the only class)
    loc.meta["refiner"]["classes"] = []
    assert loc.refined_classes == []
    plain = loc.detect(m, frame, 0.05)
    assert np.array_equal(plain.boxes, raw.boxes) and np.array_equal(plain.scores, raw.scores)


def _refined_bundle(net, ref, **meta_changes):
    onnx_loc = export.to_onnx(net, ref)
    files = _bundle_files(onnx_loc)
    meta = json.loads(files["meta.json"])
    meta["locator"]["refiner"] = _meta_section(ref)
    for k, v in meta_changes.items():
        if k == "no_refiner_section":
            meta["locator"].pop("refiner")
        else:
            meta["locator"]["refiner"][k] = v
    files["meta.json"] = meta_json(meta)
    return files


def test_a_bundle_with_a_refiner_loads_and_hostile_ones_are_refused(toy_locator, fitted):  # noqa: F811
    net = toy_locator[0]
    ref, _ = fitted
    b = HeadBundle.from_files(_refined_bundle(net, ref))
    assert b.locator.has_refiner
    again = HeadBundle.from_zip(b.to_zip())
    assert again.head_id == b.head_id
    with pytest.raises(InvalidArgument, match="box_features input exactly when"):
        HeadBundle.from_files(_refined_bundle(net, ref, no_refiner_section=True))
    with pytest.raises(InvalidArgument, match="refines with grid 3"):
        HeadBundle.from_files(_refined_bundle(net, ref, grid=4))
    with pytest.raises(InvalidArgument, match="refiner.classes must list some"):
        HeadBundle.from_files(_refined_bundle(net, ref, classes=["b"]))
    # a refiner section beside a graph without the refiner's part
    files = _bundle_files(export.to_onnx(net))
    meta = json.loads(files["meta.json"])
    meta["locator"]["refiner"] = _meta_section(ref)
    files["meta.json"] = meta_json(meta)
    with pytest.raises(InvalidArgument, match="the graph has none"):
        HeadBundle.from_files(files)
