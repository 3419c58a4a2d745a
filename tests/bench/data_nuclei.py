"""A real fluorescence image of crowded cell nuclei with instance masks, cut into tiles and
converted to YOLO datasets: the microscopy counterpart of data_trees.

Source: the `stardist==0.9.2` wheel on PyPI (BSD-3), which ships `stardist/data/images/img2d.tif`
(512 x 512, 16-bit, values 0-235) and its instance mask `mask2d.tif` (125 nuclei, 14-34 px
across). Pinned by version and the wheel's sha256; nothing of it is kept in git.

The image is cut into 4 x 4 tiles of 128 px; a nucleus is labelled in every tile where its box's
extent, clipped to the tile, keeps at least 40 % of its area there (as an annotator would box a
nucleus cut by the tile's edge, and leave a sliver). Tiles hold 4-14 nuclei. Two splits, each by a
rule:

- `even/`: a chequerboard (tile (i, j) is drafted when i + j is odd): labelled and new tiles alike.
- `sparse/`: the 8 tiles with the fewest nuclei are labelled (4-8 each), the 8 with the most are
  drafted (8-12 each, the crowded ones): issue 34's shift, a user who labels the easy tiles first.

    python -m tests.bench.data_nuclei [--out var/data/nuclei]   # prints the folders

Layout written (YOLO, class `nucleus`): OUT/{even,sparse}/{train,heldout}/ with images/, labels/
and labelmap.txt; OUT/tiles.json lists each tile's offset and nucleus count.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.data_trees import data_args, pinned_wheel, write_yolo

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.9.2"
WHEEL = f"stardist-{VERSION}-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023"
TILE = 128
CLASS = "nucleus"


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel (a binary one: stardist has no pure-Python wheel) in `cache`."""
    return pinned_wheel(cache, f"stardist=={VERSION}", WHEEL, WHEEL_SHA256, "--only-binary", ":all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")


def boxes_of(mask: np.ndarray) -> np.ndarray:
    """Instance mask (H x W, 0 = background) -> N x 4 XYXY pixel boxes (exclusive max), one per id."""
    out = []
    for i in np.unique(mask):
        if i == 0:
            continue
        ys, xs = np.nonzero(mask == i)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(out, float).reshape(-1, 4)


def build(out: Path, cache: Path) -> dict:
    """Write the datasets (once: a finished OUT/tiles.json means done) and return tiles.json."""
    index = out / "tiles.json"
    if index.is_file():
        return json.loads(index.read_text())
    with zipfile.ZipFile(fetch_wheel(cache)) as z:
        img = np.array(Image.open(io.BytesIO(z.read("stardist/data/images/img2d.tif"))))
        mask = np.array(Image.open(io.BytesIO(z.read("stardist/data/images/mask2d.tif"))))
    # 16-bit with values up to 235: stretched to 8 bits as a viewer would show it
    rgb = Image.fromarray((img.astype(float) * 255 / max(1, img.max())).round().astype(np.uint8)).convert("RGB")
    boxes = boxes_of(mask)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    h, w = mask.shape
    tiles = []
    for j in range(h // TILE):
        for i in range(w // TILE):
            x0, y0 = i * TILE, j * TILE
            b = np.clip(boxes - [x0, y0, x0, y0], 0, TILE)
            b = b[(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) >= 0.4 * area]
            tiles.append({"stem": f"nuclei_{j}_{i}", "offset": [x0, y0], "nuclei": int(len(b)),
                          "i": i, "j": j, "boxes": b.tolist()})
    # the sparse split: fewest nuclei labelled; ties broken by position so the rule is total
    order = sorted(tiles, key=lambda t: (t["nuclei"], t["j"], t["i"]))
    sparse_train = {t["stem"] for t in order[:len(order) // 2]}
    for t in tiles:
        x0, y0 = t["offset"]
        crop = rgb.crop((x0, y0, x0 + TILE, y0 + TILE))
        b = np.array(t.pop("boxes"), float).reshape(-1, 4)
        t["even"] = "heldout" if (t["i"] + t["j"]) % 2 else "train"
        t["sparse"] = "train" if t["stem"] in sparse_train else "heldout"
        for split in ("even", "sparse"):
            write_yolo(out / split / t[split], t["stem"], crop, b, CLASS)
    meta = {"source": f"stardist=={VERSION} ({WHEEL}, sha256 {WHEEL_SHA256})", "tiles": tiles}
    index.write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None) -> None:
    out, cache = data_args(argv, "nuclei")
    meta = build(out, cache)
    for split in ("even", "sparse"):
        for part in ("train", "heldout"):
            t = [x for x in meta["tiles"] if x[split] == part]
            print(f"{split}/{part}: {len(t)} tiles, nuclei {sorted(x['nuclei'] for x in t)} -> {out / split / part}")


if __name__ == "__main__":
    main()
