"""A real Label Studio (pip label-studio==1.23.2, SQLite in a temporary folder, loopback only)
against minehead: the drafts `minehead draft` writes are imported as they are, minehead serves
as the project's ML backend (`minehead labelstudio serve`, a real process), predicts new tasks,
takes corrected annotations, trains a round when Label Studio says START_TRAINING, and the next
predictions carry the new model version.

Label Studio and its SDK live in var/ls-venv (`make labelstudio-env`, which `make test` runs);
the SDK calls go through tests/labelstudio_sdk.py in that venv (see there why). Deselect with
`-m "not labelstudio"` on a machine without it.

A second backend started without a recipe set serves Label Studio's interactive mode: the
rectangle an annotator draws reaches it through Label Studio's own
/api/ml/{id}/interactive-annotating (the call Label Studio's browser app makes with
auto-annotation on), and training asked of it is refused naming --recipes.

The backend asks for HTTP basic auth (BASIC_AUTH_USER/BASIC_AUTH_PASS, label-studio-ml-backend's
names) and Label Studio's ML backend connection carries the same credentials, as on a shared
instance; a call without them is refused.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from minehead.client.heads import HeadClient
from minehead.client.miner import MinerClient
from minehead.datasets import load_dataset
from minehead.head.v1 import head_pb2
from minehead.miner.v1 import miner_pb2
from minehead.synth import make_synthetic_dataset
from tests.bench.trio import Trio
from tests.conftest import REPO, stop_processes

pytestmark = pytest.mark.labelstudio
LS_VENV = Path(os.environ.get("MINEHEAD_LS_VENV", REPO / "var" / "ls-venv"))
CLASSES = ["red_square", "blue_circle"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ML_USER, ML_PASSWORD = "labelstudio", secrets.token_urlsafe(16)
ML_AUTH = {"Authorization": "Basic " + base64.b64encode(f"{ML_USER}:{ML_PASSWORD}".encode()).decode()}


def _http(url: str, payload=None, timeout=30, auth=True):
    req = urllib.request.Request(url, data=json.dumps(payload).encode() if payload is not None else None,
                                 headers={"Content-Type": "application/json", **(ML_AUTH if auth else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_up(url: str, proc: subprocess.Popen, log: Path, limit_s: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} not up after {limit_s} s:\n{log.read_text()[-3000:]}")


class SDK:
    """tests/labelstudio_sdk.py in the Label Studio venv, one JSON line per call."""

    def __init__(self, url: str, token: str) -> None:
        self.p = subprocess.Popen([str(LS_VENV / "bin" / "python"), str(REPO / "tests" / "labelstudio_sdk.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, LS_URL=url, LS_TOKEN=token))

    def __call__(self, op: str, **kw):
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        out = json.loads(self.p.stdout.readline())
        assert "error" not in out, f"SDK {op}: {out['error']}"
        return out["ok"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(10)


def _gt_result(ds, rec) -> list[dict]:
    """A reviewer's corrected annotation: the ground truth of the set's classes, as boxes."""
    W, H = rec.width, rec.height
    return [{"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": W, "original_height": H,
             "value": {"x": 100 * b[0] / W, "y": 100 * b[1] / H, "width": 100 * (b[2] - b[0]) / W,
                       "height": 100 * (b[3] - b[1]) / H, "rotation": 0, "rectanglelabels": [ds.classes[c]]}}
            for c, b in zip(rec.class_ids.tolist(), rec.boxes.tolist()) if ds.classes[c] in CLASSES]


@pytest.fixture(scope="module")
def live(tmp_path_factory, models_dir):
    if not (LS_VENV / "bin" / "label-studio").is_file():
        pytest.fail(f"no Label Studio in {LS_VENV}: run `make labelstudio-env` (make test does), "
                    "or deselect these tests with -m 'not labelstudio'")
    tmp = tmp_path_factory.mktemp("lslive")
    docroot = tmp / "docroot"  # Label Studio's local-files document root: the draft folder and new images
    token, ls_port = secrets.token_hex(20), _free_port()
    ls_url = f"http://127.0.0.1:{ls_port}"
    ls_log = tmp / "label-studio.log"
    env = dict(os.environ, LABEL_STUDIO_USERNAME="reviewer@example.com", LABEL_STUDIO_PASSWORD="minehead-test-pw",
               LABEL_STUDIO_USER_TOKEN=token, LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
               LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true", LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(docroot),
               LABEL_STUDIO_BASE_DATA_DIR=str(tmp / "ls-data"), ML_BLOCK_LOCAL_IP="false", DJANGO_DB="sqlite",
               # the backend is on loopback: Label Studio refuses reserved addresses for ML backends and
               # their webhooks unless told otherwise (docs/labelstudio.md)
               USE_DEFAULT_BANNED_SUBNETS="false")
    env.pop("DJANGO_SETTINGS_MODULE", None)
    # Label Studio starts (~30 s and more) while the trio trains the first head and mines its recipes.
    ls = subprocess.Popen([str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
                           "--port", str(ls_port), "--data-dir", str(tmp / "ls-data")],
                          env=env, stdout=open(ls_log, "w"), stderr=subprocess.STDOUT, cwd=tmp)
    trio = Trio(tmp, models_dir)
    procs = [ls]
    try:
        base = make_synthetic_dataset(tmp / "base", images=16, seed=1)
        with HeadClient(trio.head) as h, MinerClient(trio.miner) as m:
            tr = h.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(base)), classes=CLASSES, seed=1,
                                               locator=False))
            mres = m.jobs.result(m.start_mining(miner_pb2.MiningSpec(dataset=str(base), head=tr.head.head_id,
                                                                     classes=CLASSES, seed=1)).name, miner_pb2.MiningResult)
        new = make_synthetic_dataset(tmp / "new", images=8, seed=7)
        _wait_up(f"{ls_url}/health", ls, ls_log, 240)
        sdk = SDK(ls_url, token)
        yield {"trio": trio, "set": mres.recipe_set, "base": base, "new": new, "docroot": docroot, "ls_url": ls_url,
               "token": token, "sdk": sdk, "tmp": tmp, "procs": procs}
        sdk.close()
    finally:
        stop_processes(procs, 20)
        trio.close()


def _cli(live, *args):
    t = live["trio"]
    return [sys.executable, "-m", "clients.cli", "--embedder", t.embedder, "--head", t.head, "--miner", t.miner, *args]


def test_review_loop_with_a_real_label_studio(live):
    sdk, docroot, new = live["sdk"], live["docroot"], live["new"]
    gt = load_dataset(new)
    recs = {r.path.name: r for r in gt.images}
    names = sorted(recs)
    # 1. `minehead draft` writes the draft folder into Label Studio's document root.
    drafts = new / "first"
    drafts.mkdir()
    for n in names[:3]:
        shutil.copy(new / "images" / n, drafts / n)
    r = subprocess.run(_cli(live, "draft", "--recipes", live["set"], "--images", str(drafts), "-o", str(docroot)),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # 2. A project with the config drafting wrote; labelstudio.json imported as it is.
    config = (docroot / "labelstudio_config.xml").read_text()
    pid = sdk("create_project", title="minehead review", label_config=config)
    file_tasks = json.loads((docroot / "labelstudio.json").read_text())
    ids = sdk("import_tasks", project=pid, tasks=file_tasks)
    assert len(ids) == len(file_tasks) == 3
    got = {t["data"]["image"]: t for t in sdk("tasks", project=pid)}
    for ft in file_tasks:
        (p,) = got[ft["data"]["image"]]["predictions"]
        (want,) = ft["predictions"]
        assert p["model_version"] == live["set"] and p["score"] == pytest.approx(want["score"])
        assert [x["value"] for x in p["result"]] == [x["value"] for x in want["result"]]
    # 3. The backend, as a user starts it; Label Studio connects to it (/health, /setup).
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = live["tmp"] / "backend.log"
    backend = subprocess.Popen(_cli(live, "labelstudio", "serve", "--recipes", live["set"], "--port", str(port),
                                    "--labelstudio-url", live["ls_url"], "--images-root", str(docroot),
                                    "--base-dataset", str(live["base"]), "--data-dir", str(live["tmp"] / "backend")),
                               cwd=REPO, env=dict(os.environ, MINEHEAD_LABELSTUDIO_TOKEN=live["token"],
                                                  BASIC_AUTH_USER=ML_USER, BASIC_AUTH_PASS=ML_PASSWORD),
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    live["procs"].append(backend)
    _wait_up(f"{url}/health", backend, log, 60)
    status, body = _http(f"{url}/setup", {"project": "1.1", "schema": config.replace("red_square", "cat")})
    assert status == 400 and "cat" in body["message"] and "red_square" in body["message"], body
    assert _http(f"{url}/setup", {"project": "1.1", "schema": config}, auth=False)[0] == 401
    ml = sdk("connect_ml", project=pid, url=url, user=ML_USER, password=ML_PASSWORD)
    # Label Studio also made a webhook to URL/webhook (annotation events) that sends no auth: give it the header
    assert sdk("webhook_headers", project=pid, url=f"{url}/webhook", headers=ML_AUTH) == 1
    assert sdk("ml", id=ml["id"])["error"] in (None, ""), log.read_text()[-2000:]
    # 4. New tasks (local files, as Label Studio's local storage serves them): predictions from the backend.
    (docroot / "new").mkdir()
    for n in names[3:6]:
        shutil.copy(new / "images" / n, docroot / "new" / n)
    new_ids = sdk("import_tasks", project=pid, tasks=[{"data": {"image": f"/data/local-files/?d=new/{n}"}} for n in names[3:6]])
    sdk("retrieve_predictions", project=pid, task_ids=new_ids)
    for tid in new_ids:
        (p,) = sdk("predictions", task=tid)
        assert p["model_version"] == live["set"] and isinstance(p["score"], float), log.read_text()[-2000:]
        assert all(x["from_name"] == "label" and x["value"]["rectanglelabels"][0] in CLASSES for x in p["result"])
    # 5. The reviewer's corrections, then the training button (START_TRAINING on /webhook).
    for t in sdk("tasks", project=pid):
        name = t["data"]["image"].rsplit("/", 1)[-1]
        sdk("annotate", task=t["id"], result=_gt_result(gt, recs[name]))
    sdk("train", id=ml["id"])
    t0, rounds = time.monotonic(), []
    while time.monotonic() - t0 < 600:
        _, body = _http(f"{url}/rounds")
        rounds = body["rounds"]
        if rounds and rounds[0]["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        time.sleep(2)
    assert rounds and rounds[0]["state"] == "SUCCEEDED", (rounds, log.read_text()[-3000:])
    _, health = _http(f"{url}/health")
    new_version = health["model_version"]
    assert new_version.startswith("recipeSets/") and new_version != live["set"]
    # 6. The next predictions answer with the new model version.
    (last,) = sdk("import_tasks", project=pid, tasks=[{"data": {"image": f"/data/local-files/?d=new/{names[3]}"}}])
    sdk("retrieve_predictions", project=pid, task_ids=[last])
    (p,) = sdk("predictions", task=last)
    assert p["model_version"] == new_version, log.read_text()[-2000:]
    refused = [ln for ln in log.read_text().splitlines() if "-> 401" in ln]
    assert len(refused) == 1 and "POST /setup" in refused[0], refused  # only the call made without credentials
    _, versions = _http(f"{url}/versions")
    assert versions == {"versions": [live["set"], new_version], "current": new_version}


def test_interactive_find_without_a_recipe_set_through_label_studio(live):
    """`labelstudio serve` with no --recipes, connected as an interactive model. The drawn
    rectangle goes to Label Studio's interactive-annotating endpoint in the body its browser app
    sends ({"task", "context": {"result": [the finished region]}}); Label Studio builds the
    /predict request (the task, the project's config, params.context) and hands back the first
    prediction. Also what Label Studio does with the other answers: no prediction stored for a
    task without drawn rectangles, a refused label and a refused training call shown with the
    backend's message."""
    from PIL import Image

    from minehead.drafts.formats import labelstudio_config
    from tests.test_find import H, W, hits, squares_and_circles

    sdk, docroot = live["sdk"], live["docroot"]
    px, squares, discs = squares_and_circles()
    (docroot / "interactive").mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(docroot / "interactive" / "shapes.png")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = live["tmp"] / "backend-interactive.log"
    backend = subprocess.Popen(_cli(live, "labelstudio", "serve", "--port", str(port), "--images-root", str(docroot)),
                               cwd=REPO, env=dict(os.environ, BASIC_AUTH_USER=ML_USER, BASIC_AUTH_PASS=ML_PASSWORD),
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    live["procs"].append(backend)
    _wait_up(f"{url}/health", backend, log, 60)
    pid = sdk("create_project", title="minehead interactive", label_config=labelstudio_config(["square", "disc"], False))
    ml = sdk("connect_ml", project=pid, url=url, user=ML_USER, password=ML_PASSWORD, interactive=True)
    assert sdk("ml", id=ml["id"])["error"] in (None, ""), log.read_text()[-2000:]
    (tid,) = sdk("import_tasks", project=pid, tasks=[{"data": {"image": "/data/local-files/?d=interactive/shapes.png"}}])
    # Nothing drawn yet: /predict answers {"results": []}; Label Studio stores no prediction.
    sdk("retrieve_predictions", project=pid, task_ids=[tid])
    assert sdk("predictions", task=tid) == []
    assert "without drawn rectangles: no prediction" in log.read_text()  # Label Studio did ask

    def draw(box, label):  # a region as Label Studio's app serializes it (annotation.serializeAnnotation())
        return {"id": "Xy7-k2", "type": "rectanglelabels", "from_name": "label", "to_name": "image", "origin": "manual",
                "original_width": W, "original_height": H, "image_rotation": 0,
                "value": {"x": 100 * box[0] / W, "y": 100 * box[1] / H, "width": 100 * (box[2] - box[0]) / W,
                          "height": 100 * (box[3] - box[1]) / H, "rotation": 0, "rectanglelabels": [label]}}

    def interactive(region):
        req = urllib.request.Request(f"{live['ls_url']}/api/ml/{ml['id']}/interactive-annotating",
                                     data=json.dumps({"task": tid, "context": {"result": [region]}}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Token {live['token']}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    drawn = draw(squares[0], "square")
    out = interactive(drawn)
    assert "errors" not in out, (out, log.read_text()[-2000:])
    pred = out["data"]
    assert pred["model_version"] == "exemplars" and pred["result"][0] == drawn  # the drawn one, as drawn
    found = pred["result"][1:]
    as_px = np.array([[r["value"]["x"] * W / 100, r["value"]["y"] * H / 100, (r["value"]["x"] + r["value"]["width"]) * W / 100,
                       (r["value"]["y"] + r["value"]["height"]) * H / 100] for r in found]).reshape(-1, 4)
    assert {r["value"]["rectanglelabels"][0] for r in found} == {"square"}
    assert hits(as_px, squares[1:]) == 5 and hits(as_px, discs) == 0 and len(found) == 5, found
    # A label outside the project's config: Label Studio passes the backend's message on to the app.
    out = interactive(draw(discs[0], "cat"))
    assert "unknown class 'cat'" in out["errors"][0], out
    # Start Training (START_TRAINING on /webhook): refused naming the flag. Label Studio records the
    # refusal as the model's state and error message (read from its database: its API re-checks
    # /health and /setup before every answer about the model, which puts it back to Connected).
    sdk("train", id=ml["id"])
    with sqlite3.connect(f"file:{live['tmp'] / 'ls-data' / 'label_studio.sqlite3'}?mode=ro", uri=True) as db:
        state, error = db.execute("SELECT state, error_message FROM ml_mlbackend WHERE id = ?", (ml["id"],)).fetchone()
    assert state == "ER" and error.startswith("400 Client Error: training needs a recipe set") and "--recipes" in error, \
        (state, error, log.read_text()[-2000:])
    assert sdk("ml", id=ml["id"])["error"] in (None, "")  # connected again: interactive find goes on
