"""`minehead datasets import SRC -o DIR`: a Label Studio JSON export or a COCO file into a YOLO
dataset folder (minehead.importers does the work; this is the command-line edge).

    minehead datasets import SRC -o DIR [--images-root PATH] [--labelstudio-url URL]
                                        [--labelmap FILE] [--format auto|labelstudio|coco] [--json]

Relative image paths are read under --images-root (default: SRC's folder, which is right for a
`labelstudio.json` written by `minehead draft`). Images on the Label Studio host are fetched
with MINEHEAD_LABELSTUDIO_TOKEN; no other host is ever contacted.
"""

from __future__ import annotations

import os
from pathlib import Path

from clients.cli_common import print_json


def _read_labelmap(path: str) -> list[str]:
    """labelmap.txt (one name a line), or a Label Studio labelling config (its <Label value=…>
    in order, e.g. the labelstudio_config.xml drafting writes)."""
    from minehead.labelstudio.config import labels_of

    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("<"):
        return labels_of(text)
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def cmd_import(a) -> int:
    from minehead import importers

    with open(a.src, "rb") as f:
        data = f.read(importers.MAX_JSON_BYTES + 1)  # one byte over is enough to refuse: never read a huge file whole
    fn = {"auto": importers.import_export, "labelstudio": importers.import_labelstudio, "coco": importers.import_coco}[a.format]
    report = fn(data, a.output, a.images_root or str(Path(a.src).resolve().parent),
                labelstudio_url=a.labelstudio_url, labelmap=_read_labelmap(a.labelmap) if a.labelmap else None,
                token=os.environ.get("MINEHEAD_LABELSTUDIO_TOKEN"))
    print_json(report.to_dict()) if a.json else print(report.describe())
    return 0


def add_import_command(ds, add) -> None:
    """Register `import` under the `datasets` subcommands."""
    im = add(ds, "import", cmd_import, "a Label Studio JSON export or a COCO file -> a YOLO dataset folder (polygons kept)")
    im.add_argument("src", help="the export: Label Studio JSON (a list of tasks) or COCO JSON")
    im.add_argument("-o", "--output", required=True, help="the new dataset folder (must not exist, or be empty)")
    im.add_argument("--images-root", default=None,
                    help="where relative and /data/local-files/?d= image paths are read (default: SRC's folder); "
                         "absolute paths must lie under it")
    im.add_argument("--labelstudio-url", default=None,
                    help="the Label Studio instance (http://host:port): its URLs and /data/upload/ images are "
                         "fetched with MINEHEAD_LABELSTUDIO_TOKEN; every other host is refused")
    im.add_argument("--labelmap", default=None,
                    help="class names and order (labelmap.txt or a Label Studio config XML); labels outside it are refused")
    im.add_argument("--format", choices=["auto", "labelstudio", "coco"], default="auto")
