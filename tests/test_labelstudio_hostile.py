"""Hostile requests to the Label Studio ML backend's HTTP edge: no or wrong credentials, oversize
bodies, deep nesting, foreign image hosts, malformed tasks, webhook floods. Each is refused with
its 4xx and a JSON message naming the problem, and the serving state (model version, rounds,
state.json) is what it was.

The edge and the Backend are real (Flask's test client, the job store, a loopback http.server as
Label Studio's export API). The miner is a stand-in with the one call these requests reach
(get_recipe_set): a trio with a mined set costs over a minute to make, and its drafting must
never be reached here: the stand-in fails the test if an image gets that far.
tests/test_labelstudio_backend.py runs the same edge over the real trio, gunicorn included.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time

import pytest

from clients.labelstudio_app import create_app
from minehead.common.v1 import common_pb2
from minehead.drafts.formats import labelstudio_config
from minehead.labelstudio.backend import Backend
from minehead.labelstudio.client import LabelStudioAPI
from minehead.labelstudio.guard import Credentials, Limits, is_loopback, json_depth
from minehead.miner.v1 import drafting_pb2

CLASSES = ["red_square", "blue_circle"]
CONFIG = labelstudio_config(CLASSES, polygons=False)
SET = "recipeSets/s1"
USER, PASSWORD = "annotator", "s3cret-pw"
LIMITS = Limits(max_body_bytes=64 << 10, max_tasks=50, max_depth=32, webhook_rate=5.0, webhook_burst=12)


class _Miner:
    def __init__(self) -> None:
        self.drafted = []

    def get_recipe_set(self, name: str) -> drafting_pb2.RecipeSet:
        return drafting_pb2.RecipeSet(name=SET, recipe_set_id="s1", classes=CLASSES)

    def draft_images(self, opts, images):
        for path in images:  # every image of these tests must be refused before it gets here
            self.drafted.append(path)
            raise AssertionError(f"a hostile task reached drafting: {path}")
        return iter(())


class _LabelStudio(http.server.BaseHTTPRequestHandler):
    """The export API: holds each export until `release` is set, then answers a malformed one
    (so the round fails at import and must leave the model version alone)."""

    release = threading.Event()
    exports = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).exports.append(self.path)
        self.release.wait(30)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'[{"id": 1, "data": ')

    def log_message(self, *a):
        pass


@pytest.fixture
def edge(tmp_path):
    ls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LabelStudio)
    threading.Thread(target=ls.serve_forever, args=(0.05,), daemon=True).start()
    _LabelStudio.release.clear()
    _LabelStudio.exports.clear()
    miner = _Miner()
    (tmp_path / "images").mkdir()
    backend = Backend(miner, None, recipes=SET, data_dir=tmp_path / "backend", limits=LIMITS,
                      labelstudio=LabelStudioAPI(f"http://127.0.0.1:{ls.server_port}", "tok"),
                      images_root=str(tmp_path / "images"))
    client = create_app(backend, Credentials(USER, PASSWORD), LIMITS).test_client()
    before = _serving(backend)
    yield {"client": client, "backend": backend, "miner": miner, "before": before}
    _LabelStudio.release.set()
    backend.close(grace_s=5)
    ls.shutdown()
    assert not miner.drafted


def _serving(backend) -> tuple:
    return backend.model_version, len(backend.state["rounds"]), backend.state["recipe_set"]


def _auth(user=USER, password=PASSWORD) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _post(client, path, payload=None, raw=None, headers=None):
    r = client.post(path, data=raw if raw is not None else json.dumps(payload),
                    headers={"Content-Type": "application/json", **(_auth() if headers is None else headers)})
    return r.status_code, r.get_json()


def _refused(edge, status, body, code, words):
    assert status == code and body["status"] == "error", (status, body)
    assert words in body["message"], body["message"]
    assert _serving(edge["backend"]) == edge["before"]


@pytest.mark.parametrize("headers", [{}, _auth(password="wrong"), _auth(user="root"), _auth(password=PASSWORD + "x"),
                                     {"Authorization": "Basic !!!not-base64"}, {"Authorization": f"Bearer {PASSWORD}"},
                                     {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()}],
                         ids=["none", "wrong password", "wrong user", "longer password", "garbage", "bearer",
                              "no colon"])
def test_every_route_but_health_needs_the_credentials(edge, headers):
    c = edge["client"]
    for method, path in [("post", "/setup"), ("post", "/predict"), ("post", "/webhook"), ("post", "/train"),
                         ("get", "/versions"), ("get", "/rounds"), ("get", "/"), ("post", "/rounds/x/cancel")]:
        r = getattr(c, method)(path, json={"action": "START_TRAINING", "project": {"id": 1}}, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), (path, r.status_code)
        assert "authentication required" in r.get_json()["message"]
    r = c.get("/health")  # Label Studio and load balancers probe it without credentials
    assert r.status_code == 200 and r.get_json()["model_version"] == SET
    assert c.get("/versions", headers=_auth()).status_code == 200
    assert not _LabelStudio.exports and _serving(edge["backend"]) == edge["before"]


def test_credentials_come_from_flags_then_either_environment_and_need_both():
    assert Credentials.from_env(env={}).enabled is False
    c = Credentials.from_env(env={"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"})
    assert c.check(_auth("u", "p")["Authorization"]) and not c.check(_auth("u", "q")["Authorization"])
    c = Credentials.from_env(env={"MINEHEAD_ML_BACKEND_USER": "m", "MINEHEAD_ML_BACKEND_PASSWORD": "n",
                                  "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"})
    assert c.user == "m" and c.check(_auth("m", "n")["Authorization"])
    assert Credentials.from_env("f", "g", env={"BASIC_AUTH_USER": "u"}).check(_auth("f", "g")["Authorization"])
    with pytest.raises(ValueError, match="both a user and a password"):
        Credentials.from_env(env={"BASIC_AUTH_USER": "u"})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("backend.example")


def test_serve_refuses_a_public_address_without_credentials(monkeypatch, capsys):
    from clients.cli import main

    for k in ("MINEHEAD_ML_BACKEND_USER", "MINEHEAD_ML_BACKEND_PASSWORD", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(k, raising=False)
    assert main(["labelstudio", "serve", "--recipes", SET, "--host", "0.0.0.0"]) == 2
    assert "not a loopback address and no credentials" in capsys.readouterr().err
    assert main(["labelstudio", "serve", "--recipes", SET, "--auth-user", "u"]) == 2
    assert "both a user and a password" in capsys.readouterr().err


def test_serve_without_a_recipe_set_refuses_the_flags_of_training_rounds(capsys):
    """No --recipes: interactive find only; --train-every and --base-dataset would promise rounds."""
    from clients.cli import main

    assert main(["labelstudio", "serve", "--train-every", "5"]) == 2
    err = capsys.readouterr().err
    assert "--train-every" in err and "--recipes SET_OR_JOB" in err
    assert main(["labelstudio", "serve", "--base-dataset", "data/shapes"]) == 2
    assert "--base-dataset" in capsys.readouterr().err


def test_serve_names_a_service_it_cannot_reach_before_any_worker_starts(capsys):
    """A dead miner (or head service) is one line and exit 2, not gunicorn's worker traceback."""
    import socket

    from clients.cli import main

    with socket.socket() as s:  # a loopback port that nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        assert main(["--miner", dead, "labelstudio", "serve", "--recipes", SET]) == 2
        assert f"the miner at {dead} is not reachable" in capsys.readouterr().err
        assert main(["--miner", dead, "labelstudio", "serve"]) == 2  # without a recipe set: the miner alone
        assert f"the miner at {dead} is not reachable" in capsys.readouterr().err
        with socket.socket() as live:
            live.bind(("127.0.0.1", 0))
            live.listen()
            up = f"127.0.0.1:{live.getsockname()[1]}"
            assert main(["--miner", up, "--head", dead, "labelstudio", "serve", "--recipes", SET]) == 2
            err = capsys.readouterr().err
            assert f"the head service at {dead} is not reachable" in err and "--head ADDRESS" in err


def test_oversize_bodies_and_too_many_tasks_are_413(edge):
    c = edge["client"]
    big = json.dumps({"tasks": [], "label_config": CONFIG, "pad": "x" * (LIMITS.max_body_bytes + 1)})
    _refused(edge, *_post(c, "/predict", raw=big), 413, f"the limit is {LIMITS.max_body_bytes}")
    _refused(edge, *_post(c, "/webhook", raw=big), 413, "(--max-body-mb)")
    r = c.post("/predict", input_stream=io.BytesIO(big.encode()), environ_overrides={"wsgi.input_terminated": True},
               headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json", **_auth()})
    _refused(edge, r.status_code, r.get_json(), 413, "(--max-body-mb)")  # chunked: no Content-Length to check
    tasks = [{"id": k, "data": {"image": f"/data/local-files/?d=images/{k}.jpg"}} for k in range(LIMITS.max_tasks + 1)]
    _refused(edge, *_post(c, "/predict", {"tasks": tasks, "label_config": CONFIG}), 413,
             f"{LIMITS.max_tasks + 1} tasks in one request; the limit is {LIMITS.max_tasks}")
    _refused(edge, *_post(c, "/train", {"annotations": tasks, "project": 1}), 413, "annotations in one request")


@pytest.mark.parametrize("depth", [LIMITS.max_depth + 1, 5000, 200000])
def test_deep_nesting_is_400_before_any_work(edge, depth):
    deep = '{"tasks": [], "label_config": "x", "data": ' + "[" * depth + "]" * depth + "}"
    if len(deep) > LIMITS.max_body_bytes:  # the body cap comes first; the parser's own guard is tested below
        _refused(edge, *_post(edge["client"], "/predict", raw=deep), 413, "the limit is")
        return
    _refused(edge, *_post(edge["client"], "/predict", raw=deep), 400, f"nested deeper than {LIMITS.max_depth} levels")
    _refused(edge, *_post(edge["client"], "/webhook", raw=deep), 400, "nested deeper")


def test_json_depth_walks_without_recursion():
    v: list = []
    for _ in range(100000):
        v = [v]
    assert json_depth(v, 40) == 41 and json_depth({"a": [1, {"b": []}]}, 40) == 4 and json_depth(7, 40) == 0


@pytest.mark.parametrize("payload,words", [
    ({"tasks": "not a list", "label_config": CONFIG}, "`tasks` must be a list"),
    ({"tasks": ["a string"], "label_config": CONFIG}, "tasks[0] is not a JSON object"),
    ({"tasks": [{"id": 1, "data": {"image": "x.jpg"}}, {"id": 2}], "label_config": CONFIG}, "tasks[1] has no `data`"),
    ({"tasks": [{"id": "1; DROP", "data": {}}], "label_config": CONFIG}, "tasks[0].id is '1; DROP'"),
    ({"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": "<View>"}, "config"),
    ({"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": CONFIG.replace("red_square", "cat")},
     "not in the recipe set: cat"),
])
def test_malformed_predict_requests_are_400_naming_the_task(edge, payload, words):
    _refused(edge, *_post(edge["client"], "/predict", payload), 400, words)


@pytest.mark.parametrize("path,raw,words", [
    ("/predict", b"{not json", "not valid JSON"),
    ("/predict", b"[1, 2]", "not a JSON object (got list)"),
    ("/predict", b"\xff\xfe", "not valid JSON"),
    ("/webhook", json.dumps({"action": "START_TRAINING", "project": {"id": "abc"}}).encode(), "project.id"),
    ("/webhook", json.dumps({"action": "START_TRAINING"}).encode(), "a Label Studio project id"),
    ("/webhook", json.dumps({"action": ["START_TRAINING"]}).encode(), "expects `action`"),
    ("/train", json.dumps({"annotations": [{"id": 1, "data": {}}], "project": "1; rm"}).encode(), "project"),
    ("/train", json.dumps({"project": 1}).encode(), "`annotations` must be a list"),
])
def test_malformed_bodies_are_400(edge, path, raw, words):
    _refused(edge, *_post(edge["client"], path, raw=raw), 400, words)
    assert not _LabelStudio.exports


def test_foreign_image_hosts_are_refused(edge, caplog):
    """/train: a task whose image lives on another host (or escapes the root) is a 400 and no round;
    /predict: such a task gets an empty prediction scored 0 (one bad task must not fail Label
    Studio's whole batch), nothing is fetched or drafted, and the log names the host."""
    c = edge["client"]
    for ref, words in [("http://elsewhere.example/data/upload/1/x.jpg", "elsewhere.example"),
                       ("https://169.254.169.254/latest/meta-data", "169.254.169.254"),
                       ("/data/local-files/?d=../../etc/passwd", "'..' is not allowed")]:
        task = {"id": 1, "data": {"image": ref}, "annotations": [{"result": []}]}
        _refused(edge, *_post(c, "/train", {"annotations": [task], "project": 1}), 400, words)
        status, body = _post(c, "/predict", {"tasks": [task], "label_config": CONFIG})
        assert status == 200 and body["results"] == [{"model_version": SET, "score": 0.0, "result": []}]
        assert words in caplog.text
    assert not edge["backend"].store.list()[0] and not _LabelStudio.exports


def _wait(cond, limit_s=20.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit_s, "timed out"
        time.sleep(0.02)


def test_a_webhook_flood_coalesces_into_one_round_per_project_then_429(edge):
    """START_TRAINING twelve times for two projects while a round runs: the first starts it, the
    rest queue one next round per project; past the burst, 429 with Retry-After. The round then
    fails (a malformed export): the model version stays, /health and /rounds say so, and the two
    queued rounds run, one after the other."""
    c, b = edge["client"], edge["backend"]
    first = _post(c, "/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
    assert first[0] == 201, first
    _wait(lambda: _LabelStudio.exports)  # the round waits in its export
    answers = [_post(c, "/webhook", {"action": "START_TRAINING", "project": {"id": 1 + k % 2}}) for k in range(11)]
    assert all(s == 202 and body["status"] == "queued" and body["round"] == first[1]["round"] for s, body in answers)
    assert answers[-1][1]["pending"] == [1, 2]
    r = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}}, headers=_auth())
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "too many webhooks" in r.get_json()["message"]
    health = c.get("/health").get_json()
    assert health["rounds"]["running"] == first[1]["round"] and health["rounds"]["pending"] == [1, 2]
    assert _serving(b) == edge["before"] and len(_LabelStudio.exports) == 1
    _LabelStudio.release.set()
    _wait(lambda: len(b.store.list()[0]) == 3 and b.live_round() is None and not b.state["pending"])
    rounds = c.get("/rounds", headers=_auth()).get_json()["rounds"]
    assert [r["state"] for r in rounds] == ["FAILED"] * 3 and sorted(r["request"]["project"] for r in rounds) == [1, 1, 2]
    assert "not valid JSON" in rounds[0]["error"]
    health = c.get("/health", headers=_auth()).get_json()
    assert health["model_version"] == SET and health["rounds"]["last"]["state"] == "FAILED"
    assert "not valid JSON" in health["rounds"]["last"]["error"]
    assert "error" not in c.get("/health").get_json()["rounds"]["last"]  # without credentials: the state only
    assert _serving(b) == edge["before"]


def test_a_cancel_from_another_process_reaches_the_round(edge, tmp_path):
    """Two Backends on one --data-dir, as two gunicorn workers: the second queues (it does not run
    rounds), its cancel reaches the round the first runs, and the model version stays."""
    b = edge["backend"]
    other = Backend(_Miner(), None, recipes=SET, data_dir=b.data_dir, limits=LIMITS, labelstudio=b.labelstudio)
    try:
        assert other.request_round(5)["status"] == "queued"
        _wait(lambda: b.live_round() is not None)  # the runner's poller started it
        live = b.live_round()
        assert live.request["project"] == 5
        other.store.request_cancel(live.name[5:])
        _LabelStudio.release.set()
        _wait(lambda: b.store.get(live.name[5:]).state == common_pb2.Job.CANCELLED)
        assert other.model_version == b.model_version == SET
    finally:
        other.close(grace_s=1)
