"""`minehead mine …`, `minehead recipes …` and `minehead negatives …` subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minehead.common.v1 import common_pb2
from minehead.miner.v1 import miner_pb2
from minehead.recipes.v2 import recipes_pb2

from minehead.client.miner import MinerClient, from_struct
from clients.cli_common import dataset_arg, follow, print_json, print_table, run_job, start_with_dataset, to_jsonable

# Background suppression presets -> (guard, margin). "Balanced" is the one to start with.
PRESETS = {"off": (False, 0.0), "low": (True, 0.0), "balanced": (True, 0.1), "strict": (True, 0.25)}
APPLY = {"seed": recipes_pb2.SEED, "final": recipes_pb2.FINAL, "both": recipes_pb2.BOTH}


def _spec(a) -> miner_pb2.MiningSpec:
    guard, margin = PRESETS[a.bg]
    spec = miner_pb2.MiningSpec(
        dataset=dataset_arg(a.dataset), head=a.head_id, classes=a.classes.split(",") if a.classes else [],
        detector=a.detector or "", target_precision=a.target_precision, seed=a.seed, max_images=a.max_images,
        clip_head_background_guard=guard,
        clip_head_background_margin=a.bg_margin if a.bg_margin is not None else margin,
        clip_head_background_apply=APPLY[a.bg_apply], clip_head_background_penalty=a.bg_penalty,
        clip_head_auto_tune=not a.no_auto_tune, max_steps=a.max_steps)
    if a.no_prompt_filter:
        spec.prompt_filter = False
    if a.no_refit:
        spec.refit_all_images = False
    if a.in_fold:
        spec.out_of_fold = False
    for p in a.prompt or []:
        if "=" not in p:
            raise SystemExit(f"--prompt {p!r}: expected CLASS=P1,P2")
        cls, prompts = p.split("=", 1)
        spec.prompts[cls].prompts.extend(x.strip() for x in prompts.split(",") if x.strip())
    return spec


def _summary_rows(recipes):
    return [(r.class_name, r.recipe_id, len(r.steps), "; ".join(f"{s.prompt!r}>={s.seed_threshold:.2f}" for s in r.steps) or "-",
             f"{r.summary.precision:.2f} ({r.summary.true_positives}/{r.summary.true_positives + r.summary.false_positives})",
             f"{r.summary.recall:.2f} ({r.summary.true_positives}/{r.summary.ground_truth})",
             f"{r.summary.bg_veto_rate_seed:.2f}/{r.summary.bg_veto_rate_final:.2f}") for r in recipes]


def _print_recipes(recipes, summary=None):
    print_table(["class", "recipe", "steps", "prompts", "precision", "recall", "bg veto seed/final"], _summary_rows(recipes))
    seen = 0
    if summary:
        s = from_struct(summary)
        print(f"\ndetector {s.get('detector')}  passes {s.get('passes')}  cache {s.get('detection_cache')}")
        for w in s.get("warnings", []):
            print(f"warning: {w}", file=sys.stderr)
        seen = int(s.get("report_images_seen_in_training") or 0)
    refit = [r.summary.fit_images for r in recipes if r.summary.report_images and _refit(r)]
    print("(precision and recall are on the held-out report images, with the counts they rest on"
          + (f"; {seen} of those images trained the head, so new images get less" if seen else "")
          + (f"; taken before the steps and gate shown were chosen again on all {max(refit)} labelled images)"
             if refit else ")"))


def _refit(recipe) -> bool:
    """Whether mining chose the shipped steps again on every image after the held-out figures."""
    try:
        return bool(json.loads(recipe.provenance.mining_settings_json or "{}").get("refit_all_images"))
    except ValueError:
        return False


def _upload_dataset(a):
    """upload(zip, name) into the one dataset store (the head service's), for start_with_dataset."""
    def upload(data: bytes, name: str):
        from minehead.client.heads import HeadClient

        with HeadClient(a.head, token=a.token) as h:
            return h.upload_dataset(data, name)
    return upload


def cmd_mine_start(a) -> int:
    spec = _spec(a)

    def start(ref: str):
        spec.dataset = ref
        return c.start_mining(spec)

    with MinerClient(a.miner, token=a.token) as c:
        # a folder the miner may not read (or cannot see) is uploaded once, as `heads train` does
        out = run_job(a, c, start_with_dataset(a.dataset, start, _upload_dataset(a)), miner_pb2.MiningResult)
    if isinstance(out, int):
        return out
    r, done = out
    if a.json:
        print_json({"job": done.name, "recipes": [to_jsonable(x) for x in r.recipes], "summary": from_struct(r.summary)})
    else:
        _print_recipes(r.recipes, r.summary)
    return 0


def cmd_mine_watch(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        done = follow(c, c.jobs.get(a.job), quiet=False)
    return 0 if done.state == common_pb2.Job.SUCCEEDED else 1


def cmd_mine_cancel(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        j = c.jobs.cancel(a.job)
    print(f"{j.name}: {common_pb2.Job.State.Name(j.state)}")
    return 0


def cmd_mine_ab(a) -> int:
    a.wait = True
    with MinerClient(a.miner, token=a.token) as c:
        out = run_job(a, c, c.start_benchmark(_spec(a), a.margin), miner_pb2.BenchmarkResult)
    if isinstance(out, int):
        return out
    rep = from_struct(out[0].report)
    if a.json:
        print_json(rep)
        return 0
    print_table(["arm", "precision", "coverage", "TP", "FP", "GT", "bg veto seed", "bg veto final", "seconds"],
                [(r["arm"], r["precision"], r["coverage"], r["true_positives"], r["false_positives"],
                  r["ground_truth"], r["bg_veto_rate_seed"], r["bg_veto_rate_final"], r["seconds"]) for r in rep["arms"]])
    if rep.get("meaningless"):
        print(f"warning: detector {rep['detector']} has random weights: these numbers are meaningless", file=sys.stderr)
    return 0


def cmd_recipes_list(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        recipes = c.list_recipes(a.class_name or "")
    print_json([to_jsonable(r) for r in recipes]) if a.json else _print_recipes(recipes)
    return 0


def cmd_recipes_get(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        print_json(to_jsonable(c.get_recipe(a.recipe_id)))
    return 0


def cmd_recipes_export(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        data = c.export_recipe(a.recipe_id)
    Path(a.output).write_bytes(data)
    print(f"wrote {a.output} ({len(data)} bytes)")
    return 0


def cmd_recipes_import(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        r = c.import_recipe(Path(a.file).read_bytes())
    print_json(to_jsonable(r)) if a.json else print(f"imported recipe {r.recipe_id} ({r.class_name})")
    return 0


def cmd_recipes_delete(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        c.delete_recipe(a.recipe_id)
    print(f"deleted {a.recipe_id}")
    return 0


def cmd_recipes_apply(a) -> int:
    fmt = {"polygon": miner_pb2.ApplyRecipeRequest.POLYGON, "rle": miner_pb2.ApplyRecipeRequest.RLE,
           "none": miner_pb2.ApplyRecipeRequest.NONE}[a.masks]
    with MinerClient(a.miner, token=a.token) as c:
        if not a.image and not a.dataset:
            raise SystemExit("recipes apply: give --image PATH (repeatable) or --dataset DIR")
        r = c.apply(a.recipe_id, a.image or [], fmt, a.detector, dataset_arg(a.dataset) if a.dataset else "")
    if a.json:
        print_json(to_jsonable(r))
        return 0
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for im in r.images:
        print(f"{im.label}: {len(im.detections)} detection(s)")
        print_table(["class", "box (x1,y1,x2,y2)", "score", "head p", "step"],
                    [(d.class_name, f"{d.box.x1:.0f},{d.box.y1:.0f},{d.box.x2:.0f},{d.box.y2:.0f}", d.score, d.head_prob,
                      d.step_index) for d in im.detections])
    return 0


def cmd_negatives_export(a) -> int:
    with MinerClient(a.miner, token=a.token) as c:
        data = c.export_negatives(a.job)
    from minehead.core.safezip import safe_members, write_members

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    members = safe_members(data, max_member_bytes=64 << 20, max_total_bytes=1 << 30)
    write_members(members, out)
    n = len([m for m in members if m.startswith("images/")])
    print(f"wrote {n} hard-negative crops to {out} (labelmap.txt, images/, labels/)")
    return 0


def add_commands(sub, add):
    """Adds mine/recipes/negatives; returns the `recipes` subparsers (recipe sets hang there)."""
    mine = sub.add_parser("mine", help="recipe mining").add_subparsers(dest="mine_cmd", required=True)

    def mining_args(p):
        p.add_argument("--dataset", required=True, help="YOLO dataset folder (uploaded when the miner may not read it) "
                       "or datasets/{id}")
        p.add_argument("--head", dest="head_id", required=True, help="head id or display name")
        p.add_argument("--classes", default="", help="comma-separated (default: every class the head knows)")
        p.add_argument("--prompt", action="append", metavar="CLASS=P1,P2", help="extra prompts for a class")
        p.add_argument("--detector", default="", help="sam3:facebook/sam3, sam3-tiny-random, … (default: the miner's)")
        p.add_argument("--bg", choices=list(PRESETS), default="off",
                       help="background suppression: off, low (guard, margin 0), balanced (0.1), strict (0.25)")
        p.add_argument("--bg-apply", choices=list(APPLY), default="final", help="where the guard vetoes (default final)")
        p.add_argument("--bg-margin", type=float, default=None, help="exact clip_head_background_margin (overrides --bg)")
        p.add_argument("--bg-penalty", type=float, default=0.0, help="clip_head_background_penalty in the objective")
        p.add_argument("--target-precision", type=float, default=0.75)
        p.add_argument("--max-steps", type=int, default=3)
        p.add_argument("--max-images", type=int, default=0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-auto-tune", action="store_true", help="keep the gate fixed instead of sweeping it")
        p.add_argument("--no-prompt-filter", action="store_true")
        p.add_argument("--no-refit", action="store_true",
                       help="ship the thresholds chosen on the tune split alone (default: chosen again on every "
                            "image once the held-out figures are taken)")
        p.add_argument("--in-fold", action="store_true",
                       help="with a cross-fitted head (heads train --cross-fit-folds): score its labelled images "
                            "with the shipped head instead of each fold's")

    st = add(mine, "start", cmd_mine_start, "mine one recipe per class (a job)")
    mining_args(st)
    st.add_argument("--wait", action="store_true", help="follow the job and print the recipes")
    w = add(mine, "watch", cmd_mine_watch, "follow a mining job")
    w.add_argument("job")
    cn = add(mine, "cancel", cmd_mine_cancel, "cancel a mining job (classes already mined are kept)")
    cn.add_argument("job")
    ab = add(mine, "ab", cmd_mine_ab, "A/B: no guard vs guard (seed+final) vs guard + margin")
    mining_args(ab)
    ab.add_argument("--margin", type=float, default=0.1)

    rec = sub.add_parser("recipes", help="recipes (schema v2)").add_subparsers(dest="recipes_cmd", required=True)
    ls = add(rec, "list", cmd_recipes_list, "list recipes")
    ls.add_argument("--class", dest="class_name", default="")
    for name, fn, help_ in (("get", cmd_recipes_get, "one recipe as protobuf JSON"), ("delete", cmd_recipes_delete, "delete a recipe")):
        p = add(rec, name, fn, help_)
        p.add_argument("recipe_id")
    ex = add(rec, "export", cmd_recipes_export, "export a recipe bundle (zip with its head)")
    ex.add_argument("recipe_id")
    ex.add_argument("-o", "--output", required=True)
    im = add(rec, "import", cmd_recipes_import, "import a recipe bundle")
    im.add_argument("file")
    ap = add(rec, "apply", cmd_recipes_apply, "run a recipe on images")
    ap.add_argument("recipe_id")
    ap.add_argument("--image", action="append", help="an image file (repeatable)")
    ap.add_argument("--dataset", default="", help="or every image of a dataset: a folder on the miner's side or datasets/{id}")
    ap.add_argument("--masks", choices=["polygon", "rle", "none"], default="polygon")
    ap.add_argument("--detector", default="", help="refuse unless the recipe was mined with this detector")

    neg = sub.add_parser("negatives", help="hard negatives from mining").add_subparsers(dest="neg_cmd", required=True)
    ne = add(neg, "export", cmd_negatives_export, "write a mining job's hard negatives as a small YOLO dataset")
    ne.add_argument("job")
    ne.add_argument("-o", "--output", required=True)
    return rec
