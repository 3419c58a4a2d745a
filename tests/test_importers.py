"""`minehead datasets import`: Label Studio exports and COCO files into YOLO folders, read back
with the project's own reader; drafting's own labelstudio.json round-trips; every hostile input
is refused with nothing written. Real files in temporary folders, a real HTTP server on
loopback standing in for Label Studio's file endpoint."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients.cli import main
from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.datasets import load_dataset
from minehead.drafts.folder import DraftFolder
from minehead.importers import import_coco, import_export, import_labelstudio
from minehead.miner.v1 import drafting_pb2
from tests.conftest import png_bytes, scene


def _img(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene(w, h, boxes=())).save(path)
    return path


def _rect(x, y, w, h, label, **kw):
    return {"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": 100,
            "original_height": 100, "value": {"x": x, "y": y, "width": w, "height": h, "rotation": kw.pop("rotation", 0),
                                              "rectanglelabels": [label]}, **kw}


def _task(image, result, **kw):
    return {"data": {"image": image}, "annotations": [{"result": result, "was_cancelled": False}], **kw}


def _by_name(ds):
    return {r.key: (r.class_ids.tolist(), r.boxes) for r in ds.images}


def test_labelstudio_export_written_by_hand(tmp_path):
    root = tmp_path / "ls"
    _img(root / "imgs/a.png", 200, 100)
    _img(root / "imgs/b.jpg", 100, 100)
    c = _img(root / "imgs/c.png", 50, 50)
    tasks = [
        _task("/data/local-files/?d=imgs/a.png", [
            _rect(10, 20, 30, 40, "cat"),
            {"type": "polygonlabels", "value": {"points": [[50, 10], [90, 10], [70, 90]], "polygonlabels": ["dog"]}},
            {"type": "choices", "value": {"choices": ["sunny"]}},
            {"id": "t", "type": "rectangle", "value": {"x": 60, "y": 50, "width": 20, "height": 20}},
            {"id": "t", "type": "labels", "value": {"x": 60, "y": 50, "width": 20, "height": 20, "labels": ["dog"]}}]),
        {"id": 2, "data": {"image": "imgs/b.jpg"}, "annotations": [
            {"updated_at": "2024-01-02T00:00:00Z", "result": [
                _rect(0, 0, 50, 50, "dog"), _rect(60, 10, 20, 30, "cat", rotation=90), _rect(95, 80, 6.5, 20.5, "dog")]},
            {"updated_at": "2024-01-03T00:00:00Z", "was_cancelled": True, "result": [_rect(0, 0, 9, 9, "cat")]},
            {"updated_at": "2024-01-01T00:00:00Z", "result": [_rect(0, 0, 9, 9, "cat")]}]},
        {"id": 3, "data": {"image": "imgs/a.png"}, "predictions": [{"result": [_rect(0, 0, 9, 9, "cat")]}]},
        {"id": 4, "data": {"image": str(c)}, "annotations": [{"result": []}]},  # reviewed: nothing there
        {"id": 5, "data": {"image": "imgs/nope.png"}, "annotations": [{"result": []}]},
    ]
    rep = import_labelstudio(json.dumps(tasks).encode(), tmp_path / "out", root)
    assert (rep.images, rep.boxes, rep.polygons) == (3, 4, 2)
    assert rep.skipped == {"predictions only, never reviewed": ["task 3"],
                           "image not found (%s)" % (root / "imgs/nope.png"): ["task 5"]}
    assert rep.dropped == {"choices results (not boxes or polygons)": 1}
    ds = load_dataset(tmp_path / "out")
    assert ds.classes == ["cat", "dog"] and ds.dropped == []
    got = _by_name(ds)
    assert got["a.png"][0] == [0, 1, 1] and np.allclose(got["a.png"][1], [[20, 20, 80, 60], [100, 10, 180, 90], [120, 50, 160, 70]])
    assert got["b.jpg"][0] == [1, 0, 1] and np.allclose(got["b.jpg"][1], [[0, 0, 50, 50], [30, 10, 60, 30], [95, 80, 100, 100]])
    assert got["c.png"][0] == []
    lines = (tmp_path / "out/labels/a.txt").read_text().splitlines()
    assert [len(ln.split()) for ln in lines] == [5, 7, 5]  # the polygon stays a polygon
    assert "import" in rep.describe() and rep.to_dict()["images"] == 3


def _drafted(index: int, name: str, w: int, h: int, boxes) -> drafting_pb2.DraftedImage:
    img = drafting_pb2.DraftedImage(image=name, width=w, height=h, index=index)
    for cls, (x1, y1, x2, y2), poly in boxes:
        b = img.boxes.add(class_name=cls, head_prob=0.8, score=0.9)
        b.box.x1, b.box.y1, b.box.x2, b.box.y2 = x1, y1, x2, y2
        b.polygon.extend(poly)
    return img


def test_drafts_labelstudio_json_and_coco_round_trip(tmp_path, capsys):
    """What `minehead draft` writes, predictions accepted as annotations, comes back as the
    same dataset (the draft folder's images/ are links to the sources: still importable)."""
    src, draft = tmp_path / "src", tmp_path / "draft"
    classes = ["red_square", "blue_circle"]
    f = DraftFolder(draft, recipe_set="sets/t", classes=classes, head_classes=classes, polygons=True)
    imgs = [_drafted(0, "p.png", 160, 120, [("blue_circle", (10, 20, 60, 80), [10, 50, 35, 20, 60, 50, 35, 80]),
                                            ("red_square", (80, 10, 150, 70), [])]),
            _drafted(1, "q.jpg", 90, 90, [("red_square", (5, 5, 45.5, 40.25), [])])]
    for d in imgs:
        f.add(d, _img(src / d.image, d.width, d.height))
    f.finish({"images": 2})
    tasks = json.loads((draft / "labelstudio.json").read_text())
    for t in tasks:
        t["annotations"] = [{"result": p["result"]} for p in t.pop("predictions")]
    (draft / "reviewed.json").write_text(json.dumps(tasks))
    rc = main(["datasets", "import", str(draft / "reviewed.json"), "-o", str(tmp_path / "ls"),
               "--labelmap", str(draft / "labelstudio_config.xml"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["polygons"] == 1
    want = _by_name(load_dataset(draft))
    for out, fn in ((tmp_path / "ls", None), (tmp_path / "coco", import_coco)):
        if fn:
            fn((draft / "coco.json").read_bytes(), out, draft)
        ds = load_dataset(out)
        assert ds.classes == classes and ds.dropped == []
        got = _by_name(ds)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k][0] == want[k][0] and np.allclose(got[k][1], want[k][1], atol=0.01)
        assert len((out / "labels/p.txt").read_text().splitlines()[0].split()) == 9
        assert not any(p.is_symlink() for p in (out / "images").iterdir())


def test_coco_file(tmp_path):
    root = tmp_path / "coco"
    _img(root / "x.png", 100, 50)
    _img(root / "y.png", 40, 40)
    doc = {"categories": [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}],
           "images": [{"id": 1, "file_name": "x.png", "width": 100, "height": 50},
                      {"id": "two", "file_name": "y.png", "width": 40, "height": 40}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 5, 30, 20]},
               {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 10, 40, 30],
                "segmentation": [[50, 10, 90, 10, 70, 40]]},
               {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10],  # its own corners: a box
                "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
               {"id": 4, "image_id": 1, "category_id": 2, "bbox": [60, 0, 20, 20], "segmentation": [[60, 0, 80, 0, 70, 9], [60, 15, 80, 15, 70, 20]]},
               {"id": 5, "image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 50], "iscrowd": 1}]}
    rep = import_export(json.dumps(doc).encode(), tmp_path / "out", root)
    assert (rep.images, rep.boxes, rep.polygons) == (2, 3, 1)
    assert rep.dropped == {"multi-part segmentations written as their box": 1, "crowd annotations": 1}
    ds = load_dataset(tmp_path / "out")
    assert ds.classes == ["cat", "dog"]  # the file's category order, not the ids'
    got = _by_name(ds)
    assert got["x.png"][0] == [1, 0, 0, 1]
    assert np.allclose(got["x.png"][1], [[10, 5, 40, 25], [50, 10, 90, 40], [0, 0, 10, 10], [60, 0, 80, 20]])
    assert got["y.png"][0] == []


class _FakeLabelStudio(http.server.BaseHTTPRequestHandler):
    """Label Studio's file endpoints as far as the importer sees them: token-checked images."""
    seen: list = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.invalid/a.png")
            self.end_headers()
        elif self.path.startswith("/data/upload/") and self.headers.get("Authorization") == "Token sekrit":
            body = png_bytes(scene(30, 20, boxes=()))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404 if self.headers.get("Authorization") else 401)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_ls():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _FakeLabelStudio.seen = []
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def test_images_fetched_only_from_the_labelstudio_host_with_its_token(tmp_path, fake_ls):
    box = [_rect(10, 10, 50, 50, "cat")]
    tasks = [_task("/data/upload/3/e1f2-a.png", box), _task(f"{fake_ls}/data/upload/3/b.png", box),
             _task(f"{fake_ls}/moved.png", box), _task("/data/upload/3/missing.txt", box)]
    tasks[3]["data"]["image"] = "/data/nothing/here.png"
    rep = import_labelstudio(json.dumps(tasks).encode(), tmp_path / "out", tmp_path, labelstudio_url=fake_ls,
                             token="sekrit")
    assert rep.images == 2 and rep.boxes == 2
    assert list(rep.skipped) == ["HTTP 302 from Label Studio (redirects are not followed)", "HTTP 404 from Label Studio"]
    assert all(auth == "Token sekrit" for _, auth in _FakeLabelStudio.seen)
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == ["b.png", "e1f2-a.png"]
    assert len(load_dataset(tmp_path / "out").images) == 2
    # one foreign URL anywhere refuses the whole file before a single request is made
    _FakeLabelStudio.seen = []
    with pytest.raises(InvalidArgument, match="elsewhere.example"):
        import_labelstudio(json.dumps(tasks + [_task("http://elsewhere.example/a.png", box)]).encode(),
                           tmp_path / "out2", tmp_path, labelstudio_url=fake_ls, token="sekrit")
    assert _FakeLabelStudio.seen == [] and not (tmp_path / "out2").exists()


def _hostile():
    box = [_rect(10, 10, 20, 20, "cat")]
    ls = "http://127.0.0.1:8080"
    cases = [
        ("traversal", [_task("../secret.png", box)], {}, "'..' is not allowed"),
        ("traversal in local-files", [_task("/data/local-files/?d=imgs/../../etc/passwd", box)], {}, "'..' is not allowed"),
        ("absolute outside", [_task("/etc/passwd", box)], {}, "absolute and outside the images root"),
        ("backslashes", [_task("C:\\imgs\\a.png", box)], {}, "backslashes"),
        ("other host", [_task("http://evil.example/a.png", box)], {"labelstudio_url": ls}, "on host 'evil.example'"),
        ("other port", [_task("http://127.0.0.1:9999/a.png", box)], {"labelstudio_url": ls}, "only http://127.0.0.1:8080"),
        ("no instance given", [_task(f"{ls}/data/upload/1/a.png", box)], {}, "none without --labelstudio-url"),
        ("other scheme", [_task("s3://bucket/a.png", box)], {}, "scheme 's3'"),
        ("malformed", b'[{"data": ', {}, "not valid JSON"),
        ("NaN token", b'[{"data": {"image": "imgs/a.png"}, "annotations": [{"result": [{"type": "rectanglelabels", '
                      b'"value": {"x": NaN, "y": 1, "width": 2, "height": 2, "rectanglelabels": ["cat"]}}]}]}]', {}, "NaN"),
        ("far outside", [_task("imgs/a.png", [_rect(500, 10, 20, 20, "cat")])], {}, "far outside 0..100"),
        ("not a number", [_task("imgs/a.png", [_rect("10", 10, 20, 20, "cat")])], {}, "not a finite number"),
        ("unknown label", [_task("imgs/a.png", [_rect(10, 10, 20, 20, "wolf")])], {"labelmap": ["cat"]}, "'wolf' are not in the labelmap"),
        ("reserved label", [_task("imgs/a.png", [_rect(10, 10, 20, 20, "__bg_0")])], {}, "reserved"),
        ("not a task list", {"tasks": []}, {"fn": import_labelstudio}, "JSON list of tasks"),
        ("coco overflow", b'{"categories": [{"id": 1, "name": "cat"}], "images": [{"id": 1, "file_name": "imgs/a.png", "width": 9, '
                          b'"height": 9}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1e999, 0, 1, 1]}]}',
         {}, "coordinate inf is not a finite number"),
        ("coco unknown category", {"categories": [], "images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]},
         {}, "unknown image_id"),
        ("nothing usable", [{"data": {"image": "imgs/a.png"}, "predictions": [{"result": box}]}], {}, "nothing to import"),
    ]
    return [pytest.param(doc, kw, words, id=name) for name, doc, kw, words in cases]


@pytest.mark.parametrize("doc,kw,words", _hostile())
def test_hostile_inputs_are_refused_and_nothing_is_written(tmp_path, doc, kw, words):
    _img(tmp_path / "root/imgs/a.png", 40, 40)
    dest = tmp_path / "dest"
    dest.mkdir()
    fn = kw.pop("fn", import_export)
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(InvalidArgument, match=words.replace("(", r"\(").replace(".", r"\.")):
        fn(data, dest / "out", tmp_path / "root", **kw)
    assert list(dest.iterdir()) == []


def test_json_over_the_size_cap_and_a_full_output_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="the limit is 67108864"):
        import_export(b"[" + b" " * (64 << 20) + b"]", tmp_path / "out", tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="not empty"):
        import_export(b"[]", tmp_path / "full", tmp_path)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_cli_prints_the_refusal_and_exits_1(tmp_path, capsys):
    src = tmp_path / "export.json"
    src.write_text(json.dumps([_task("../../etc/passwd", [_rect(1, 1, 5, 5, "cat")])]))
    assert main(["datasets", "import", str(src), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: task #0: image path '../../etc/passwd'") and "'..'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json"]


def test_the_cli_called_in_process_leaves_the_callers_sigpipe_alone(capsys):
    # `minehead` restores SIGPIPE's default for `| head` in its console entry only: main() once did
    # it itself, and a pytest run that had called it died of the next write to a closed socket
    import signal

    before = signal.getsignal(signal.SIGPIPE)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert signal.getsignal(signal.SIGPIPE) == before == signal.SIG_IGN
