"""The `minehead` command as a user runs it, against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minehead.core.server import start_server
from tests.conftest import REPO, make_config, png_bytes, scene
from embedder_svc.minisam import DIM as MINISAM_DIM


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=300)


@pytest.fixture(scope="module")
def trio(embedder_server, tmp_path_factory):
    """The embedder fixture plus real head and miner servers; env points the CLI at them."""
    from head_svc.__main__ import build as build_head
    from miner_svc.__main__ import build as build_miner

    tmp = tmp_path_factory.mktemp("trio")
    servers, addrs = [], {"embedder": embedder_server.address}
    for svc, build, extra in (("head", build_head, {"embedder_addr": embedder_server.address}), ("miner", build_miner, {})):
        cfg = make_config(svc, tmp, extra=extra)
        runner, bindings = build(cfg)
        s = start_server(cfg, bindings)
        servers.append((s, runner))
        addrs[svc] = f"127.0.0.1:{s.port}"
    env = dict(os.environ, **{f"MINEHEAD_{k.upper()}_ADDR": v for k, v in addrs.items()})
    yield env, tmp
    for s, r in servers:
        s.stop(0.5)
        r.shutdown()


def test_health(trio):
    env, _ = trio
    r = run_cli("health", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("SERVING") == 3
    r = run_cli("health", "--json", env=env)
    assert {v["status"] for v in json.loads(r.stdout).values()} == {"SERVING"}


def test_health_reports_unreachable(trio):
    env, _ = trio
    env = dict(env, MINEHEAD_MINER_ADDR="127.0.0.1:1")
    r = run_cli("health", env=env)
    assert r.returncode == 1 and "UNREACHABLE" in r.stdout


def test_models_list(trio):
    env, _ = trio
    r = run_cli("models", "list", env=env)
    assert r.returncode == 0 and "minisam-tinyvit" in r.stdout
    models = json.loads(run_cli("models", "list", "--json", env=env).stdout)
    default = [m for m in models if m["is_default"]]
    assert default[0]["id"] == "minisam-tinyvit" and default[0]["dim"] == MINISAM_DIM


def test_embed_crops_json_as_written_in_the_issue(trio):
    env, tmp = trio
    img = tmp / "photo.png"
    img.write_bytes(png_bytes(scene()))
    r = run_cli("embed", "crops", "--image", str(img), "--box", "40,30,140,110", "--box", "0,0,50,50", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["count"] == 2 and out["dim"] == MINISAM_DIM and out["model"]["model_id"] == "minisam-tinyvit"
    assert len(out["embeddings"][0]) == MINISAM_DIM
    r = run_cli("embed", "crops", "--image", str(img), "--box", "40,30,140,110", "--model", "hf-clip:tiny/clip", env=env)
    assert r.returncode == 0 and "hf-clip:tiny/clip" in r.stdout


def test_cli_errors_are_one_line(trio):
    env, tmp = trio
    img = tmp / "photo.png"
    img.write_bytes(png_bytes(scene()))
    r = run_cli("embed", "crops", "--image", str(img), "--box", "5,5,5,50", env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: INVALID_ARGUMENT: box 0") and "Traceback" not in r.stderr
    r = run_cli("embed", "crops", "--image", str(img), "--box", "1,2,3", env=env)
    assert r.returncode == 2 and "expected 4 numbers" in r.stderr
    r = run_cli("embed", "crops", "--image", str(tmp / "missing.png"), "--box", "1,2,3,4", env=env)
    assert r.returncode == 2 and "missing.png" in r.stderr


def test_embed_images_and_text(trio):
    env, tmp = trio
    img = tmp / "photo.png"
    img.write_bytes(png_bytes(scene()))
    out = json.loads(run_cli("embed", "images", str(img), "--json", env=env).stdout)
    assert out["count"] == 1 and out["dim"] == MINISAM_DIM
    out = json.loads(run_cli("embed", "text", "red car", "dog", "--model", "open_clip:tiny-clip/random", "--json", env=env).stdout)
    assert out["count"] == 2 and out["dim"] == 32


def test_head_commands_as_written_in_the_issue(trio):
    env, tmp = trio
    ds = tmp / "shapes"
    r = run_cli("datasets", "synth", str(ds), "--images", "16", "--seed", "1", env=env)
    assert r.returncode == 0 and "16 images" in r.stdout, r.stderr
    # --no-locator: the registry commands are what is tested here (the locator: test_locator*.py)
    r = run_cli("heads", "train", "--dataset", str(ds), "--head-type", "logreg", "--label-smoothing", "0.1",
                "--bg-classes", "2", "--no-locator", "--wait", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    hid = out["head"]["head_id"]
    assert out["head"]["classes"][-1] == "__bg_1" and out["report"]["held_out"]["accuracy"] > 0.3
    listed = json.loads(run_cli("heads", "list", "--json", env=env).stdout)
    assert hid in [h["head_id"] for h in listed]
    zpath = tmp / "head.zip"
    assert run_cli("heads", "download", hid, "-o", str(zpath), env=env).returncode == 0 and zpath.stat().st_size > 1000
    assert run_cli("heads", "delete", hid, env=env).returncode == 0
    r = run_cli("heads", "upload", str(zpath), "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["head_id"] == hid
    img = next((ds / "images").glob("*.jpg"))
    r = run_cli("heads", "score", hid, "--image", str(img), "--box", "10,10,60,60", "--json", env=env)
    assert r.returncode == 0, r.stderr
    score = json.loads(r.stdout)["scores"][0]
    assert score["decision"] in ("KEEP", "REJECT_LOW_PROB", "REJECT_MARGIN", "REJECT_BACKGROUND") and score["reason"]
    r = run_cli("heads", "score", hid, "--image", str(img), "--box", "10,10,60,60", env=env)
    assert r.returncode == 0 and "decision" in r.stdout
    r = run_cli("heads", "compare", "--dataset", str(ds), "--json", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["variants"] == ["logreg", "logreg+ls0.1", "mlp", "mlp+ls0.1"]
    r = run_cli("jobs", "list", env=env)
    assert r.returncode == 0 and "training" in r.stdout and "comparison" in r.stdout


def test_train_uploads_a_folder_the_server_may_not_read(trio, tmp_path):
    env, _ = trio
    ds = tmp_path / "elsewhere"  # outside the head service's allowed roots
    assert run_cli("datasets", "synth", str(ds), "--images", "8", "--seed", "2", env=env).returncode == 0
    r = run_cli("heads", "train", "--dataset", str(ds), "--bg-classes", "0", "--no-locator", "--wait", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert "uploading it instead" in r.stderr and json.loads(r.stdout)["head"]["head_id"]


def test_struct_results_read_as_plain_values_with_counts_as_ints():
    """MiningResult.summary and BenchmarkResult.report stay Structs; the client edge reads them
    once, nested lists and structs included, whole numbers as int."""
    from minehead.client.miner import from_struct
    from minehead.core.jobs import struct_from_dict

    s = struct_from_dict({"images": 12, "rate": 0.25, "warnings": ["a", "b"], "classes": {"red": {"tp": 3, "steps": [{"n": 1}]}},
                          "ok": True, "none": None})
    got = from_struct(s)
    assert got == {"images": 12, "rate": 0.25, "warnings": ["a", "b"], "classes": {"red": {"tp": 3, "steps": [{"n": 1}]}},
                   "ok": True, "none": None}
    assert type(got["images"]) is int and type(got["classes"]["red"]["tp"]) is int
    assert got["warnings"] + ["c"] == ["a", "b", "c"]  # plain lists: what broke `minehead draft` in job mode
