"""`minehead heads …` and `minehead datasets …` subcommands."""

from __future__ import annotations


import sys

from pathlib import Path

from google.protobuf import json_format

from minehead.common.v1 import common_pb2
from minehead.head.v1 import head_pb2

from minehead.client.heads import HeadClient
from clients.cli_common import follow, parse_box, print_json, print_table, run_job, to_jsonable, zip_folder
from clients.cli_common import start_with_dataset as common_start_with_dataset



def _dataset_ref(path: str) -> head_pb2.DatasetRef:
    if path.startswith("datasets/"):
        return head_pb2.DatasetRef(name=path)
    return head_pb2.DatasetRef(path=str(Path(path).resolve()))


def start_with_dataset(a, client, start):
    """start(dataset_ref) -> Job; a folder the server may not read is uploaded first
    (cli_common.start_with_dataset, shared with `mine start`)."""
    return common_start_with_dataset(a.dataset, lambda ref: start(_dataset_ref(ref)), client.upload_dataset)


def cmd_train(a) -> int:
    spec = head_pb2.TrainingSpec(
        model=a.model or "",
        head_type=head_pb2.MLP if a.head_type == "mlp" else head_pb2.LOGREG,
        soft_targets=head_pb2.SoftTargets(label_smoothing=a.label_smoothing, teacher_temperature=a.teacher_temperature,
                                          margin_loss=a.margin_loss),
        hidden_sizes=[int(h) for h in a.hidden.split(",")] if a.hidden else [], max_epochs=a.max_epochs,
        seed=a.seed, display_name=a.name or "", classes=a.classes.split(",") if a.classes else [],
        holdout_fraction=a.holdout)
    if a.bg_classes is not None:
        spec.background_classes = a.bg_classes
    if a.locator is not None:
        spec.locator = a.locator
    spec.locator_augment = a.locator_augment
    spec.cross_fit_folds = a.cross_fit_folds
    if a.crowded_copies is not None:
        spec.locator_crowded_copies = a.crowded_copies
    def start(ref):
        spec.dataset.CopyFrom(ref)
        return c.start_training(spec)

    with HeadClient(a.head, token=a.token) as c:
        for neg in a.negatives or []:
            # Negatives are small and usually written client-side: always sent as an upload.
            up = c.upload_dataset(zip_folder(Path(neg)), Path(neg).name)
            spec.negatives.add(name=up.name)
            print(f"note: negatives {neg} uploaded as {up.name} ({up.image_count} images)", file=sys.stderr)
        out = run_job(a, c, start_with_dataset(a, c, start), head_pb2.TrainingResult)
    if isinstance(out, int):
        return out
    r = out[0]
    if a.json:
        print_json({"head": to_jsonable(r.head), "report": to_jsonable(r.report)})
        return 0
    h = r.head
    report = json_format.MessageToDict(r.report)
    held = report.get("held_out", {})
    print(f"head {h.head_id}  {head_pb2.HeadType.Name(h.head_type).lower()}  classes {', '.join(h.classes)}")
    if "accuracy" in held:
        print(f"held-out accuracy {held['accuracy']:.3f}  macro F1 {held['macro_f1']:.3f}")
        per = held.get("per_class", {})
        print_table(["class", "precision", "recall", "f1", "support"],
                    [(c, per[c]["precision"], per[c]["recall"], per[c]["f1"], int(per[c]["support"]))
                     for c in h.classes if c in per])
    else:
        print("no held-out images (too few labelled images to hold any out): no held-out figures")
    loc = report.get("locator", {}).get("held_out", {})
    refined = set(report.get("locator", {}).get("refiner", {}).get("classes", []))
    if h.has_locator:
        print("locator: " + (", ".join(f"{c} held-out F1 {v['f1']:.2f} (P {v['precision']:.2f} R {v['recall']:.2f}"
                                       + (", refined" if c in refined else "") + ")"
                                       for c, v in loc.items()) or "trained on every image (none held out)"))
    return 0


def cmd_list(a) -> int:
    with HeadClient(a.head, token=a.token) as c:
        r = c.list()
    if a.json:
        print_json([to_jsonable(h) for h in r.heads] + ([{"problems": list(r.problems)}] if r.problems else []))
        return 0
    print_table(["head_id", "name", "type", "classes", "embedder", "created"],
                [(h.head_id, h.display_name or "-", head_pb2.HeadType.Name(h.head_type).lower(), len(h.classes),
                  h.embedder.model_id, h.create_time.ToJsonString()[:19]) for h in r.heads])
    for p in r.problems:
        print(f"problem: {p}", file=sys.stderr)
    return 0


def cmd_get(a) -> int:
    with HeadClient(a.head, token=a.token) as c:
        h = c.get(a.head_id)
    print_json(to_jsonable(h))
    return 0


def cmd_download(a) -> int:
    with HeadClient(a.head, token=a.token) as c:
        data = c.download(a.head_id)
    Path(a.output).write_bytes(data)
    print(f"wrote {a.output} ({len(data)} bytes)")
    return 0


def cmd_upload(a) -> int:
    with HeadClient(a.head, token=a.token) as c:
        h = c.upload(Path(a.file).read_bytes(), a.name or "")
    print_json(to_jsonable(h)) if a.json else print(f"uploaded head {h.head_id}")
    return 0


def cmd_delete(a) -> int:
    with HeadClient(a.head, token=a.token) as c:
        c.delete(a.head_id)
    print(f"deleted {a.head_id}")
    return 0


def cmd_score(a) -> int:
    th = {k: getattr(a, k) for k in ("min_prob", "margin", "background_margin") if getattr(a, k) is not None}
    if a.no_bg_guard:
        th["background_guard"] = False
    with HeadClient(a.head, token=a.token) as c:
        r = c.score_boxes(a.head_id, a.image, a.box, a.target or "", a.ambiguity_margin, **th)
    if a.json:
        print_json(to_jsonable(r))
        return 0
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print_table(["box", "class", "p", "2nd", "p2", "background", "decision", "why"],
                [(",".join(f"{v:g}" for v in b), s.target_class, s.target_prob, s.top2_class, s.top2_prob,
                  f"{s.best_background_class} {s.best_background_prob:.2f}" if s.best_background_class else "-",
                  head_pb2.CropScore.Decision.Name(s.decision).lower() + (" (ambiguous)" if s.ambiguous else ""),
                  s.ambiguity or s.reason) for b, s in zip(a.box, r.scores)])
    return 0


def cmd_compare(a) -> int:
    req = head_pb2.CompareHeadsRequest(model=a.model or "", seed=a.seed)
    if a.bg_classes is not None:
        req.background_classes = a.bg_classes
    a.wait = True
    def start(ref):
        req.dataset.CopyFrom(ref)
        return c.compare(req)

    with HeadClient(a.head, token=a.token) as c:
        out = run_job(a, c, start_with_dataset(a, c, start), head_pb2.ComparisonResult)
    if isinstance(out, int):
        return out
    r = out[0]
    rep = to_jsonable(r.report)
    if a.json:
        print_json(rep)
        return 0
    variants = rep["variants"]
    print(f"held-out: {int(rep['held_out_crops'])} crops in {int(rep['held_out_images'])} images")
    print_table(["variant", "accuracy", "macro F1", "log loss", "T"],
                [(v, s.get("accuracy", 0), s.get("macro_f1", 0), s.get("log_loss", 0), s.get("calibration_temperature", 0))
                 for v, s in rep["summary"].items()])
    print()
    print_table(["class"] + [f"{v} P/R" for v in variants],
                [(c, *(f"{d[v]['precision']:.2f}/{d[v]['recall']:.2f}" for v in variants)) for c, d in rep["per_class"].items()])
    if rep["confused_pairs"]:
        print()
        print_table(["confused pair"] + variants, [(f"{p['a']} <-> {p['b']}", *(int(p[v]) for v in variants))
                                                   for p in rep["confused_pairs"]])
    return 0


def cmd_synth(a) -> int:
    from minehead.synth import make_synthetic_dataset

    root = make_synthetic_dataset(a.dir, images=a.images, seed=a.seed, splits=a.splits)
    from minehead.datasets import load_dataset

    ds = load_dataset(root)
    out = {"path": str(Path(root).resolve()), "images": len(ds.images), "labels": ds.label_count, "classes": ds.counts()}
    print_json(out) if a.json else print(f"wrote {out['images']} images, {out['labels']} labels to {out['path']}: {out['classes']}")
    return 0


def _jobs_client(a):
    from minehead.client.jobs import JobsClient

    return JobsClient(a.miner if a.service == "miner" else a.head, token=a.token)


def cmd_jobs_list(a) -> int:
    jobs = _jobs_client(a).list(a.kind)
    if a.json:
        print_json([to_jsonable(j) for j in jobs])
        return 0
    print_table(["job", "kind", "state", "phase", "progress", "created"],
                [(j.name, j.kind, common_pb2.Job.State.Name(j.state), j.phase,
                  f"{j.progress.done}/{j.progress.total} {j.progress.unit}" if j.progress.total else "-",
                  j.create_time.ToJsonString()[:19]) for j in jobs])
    return 0


def cmd_jobs_get(a) -> int:
    print_json(to_jsonable(_jobs_client(a).get(a.job)))
    return 0


def cmd_jobs_watch(a) -> int:
    c = _jobs_client(a)
    if a.json:
        for ev in c.watch(a.job):
            print_json(to_jsonable(ev))
        return 0
    done = follow(type("C", (), {"jobs": c})(), c.get(a.job), quiet=False)
    return 0 if done.state == common_pb2.Job.SUCCEEDED else 1


def cmd_jobs_cancel(a) -> int:
    j = _jobs_client(a).cancel(a.job)
    print(f"{j.name}: {common_pb2.Job.State.Name(j.state)}")
    return 0


def add_commands(sub, add) -> None:
    jobs = sub.add_parser("jobs", help="long-running jobs (training, mining)").add_subparsers(dest="jobs_cmd", required=True)
    for name, fn, help_ in (("list", cmd_jobs_list, "list jobs"), ("get", cmd_jobs_get, "one job"),
                            ("watch", cmd_jobs_watch, "follow a job's events"), ("cancel", cmd_jobs_cancel, "cancel a job")):
        jp = add(jobs, name, fn, help_)
        jp.add_argument("--service", choices=["head", "miner"], default="head")
        if name == "list":
            jp.add_argument("--kind", default="")
        else:
            jp.add_argument("job", help="jobs/ID or ID")

    ds = sub.add_parser("datasets", help="datasets").add_subparsers(dest="datasets_cmd", required=True)
    sy = add(ds, "synth", cmd_synth, "write a synthetic YOLO dataset (shapes on textured backgrounds)")
    sy.add_argument("dir")
    sy.add_argument("--images", type=int, default=60)
    sy.add_argument("--seed", type=int, default=1)
    sy.add_argument("--splits", action="store_true", help="write train/ and val/ splits")
    from clients.cli_import import add_import_command

    add_import_command(ds, add)
    from clients.cli_find import add_accept_command

    add_accept_command(ds, add)

    heads = sub.add_parser("heads", help="classifier heads").add_subparsers(dest="heads_cmd", required=True)
    tr = add(heads, "train", cmd_train, "train a head on a YOLO dataset (a job)")
    tr.add_argument("--dataset", required=True, help="a dataset folder under the server's allowed roots, or datasets/ID")
    tr.add_argument("--model", default="", help="embedder model id (default: the embedder's default)")
    tr.add_argument("--head-type", choices=["logreg", "mlp"], default="logreg")
    tr.add_argument("--name", default="", help="display name for the registry")
    tr.add_argument("--classes", default="", help="comma-separated subset of classes")
    tr.add_argument("--bg-classes", type=int, default=None, help="number of __bg_* classes (default 2, 0 = none)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--holdout", type=float, default=0.25, help="share of images held out (default 0.25)")
    tr.add_argument("--negatives", action="append", metavar="DIR",
                    help="hard negatives (from `minehead negatives export`) used as background; repeatable")
    tr.add_argument("--locator", dest="locator", action="store_true", default=None,
                    help="train the locator with the head (default: when the embedder model has a feature map)")
    tr.add_argument("--no-locator", dest="locator", action="store_false", help="train the head alone")
    tr.add_argument("--locator-augment", choices=["auto", "none", "flip", "dihedral"], default="auto",
                    help="flipped / turned copies of the labelled images for the locator (default auto: enough "
                         "copies for about 32 maps, none from 32 images on; flip: the horizontal flip only)")
    tr.add_argument("--crowded-copies", type=int, default=None, metavar="N",
                    help="copies of each labelled image with the other labelled objects pasted beside its own, "
                         "so the locator learns dense, touching scenes from sparse labels (default auto: about "
                         "2 an image up to 24 in all; 0: none; at most 8 an image)")
    tr.add_argument("--cross-fit-folds", type=int, default=0, metavar="K",
                    help="also fit the head and locator K times (2-5), each without one fold of the images, so "
                         "mining chooses thresholds on scores of images they did not see (default: none; "
                         "docs/recipes.md says when it helps)")
    adv = tr.add_argument_group("advanced (soft targets, MLP)")
    adv.add_argument("--label-smoothing", type=float, default=0.0, help="epsilon, 0 = off (0.05-0.15 typical)")
    adv.add_argument("--teacher-temperature", type=float, default=0.0, help="> 0: soft targets from a logreg teacher")
    adv.add_argument("--margin-loss", type=float, default=0.0, help="MLP: margin between target and best other logit")
    adv.add_argument("--hidden", default="", help="MLP hidden widths, e.g. 256 or 256,128")
    adv.add_argument("--max-epochs", type=int, default=0)
    tr.add_argument("--wait", action="store_true", help="follow the job and print the result")
    add(heads, "list", cmd_list, "list heads")
    g = add(heads, "get", cmd_get, "one head with its full meta.json")
    g.add_argument("head_id")
    dl = add(heads, "download", cmd_download, "download a head bundle (zip)")
    dl.add_argument("head_id")
    dl.add_argument("-o", "--output", required=True)
    up = add(heads, "upload", cmd_upload, "upload a head bundle (zip)")
    up.add_argument("file")
    up.add_argument("--name", default="", help="display name")
    de = add(heads, "delete", cmd_delete, "delete a head")
    de.add_argument("head_id")
    sc = add(heads, "score", cmd_score, "score boxes of an image with a head")
    sc.add_argument("head_id")
    sc.add_argument("--image", required=True)
    sc.add_argument("--box", type=parse_box, action="append", required=True, metavar="X1,Y1,X2,Y2")
    sc.add_argument("--target", default="", help="the class each box should be (default: auto-class)")
    sc.add_argument("--min-prob", type=float, default=None)
    sc.add_argument("--margin", type=float, default=None)
    sc.add_argument("--background-margin", type=float, default=None)
    sc.add_argument("--no-bg-guard", action="store_true")
    sc.add_argument("--ambiguity-margin", type=float, default=None)
    cp = add(heads, "compare", cmd_compare, "A/B: logreg vs MLP, with and without soft targets, on one split")
    cp.add_argument("--dataset", required=True)
    cp.add_argument("--model", default="")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--bg-classes", type=int, default=None)

