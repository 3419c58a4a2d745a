"""`minehead draft …` and `minehead recipes sets …`.

    minehead draft --recipes SET_OR_JOB --images DIR -o OUT [--format yolo,coco,labelstudio]
                   [--polygons] [--merge] [--adapt] [--resume JOB]

When the miner can read DIR and write OUT (both under its allowed roots) drafting runs as a
job on the server, which writes OUT itself; `--resume JOB` continues an interrupted one.
Otherwise the images go to the miner over the DraftImages stream, one at a time, and this
command writes OUT with the same writer; running it again on the same OUT continues after the
last finished image.

`--adapt` refits the head's locator on the new images' confident drafts before drafting them
(a job only: the miner needs the whole folder; summary.json "adapt" says what it learned from).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc

from minehead.client.miner import MinerClient
from minehead.common.v1 import common_pb2
from minehead.drafts.folder import DraftFolder, check_formats, describe, draft_result, list_images, tiled_entry
from minehead.miner.v1 import drafting_pb2

from clients.cli_common import ProgressBar, follow, print_json, print_table, to_jsonable


def _options(a) -> drafting_pb2.DraftOptions:
    formats = [f for f in (a.format or "").split(",") if f.strip()]
    check_formats(formats)
    opts = drafting_pb2.DraftOptions(recipe_set=a.recipes or "", formats=formats, polygons=a.polygons,
                                     overlap_iou=a.overlap_iou or 0.0, ambiguity_margin=a.ambiguity_margin or 0.0,
                                     lookalikes=a.lookalikes or "", threshold_scale=a.threshold_scale or 0.0)
    if a.refine is not None:
        opts.refine_boxes = a.refine
    return opts


def cmd_draft(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        if a.resume:
            return _job(a, c, c.start_drafting(resume=a.resume))
        if not (a.recipes and a.images and a.output):
            print("error: draft needs --recipes, --images and -o (or --resume JOB)", file=sys.stderr)
            return 2
        spec = drafting_pb2.DraftingSpec(options=_options(a), folder=str(Path(a.images).resolve()),
                                         output_dir=str(Path(a.output).resolve()), merge=a.merge, adapt=a.adapt)
        try:
            job = c.start_drafting(spec)
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND) or not Path(a.images).is_dir():
                raise
            if a.adapt and e.code() == grpc.StatusCode.PERMISSION_DENIED:
                print(f"error: --adapt runs as a job on the miner, which cannot use these folders ({e.details()}); "
                      "put them under the miner's allowed roots, or draft without --adapt", file=sys.stderr)
                return 2
            if a.adapt:
                raise
            print(f"note: the miner cannot use these folders ({e.details()}); sending the images over a stream instead",
                  file=sys.stderr)
            return _stream(a, c, spec.options)
        return _job(a, c, job)


def _job(a, c: MinerClient, job: common_pb2.Job) -> int:
    print(f"drafting job {job.name} (cancel: `minehead jobs cancel {job.name} --service miner`; "
          f"resume: `minehead draft --resume {job.name}`)", file=sys.stderr)
    done = follow(c, job, quiet=a.json)
    result = drafting_pb2.DraftingResult()
    done.result.Unpack(result)
    if a.json:
        print_json(to_jsonable(done))
    elif result.output_dir:
        print(describe(result))
    if done.state != common_pb2.Job.SUCCEEDED:
        print(f"error: job {done.name} {common_pb2.Job.State.Name(done.state)}: {done.error or 'stopped'}", file=sys.stderr)
        return 1
    return 0


def _stream(a, c: MinerClient, options: drafting_pb2.DraftOptions) -> int:
    rset = c.get_recipe_set(options.recipe_set)
    images = list_images(Path(a.images))
    out = Path(a.output)
    folder = DraftFolder(out, recipe_set=rset.name, classes=list(rset.classes), head_classes=list(rset.recipes[0].head.classes),
                         formats_=list(options.formats), polygons=options.polygons, merge=a.merge, source=str(Path(a.images).resolve()))
    done = folder.finished()
    todo = [(i, p) for i, p in enumerate(images) if p.name not in done]
    if done:
        print(f"resuming {out}: {len(done)} of {len(images)} images already drafted", file=sys.stderr)
    bar, t0, merged, tiled = ProgressBar(), time.perf_counter(), {}, {}
    bar.update(len(done), len(images), "images")
    n = 0
    responses = c.draft_images(options, (p for _, p in todo)) if todo else []
    for k, drafted in enumerate(responses):
        i, p = todo[k]
        drafted.index = i  # the folder's numbering, stable across resumed runs
        drafted.image = p.name
        added = folder.add(drafted, p)
        if added:
            merged[f"labels/{p.stem}.txt"] = added
        if drafted.error:
            print(f"\nwarning: skipped {p.name}: {drafted.error}", file=sys.stderr)
        if drafted.failure:
            print(f"\nwarning: {p.name} failed: {drafted.failure} (running this command again retries it)", file=sys.stderr)
        if (t := tiled_entry(drafted)) is not None:
            tiled[p.name] = t
        n += 1
        bar.update(len(done) + n, len(images), "images")
    secs = time.perf_counter() - t0
    summary = folder.finish({"recipe_set": rset.name, "head": rset.head_id, "detector": rset.detector, "images": len(images),
                             "drafted_this_run": n, "already_done": len(done), "seconds": round(secs, 3),
                             "images_per_s": round(n / secs, 4) if secs > 0 else 0.0, "merged_lines": merged,
                             "mode": "stream", "complete": True, "tiled_images": dict(sorted(tiled.items()))})
    print_json(summary) if a.json else print(describe(draft_result(summary, out)))
    return 0


# -- recipe sets ---------------------------------------------------------------------------
def _set_rows(sets):
    return [(s.name, ", ".join(s.classes), s.head_id[:12], s.detector, s.source_job or "-",
             s.create_time.ToJsonString()[:19]) for s in sets]


def cmd_sets_list(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        sets = c.list_recipe_sets()
    if a.json:
        print_json([to_jsonable(s) for s in sets])
    else:
        print_table(["recipe set", "classes", "head", "detector", "mining job", "created"], _set_rows(sets))
    return 0


def cmd_sets_get(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        s = c.get_recipe_set(a.name)
    if a.json:
        print_json(to_jsonable(s))
        return 0
    print_table(["recipe set", "classes", "head", "detector", "mining job", "created"], _set_rows([s]))
    print()
    print_table(["class", "recipe", "steps", "held-out P", "held-out R"],
                [(r.class_name, r.name, len(r.steps), r.summary.precision, r.summary.recall) for r in s.recipes])
    return 0


def cmd_sets_create(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        s = c.create_recipe_set(recipes=a.recipe or (), job=a.job or "")
    print_json(to_jsonable(s)) if a.json else print(f"{s.name}: {', '.join(s.classes)}")
    return 0


def cmd_sets_delete(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        c.delete_recipe_set(a.name)
    print(f"deleted {a.name}")
    return 0


def cmd_sets_export(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        data = c.export_recipe_set(a.name)
    Path(a.output).write_bytes(data)
    print(f"wrote {a.output} ({len(data)} bytes)")
    return 0


def cmd_sets_import(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        s = c.import_recipe_set(Path(a.file).read_bytes())
    print_json(to_jsonable(s)) if a.json else print(f"imported {s.name}: {', '.join(s.classes)}")
    return 0


def add_commands(sub, add, recipes_sub) -> None:
    d = add(sub, "draft", cmd_draft, "draft labels for new images with a recipe set (YOLO, COCO, Label Studio, review queue)")
    d.add_argument("--recipes", default="", help="recipeSets/ID, or jobs/ID of the mining job that made it")
    d.add_argument("--images", default="", help="folder of images (FOLDER/images/ if it exists)")
    d.add_argument("-o", "--output", default="", help="output folder; existing labels are never overwritten")
    d.add_argument("--format", default="", help="comma-separated: yolo,coco,labelstudio (default all; yolo always)")
    d.add_argument("--polygons", action="store_true", help="polygons from the detector's masks instead of boxes")
    d.add_argument("--merge", action="store_true", help="append drafts to label files already in the output folder")
    d.add_argument("--resume", default="", metavar="JOB", help="continue an interrupted or cancelled drafting job")
    d.add_argument("--adapt", action="store_true",
                   help="refit the head's locator on these images' confident drafts first (minisam-locator sets; "
                        "helps when the new images are denser or unlike the labelled ones)")
    d.add_argument("--overlap-iou", type=float, default=None, help="cross-class overlap that picks one box (default 0.7)")
    d.add_argument("--ambiguity-margin", type=float, default=None, help="flag boxes whose head margin is below (default 0.1)")
    d.add_argument("--lookalikes", choices=["relabel", "flag", "drop"], default=None,
                   help="a box the head calls another class: flag it for review (default), relabel it when "
                        "that class's recipe accepts it, or drop it")
    d.add_argument("--threshold-scale", type=float, default=None, metavar="S",
                   help="multiply the set's detector thresholds by S in (0, 2] for this draft: under 1 drafts more "
                        "boxes (for new images denser than the labelled ones), over 1 fewer (default 1)")
    d.add_argument("--refine", dest="refine", action="store_true", default=None,
                   help="refine kept boxes with SAM (default: on for minisam-locator)")
    d.add_argument("--no-refine", dest="refine", action="store_false", help="keep the detector's boxes as they are")

    sets = recipes_sub.add_parser("sets", help="recipe sets (one recipe per class, for drafting)").add_subparsers(
        dest="sets_cmd", required=True)
    add(sets, "list", cmd_sets_list, "list recipe sets")
    g = add(sets, "get", cmd_sets_get, "one recipe set with its recipes")
    g.add_argument("name", help="recipeSets/ID or jobs/ID")
    cr = add(sets, "create", cmd_sets_create, "build a set from recipes of one head and detector, or a mining job")
    cr.add_argument("--recipe", action="append", help="recipes/ID (repeat, one per class)")
    cr.add_argument("--job", default="", help="or a mining job")
    de = add(sets, "delete", cmd_sets_delete, "delete a recipe set")
    de.add_argument("name")
    ex = add(sets, "export", cmd_sets_export, "export a recipe set bundle (zip: every recipe, the head once)")
    ex.add_argument("name")
    ex.add_argument("-o", "--output", required=True)
    im = add(sets, "import", cmd_sets_import, "import a recipe set bundle")
    im.add_argument("file")
