"""Head internals without gRPC: keep rule, sampling, split, estimators, ONNX export, bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minehead import sampling
from minehead.heads.bundle import HeadBundle, content_id
from head_svc.estimators import LogRegHead, MLPHead, fit_temperature, smooth_targets
from minehead.heads.keep_rule import (KEEP, REJECT_BACKGROUND, REJECT_LOW_PROB, REJECT_MARGIN, Thresholds, apply_keep_rule)
from minehead.heads.onnx_export import export_head, parity
from minehead.core.errors import InvalidArgument


# classes: 0 cat, 1 dog, 2 __bg_0, 3 __bg_1
@pytest.mark.parametrize("p,t,decision", [
    ([0.6, 0.3, 0.05, 0.05], Thresholds(0.5, 0.0, True, 0.0), KEEP),
    ([0.4, 0.3, 0.2, 0.1], Thresholds(0.5, 0.0, True, 0.0), REJECT_LOW_PROB),
    ([0.55, 0.45, 0.0, 0.0], Thresholds(0.5, 0.2, True, 0.0), REJECT_MARGIN),
    # the background class is not "other" for the margin check: 0.5 - 0.1 passes margin 0.2
    ([0.5, 0.1, 0.4, 0.0], Thresholds(0.5, 0.2, False, 0.0), KEEP),
    # guard on, margin 0: reject if any background class scores higher
    ([0.45, 0.0, 0.55, 0.0], Thresholds(0.4, 0.0, True, 0.0), REJECT_BACKGROUND),
    ([0.5, 0.0, 0.45, 0.05], Thresholds(0.4, 0.0, True, 0.1), REJECT_BACKGROUND),
    ([0.5, 0.0, 0.35, 0.15], Thresholds(0.4, 0.0, True, 0.1), KEEP),
    ([0.45, 0.0, 0.55, 0.0], Thresholds(0.4, 0.0, False, 0.0), KEEP),
    # the first failing check names the decision
    ([0.3, 0.3, 0.4, 0.0], Thresholds(0.5, 0.1, True, 0.0), REJECT_LOW_PROB),
])
def test_keep_rule(p, t, decision):
    r = apply_keep_rule(np.array([p]), np.array([0]), t, [2, 3])
    assert r.decision[0] == decision


def test_keep_rule_without_background_classes_never_rejects_as_background():
    r = apply_keep_rule(np.array([[0.6, 0.4]]), np.array([0]), Thresholds(0.5, 0.0, True, 0.5), [])
    assert r.decision[0] == KEEP and r.best_background[0] == 0


def test_background_boxes_avoid_objects_including_small_inside_large():
    # A 10x10 candidate inside a 200x200 object has IoU 0.0025 but covers the object fully.
    assert sampling.intersection_over_candidate(np.array([50, 50, 60, 60.]), np.array([[0, 0, 200, 200.]]))[0] == 1.0
    rng = np.random.default_rng(0)
    objects = np.array([[10, 10, 110, 110], [200, 50, 300, 150]], float)
    boxes = sampling.sample_background_boxes(320, 240, objects, 20, rng)
    assert len(boxes) > 5
    padded = objects + np.array([-8, -8, 8, 8])
    for b in boxes:
        assert sampling.intersection_over_candidate(b, padded).max() == 0
        w, h = b[2] - b[0], b[3] - b[1]
        assert 0.08 * 320 - 1e-6 <= w <= 0.40 * 320 + 1e-6 and 0.08 * 240 - 1e-6 <= h <= 0.40 * 240 + 1e-6


def test_misaligned_boxes_are_the_background_of_an_image_the_objects_fill():
    """A wall of touching 80 x 80 objects: no box fits between them, so the background is boxes
    at their scale that match none of them (IoU < 0.3): pairs, halves, fragments."""
    from minehead.geometry import iou_matrix

    objects = np.array([[x, y, x + 80, y + 80] for x in range(0, 320, 80) for y in range(0, 240, 80)], float)
    rng = np.random.default_rng(0)
    assert len(sampling.sample_background_boxes(320, 240, objects, 3, rng)) == 0
    boxes = sampling.sample_misaligned_boxes(320, 240, objects, 40, rng)
    assert len(boxes) == 40
    for b in boxes:
        assert iou_matrix(b, objects).max() < 0.3
        assert (b[:2] >= 0).all() and b[2] <= 320 and b[3] <= 240
        assert 0.15 * 80 - 1e-6 <= min(b[2] - b[0], b[3] - b[1]) and max(b[2] - b[0], b[3] - b[1]) <= 2.5 * 80 + 1e-6
    assert len(sampling.sample_misaligned_boxes(320, 240, np.zeros((0, 4)), 5, rng)) == 0


def _field_with_things(seed: int = 0):
    """A 320 x 240 noisy field with slow shading, two labelled 40 x 40 squares, and two
    unlabelled things: a grey 30 x 16 ellipse and a brown 24 x 24 square."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320]
    base = np.array([90, 160, 90.]) + 25 * (np.sin(xx / 40) * np.cos(yy / 50))[..., None]
    im = Image.fromarray((base + rng.normal(0, 14, (240, 320, 3))).clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    objects = np.array([[30, 30, 70, 70], [200, 150, 240, 190]], float)
    for b in objects:
        d.rectangle(list(b), fill=(214, 44, 38))
    things = np.array([[150, 60, 180, 76], [60, 170, 84, 194]], float)
    d.ellipse(list(things[0]), fill=(128, 128, 128))
    d.rectangle(list(things[1]), fill=(120, 92, 60))
    return np.asarray(im), objects, things


def test_thing_boxes_land_on_unlabelled_things_and_never_on_labelled_objects():
    from minehead.geometry import iou_matrix

    pixels, objects, things = _field_with_things()
    padded = objects + np.array([-3.2, -3.2, 3.2, 3.2])  # 0.08 of 40 px
    hits = 0
    for seed in range(10):
        boxes = sampling.sample_thing_boxes(pixels, objects, 3, np.random.default_rng(seed))
        assert 1 <= len(boxes) <= 3
        for b in boxes:
            assert sampling.intersection_over_candidate(b, padded).max() == 0
            assert (b[:2] >= 0).all() and b[2] <= 320 and b[3] <= 240
            assert 0.8 * 40 - 1e-6 <= b[2] - b[0] <= 1.25 * 40 + 1e-6
        # Each thing's centre inside some box: the two things are what this samples, not the field.
        centres = (things[:, :2] + things[:, 2:]) / 2
        hits += sum(any((b[0] <= c[0] <= b[2]) and (b[1] <= c[1] <= b[3]) for b in boxes) for c in centres)
        assert iou_matrix(boxes, boxes)[np.triu_indices(len(boxes), 1)].max(initial=0) <= 0.3
    # 14-16 of 20 over five fields measured; a random box of this size holds a given thing's
    # centre ~2 % of the time (about 1 of 20 expected).
    assert hits >= 10, hits
    assert len(sampling.sample_thing_boxes(pixels, np.zeros((0, 4)), 3, np.random.default_rng(0))) == 0


def test_thing_maps_peak_on_things_not_beside_labelled_objects():
    pixels, objects, things = _field_with_things()
    m = sampling.thing_maps(pixels, [(20, 20)], objects, step=4)[0]
    y, x = np.unravel_index(np.argmax(m), m.shape)
    cx, cy = (x + 0.5) * 4, (y + 0.5) * 4
    assert any(t[0] - 8 <= cx <= t[2] + 8 and t[1] - 8 <= cy <= t[3] + 8 for t in things), (cx, cy)
    # With the objects not excluded, their surroundings light up instead (why they are excluded).
    m0 = sampling.thing_maps(pixels, [(20, 20)], step=4)[0]
    y, x = np.unravel_index(np.argmax(m0), m0.shape)
    cx, cy = (x + 0.5) * 4, (y + 0.5) * 4
    assert any(o[0] - 24 <= cx <= o[2] + 24 and o[1] - 24 <= cy <= o[3] + 24 for o in objects), (cx, cy)


def test_group_split_keeps_every_class_on_both_sides():
    rng = np.random.default_rng(0)
    imgs = [{int(c) for c in rng.choice(5, rng.integers(1, 3), replace=False)} for _ in range(30)] + [{5}, {5}, {6}]
    train, hold, notes = sampling.group_split(imgs, 0.25, rng, [f"c{i}" for i in range(7)])
    assert not set(train) & set(hold) and len(train) + len(hold) == len(imgs)
    for c in range(6):
        assert any(c in imgs[i] for i in train) and any(c in imgs[i] for i in hold), c
    assert any("c6" in n and "no held-out" in n for n in notes)


def _blobs(n=400, c=4, d=32, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 2
    y = rng.integers(0, c, n)
    return centres[y] + rng.normal(size=(n, d)) * noise, y


def test_soft_targets_change_logreg_and_one_hot_targets_equal_hard_labels():
    X, y = _blobs()
    hard = LogRegHead().fit(X, y, 4)
    onehot = LogRegHead().fit(X, y, 4, targets=np.eye(4)[y])
    np.testing.assert_allclose(hard.predict_proba(X), onehot.predict_proba(X), atol=2e-3)
    smooth = LogRegHead().fit(X, y, 4, targets=smooth_targets(y, 4, 0.15))
    # smoothing softens the most confident predictions
    assert smooth.predict_proba(X).max(1).mean() < hard.predict_proba(X).max(1).mean()


@pytest.mark.parametrize("head", [LogRegHead(), MLPHead(hidden_sizes=(32, 16), max_epochs=40, margin_loss=0.3)])
def test_onnx_graph_equals_the_trained_head(head):
    X, y = _blobs(noise=2.5)
    head.fit(X[:300], y[:300], 4)
    head.temperature_ = fit_temperature(head.logits(X[300:]), y[300:])
    assert head.temperature_ > 0
    onnx_bytes = export_head(head)
    assert parity(head, onnx_bytes, X[300:]) <= 1e-5


def test_temperature_calibration_lowers_held_out_loss():
    X, y = _blobs(noise=3.0, seed=2)
    head = LogRegHead(C=100.0).fit(X[:200], y[:200], 4)  # weakly regularised: over-confident
    Lh = head.logits(X[200:])
    T = fit_temperature(Lh, y[200:])

    def nll(t):
        from scipy.special import log_softmax
        return -log_softmax(Lh / t, 1)[np.arange(len(Lh)), y[200:]].mean()

    assert nll(T) <= nll(1.0)


def test_bundle_roundtrip_and_content_id():
    from minehead.heads.bundle import bundle_from_head

    classes = ["cat", "dog", "__bg_0"]
    X, y = _blobs(n=120, c=3, d=8)
    b = bundle_from_head(LogRegHead().fit(X, y, 3), classes, "m")
    files = b.files()
    assert b.head_id == content_id(files["head.onnx"], {k: v for k, v in json.loads(files["meta.json"]).items()})
    again = HeadBundle.from_zip(b.to_zip())
    assert again.head_id == b.head_id and again.classes == classes and again.background_indices == [2]
    assert again.predict_proba(np.ones((3, 8))).shape == (3, 3)
    with pytest.raises(InvalidArgument, match="background classes must come last"):
        bundle_from_head(LogRegHead().fit(X, y, 3), ["cat", "__bg_0", "dog"], "m")
    assert b.object_sides is None  # a head from before sizes were recorded: every anchor size
    sized = bundle_from_head(LogRegHead().fit(X, y, 3), classes, "m", dataset={"object_sides": [0.05, 0.1, 0.4]})
    assert HeadBundle.from_zip(sized.to_zip()).object_sides == [0.05, 0.1, 0.4]
    for bad in ([0.1, 0.05, 0.4], [0.0, 0.1, 0.4], [0.1, 0.2, 1.5], [0.1, 0.2], ["a", "b", "c"], 0.1):
        with pytest.raises(InvalidArgument, match="object_sides"):
            bundle_from_head(LogRegHead().fit(X, y, 3), classes, "m", dataset={"object_sides": bad})
    # the training images' sha256 prefixes (what mining checks its report images against)
    assert b.training_images is None
    ids = ["0123456789abcdef", "fedcba9876543210"]
    known = bundle_from_head(LogRegHead().fit(X, y, 3), classes, "m", dataset={"image_sha256": ids})
    assert HeadBundle.from_zip(known.to_zip()).training_images == frozenset(ids)
    for bad in (["0123456789ABCDEF"], ["0123"], ["0123456789abcdeg"], [7], "0123456789abcdef"):
        with pytest.raises(InvalidArgument, match="image_sha256"):
            bundle_from_head(LogRegHead().fit(X, y, 3), classes, "m", dataset={"image_sha256": bad})



def test_mlp_fits_side_by_side_are_their_seeds_own():
    """Dropout masks come from the fit's generator, not torch's process-wide one: an MLP fitted
    while another fit runs in a thread has the weights it has when fitted alone."""
    import threading

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)

    def fitted(seed):
        return MLPHead(hidden_sizes=(32,), dropout=0.3, max_epochs=15, patience=100, seed=seed).fit(X, y, 2)

    alone = fitted(1).layers()
    out = {}
    others = [threading.Thread(target=lambda k=k: out.__setitem__(k, fitted(k + 10))) for k in range(2)]
    for t in others:
        t.start()
    beside = fitted(1).layers()
    for t in others:
        t.join()
    for (wa, ba, _), (wb, bb, _) in zip(alone, beside):
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(ba, bb)


def test_crops_are_embedded_several_images_at_once_each_row_in_its_place(tmp_path):
    """training.prepare keeps IN_FLIGHT EmbedCrops calls open (answers may finish out of order):
    every embedding must land on its own image's row, and the boxes drawn (the rng's order) must
    be those of one call at a time."""
    import hashlib
    import threading
    import time
    import types

    from head_svc import training
    from minehead.crops import CropPolicy
    from minehead.datasets import load_dataset
    from minehead.synth import make_synthetic_dataset

    ds = load_dataset(make_synthetic_dataset(tmp_path / "shapes", images=9, seed=4))
    model = types.SimpleNamespace(id="m", dim=5, weights_sha256="w")
    tag = lambda data: hashlib.sha256(data).digest()[0]  # noqa: E731 (which image)

    class Embeds:
        def __init__(self, delay):
            self.hits = self.calls = self.open = self.most = 0
            self.client, self.delay, self.lock, self.sent = object(), delay, threading.Lock(), []

        def model_info(self, _):
            return model

        def embed(self, data, boxes, policy, m):
            with self.lock:
                self.calls += 1
                self.open += 1
                self.most = max(self.most, self.open)
                self.sent.append((tag(data), np.asarray(boxes).copy()))
            time.sleep(self.delay(data))
            with self.lock:
                self.open -= 1
            return np.column_stack([np.full(len(boxes), tag(data)), np.asarray(boxes)]).astype(np.float32)

    ctx = types.SimpleNamespace(phase=lambda *_: None, progress=lambda *_, **__: None, log=lambda *_: None,
                                warn=lambda *_: None, check_cancelled=lambda: None, metrics=lambda *_: None)
    args = dict(model="", classes=[], background_classes=2, holdout_fraction=0.25, seed=3, policy=CropPolicy())
    first = ds.images[0].path.read_bytes()
    slow_first = Embeds(lambda d: 2.0 if d == first else 0.0)  # the first answer comes last
    p = training.prepare(ds, ctx, slow_first, **args)
    assert slow_first.most >= 2
    tags = [tag(rec.path.read_bytes()) for rec in ds.images]
    assert [int(t) for t in p.X[:, 0]] == [tags[g] for g in p.group]  # each row from its own image
    sent = {t: b for t, b in slow_first.sent}
    assert all(np.isclose(sent[tags[g]], row[1:5], atol=1e-3).all(axis=1).any() for row, g in zip(p.X, p.group))
    one_at_a_time = Embeds(lambda d: 0.0)
    q = training.prepare(ds, ctx, one_at_a_time, **args)
    assert [b.tolist() for _, b in slow_first.sent] == [b.tolist() for _, b in one_at_a_time.sent]  # the same draws
    assert np.array_equal(p.X, q.X) and np.array_equal(p.y, q.y) and np.array_equal(p.group, q.group)
