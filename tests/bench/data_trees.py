"""Real aerial photographs of tree crowns with boxes, fetched and converted to YOLO datasets.

Source: the `deepforest==2.1.0` wheel on PyPI (MIT), which ships NEON aerial RGB tiles with
Pascal VOC tree boxes in `deepforest/data/`. Pinned by version and the wheel's sha256; nothing
of it is kept in git. Three images are used:

| image | size | trees |
|---|---|---|
| OSBS_029 | 400 x 400 | 61 |
| 2019_YELL_2_541000_4977000_image_crop | 1249 x 1035 | 279 |
| 2019_YELL_2_528000_4978000_image_crop2 | 2299 x 2472 | 574 |

Each image is cut into tiles of about 400 px (n = round(side / 400) a side, equal tiles, no
overlap); a box belongs to the tile that holds its centre and is clipped to it. Tiles are split
into train and held-out like a chequerboard (tile (i, j) is held out when i + j is odd; OSBS_029,
one tile, trains), so both halves sample every part of every image. The large YELL image is also
written whole (`whole/`), with its boxes, to compare drafting it whole with its tiles one by one.

The density split (issue 34's shift, `OUT/sparse/`): all 46 tiles sorted by trees per tile (ties by
name), the sparsest half labelled (23 tiles, 0-18 trees), the densest half drafted (23 tiles,
18-61 trees): a user who labels the sparse corner of an orthomosaic first.

    python -m tests.bench.data_trees [--out var/data/trees]   # prints the folders

Layout written (YOLO, class `tree`): OUT/train, OUT/heldout, OUT/whole, OUT/sparse/{train,heldout}, each with images/,
labels/ and labelmap.txt; OUT/tiles.json maps each tile to its source image and offset.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
VERSION = "2.1.0"
WHEEL = f"deepforest-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
IMAGES = ("OSBS_029", "2019_YELL_2_541000_4977000_image_crop", "2019_YELL_2_528000_4978000_image_crop2")
WHOLE = "2019_YELL_2_528000_4978000_image_crop2"
TILE = 400


def pinned_wheel(cache: Path, requirement: str, wheel: str, sha256: str, *pip_args: str) -> Path:
    """`wheel` in `cache`, downloaded with pip once (`requirement`, no dependencies) and checked
    against its pinned sha256 (a mismatch deletes it and raises)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / wheel
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", requirement, "--no-deps", "-q", *pip_args,
                        "-d", str(cache)], check=True)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha != sha256:
        path.unlink()
        raise RuntimeError(f"{wheel}: sha256 {sha} is not the pinned {sha256}")
    return path


def fetch_wheel(cache: Path) -> Path:
    return pinned_wheel(cache, f"deepforest=={VERSION}", WHEEL, WHEEL_SHA256)


def data_args(argv, name: str) -> tuple[Path, Path]:
    """The data scripts' command line: (--out, default var/data/NAME; --cache, default var/cache)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "var" / "data" / name))
    ap.add_argument("--cache", default=str(REPO / "var" / "cache"))
    a = ap.parse_args(argv)
    return Path(a.out), Path(a.cache)


def read_voc(xml: bytes) -> np.ndarray:
    """Pascal VOC boxes -> N x 4 XYXY pixels (float)."""
    root = ET.fromstring(xml)
    out = [[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
           for o in root.iter("object")]
    return np.array(out, float).reshape(-1, 4)


def tiles_of(w: int, h: int, tile: int = TILE) -> list[tuple[int, int, int, int, int, int]]:
    """Equal tiles of about `tile` px: (i, j, x0, y0, x1, y1), i the column, j the row."""
    nx, ny = max(1, round(w / tile)), max(1, round(h / tile))
    xs = np.linspace(0, w, nx + 1).round().astype(int)
    ys = np.linspace(0, h, ny + 1).round().astype(int)
    return [(i, j, xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def write_yolo(folder: Path, stem: str, img: Image.Image, boxes: np.ndarray, class_name: str = "tree") -> None:
    """One image and its boxes (N x 4 XYXY px, all of class 0) into a YOLO folder."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    (folder / "labelmap.txt").write_text(class_name + "\n")
    img.save(folder / "images" / f"{stem}.png")
    w, h = img.size
    lines = [f"0 {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}"
             for b in boxes]
    (folder / "labels" / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def build(out: Path, cache: Path) -> dict:
    """Write the datasets (once: a finished OUT/tiles.json means done) and return tiles.json."""
    index = out / "tiles.json"
    if index.is_file():
        return json.loads(index.read_text())
    wheel = fetch_wheel(cache)
    tiles = []
    with zipfile.ZipFile(wheel) as z:
        for name in IMAGES:
            img = Image.open(io.BytesIO(z.read(f"deepforest/data/{name}.png"))).convert("RGB")
            boxes = read_voc(z.read(f"deepforest/data/{name}.xml"))
            if name == WHOLE:
                write_yolo(out / "whole", name, img, boxes)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            for i, j, x0, y0, x1, y1 in tiles_of(*img.size):
                inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
                b = boxes[inside] - [x0, y0, x0, y0]
                b = np.clip(b, 0, [x1 - x0, y1 - y0, x1 - x0, y1 - y0])
                split = "heldout" if (i + j) % 2 else "train"
                stem = f"{name}_{j}_{i}"
                write_yolo(out / split, stem, img.crop((x0, y0, x1, y1)), b)
                tiles.append({"stem": stem, "source": name, "split": split, "offset": [int(x0), int(y0)],
                              "size": [int(x1 - x0), int(y1 - y0)], "trees": int(len(b))})
    meta = {"source": f"deepforest=={VERSION} ({WHEEL}, sha256 {WHEEL_SHA256})", "tiles": tiles}
    index.write_text(json.dumps(meta, indent=1))
    return meta


def density_split(out: Path, meta: dict) -> Path:
    """OUT/sparse/{train,heldout} from the tiles already written: the sparsest half of all tiles
    labelled, the densest half drafted (written once)."""
    import shutil

    dest = out / "sparse"
    if (dest / "heldout" / "labelmap.txt").is_file():
        return dest
    tiles = sorted(meta["tiles"], key=lambda t: (t["trees"], t["stem"]))
    for k, t in enumerate(tiles):
        part = dest / ("train" if k < len(tiles) // 2 else "heldout")
        for sub in ("images", "labels"):
            (part / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / t["split"] / "images" / f"{t['stem']}.png", part / "images")
        shutil.copy(out / t["split"] / "labels" / f"{t['stem']}.txt", part / "labels")
    for part in ("train", "heldout"):
        shutil.copy(out / "train" / "labelmap.txt", dest / part / "labelmap.txt")
    return dest


def main(argv=None) -> None:
    out, cache = data_args(argv, "trees")
    meta = build(out, cache)
    for split in ("train", "heldout"):
        t = [x for x in meta["tiles"] if x["split"] == split]
        print(f"{split}: {len(t)} tiles, {sum(x['trees'] for x in t)} trees -> {out / split}")
    print(f"whole: {WHOLE} -> {out / 'whole'}")
    print(f"density split: sparsest half -> densest half in {density_split(out, meta)}")


if __name__ == "__main__":
    main()
