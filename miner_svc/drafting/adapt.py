"""`--adapt`: the head's locator refitted on the images being drafted before they are drafted
(minehead.locator.adapt has the why).

    adapted = adapt(ctx, drafter, images, labelled)     # -> Adapted(drafter, head, info)

1. Up to SAMPLE images, evenly spaced over the folder, are drafted with the recipe set as it
   is; their feature maps are kept (the detector's own encoder pass, shared with that draft).
2. Each drafted box not flagged ambiguous is a pseudo-label; the ambiguous ones are unsure
   (no loss there).
3. The shipped locator is trained on further (fine-tuned from its own weights) on the labelled
   images' maps (the dataset the set was mined on, when this miner still has it) and the
   pseudo-labelled maps; the refiner, when the head has one, is refitted on the labelled images.
4. The head with that locator is a new head (its own content id) and drafts the folder; the
   recipes' thresholds are kept. Its bundle is written to the draft folder, so a resumed job
   drafts its remaining images with the same adapted head.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from minehead.core.errors import FailedPrecondition, MineheadError
from minehead.core.images import decode_image
from minehead.core.jobs import JobContext
from minehead.datasets import Dataset
from minehead.heads.bundle import HeadBundle, content_id
from minehead.locator import adapt as loc_adapt, refiner as loc_refiner, targets as loc_targets
from minehead.locator.frame import FeatureFrame

from miner_svc.detectors import tiling
from miner_svc.recipes.drafter import Drafter, make_drafter

SAMPLE = 32  # new images drafted for pseudo-labels
LABELLED = 64  # labelled images fine-tuned on, at most (evenly spaced)
ROUNDS = 2  # draft the sample, fine-tune; again with the adapted head (more confident drafts)
# A draft is a pseudo-label unless it is flagged ambiguous (its head margin is under the
# ambiguity margin, or the head calls it another class). A stricter rule, every threshold cleared
# by 0.1 (DraftBox.uncertainty), kept 1 of 23 drafts on 4 crowded scenes (precision of all drafts
# there: 0.91): too few to teach anything.
HEAD_FILE, INFO_FILE = "adapted_head.zip", "adapt.json"


@dataclasses.dataclass
class Adapted:
    drafter: Drafter  # drafts with the adapted head
    head: HeadBundle
    info: dict  # summary.json "adapt"


def check_adaptable(drafter: Drafter) -> None:
    """FailedPrecondition unless the set drafts with a locator (the thing adaptation refits)."""
    det = drafter.det.detector
    if getattr(det, "locator_proposals", None) is None or drafter.head.locator is None:
        raise FailedPrecondition(f"adapt refits the head's locator: recipe set {drafter.recipe_set.name} drafts with "
                                 f"{drafter.recipe_set.detector!r}; mine it with minisam-locator (a head trained with "
                                 "its locator) to adapt")


def evenly(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def adapted_drafter(ctx: JobContext, drafter: Drafter, images: list[Path], meta_dir: Path,
                    labelled) -> tuple[Drafter, dict]:
    """The drafting job's adapt step: (the drafter to draft the folder with, summary.json
    "adapt"). An earlier run's adapted head when the folder has one (a resumed job); else a new
    one. labelled: () -> (Dataset or None, why), the set's labelled images, asked only here."""
    done = resume(drafter, meta_dir)
    if done is not None:
        ctx.log(f"adapt: drafting with the adapted head {done.head.head_id} this folder's first run made")
        return done.drafter, done.info
    ds, why = labelled()
    got = adapt(ctx, drafter, images, ds, why, meta_dir)
    if got is None:
        return drafter, {"adapted": False, "reason": "no confident draft to learn from", "from_head": drafter.head.head_id}
    return got.drafter, {"adapted": True, **got.info}


def resume(drafter: Drafter, meta_dir: Path) -> Adapted | None:
    """The adapted head an earlier run of this folder made, or None."""
    if not (meta_dir / HEAD_FILE).is_file():
        return None
    head = HeadBundle.from_zip((meta_dir / HEAD_FILE).read_bytes())
    info = json.loads((meta_dir / INFO_FILE).read_text()) if (meta_dir / INFO_FILE).is_file() else {}
    return Adapted(with_head(drafter, head), head, {**info, "adapted": True, "resumed": True})


def with_head(drafter: Drafter, head: HeadBundle) -> Drafter:
    """A drafter like `drafter` (same recipe set, options, detector sessions) proposing with `head`."""
    return make_drafter(drafter.det.detector.with_head(head), head, drafter.recipe_set, drafter.options,
                        drafter.scorer.embeds, drafter.scorer.model, drafter.det.cache_dir)


def adapt(ctx: JobContext, drafter: Drafter, images: list[Path], labelled: Dataset | None, labelled_why: str,
          meta_dir: Path) -> Adapted | None:
    """The drafter with its locator adapted to `images` in ROUNDS rounds (each drafts the sample
    with the last round's head and fine-tunes the shipped locator on its pseudo-labels), or None
    (with the reason logged) when the first round's drafts gave no pseudo-label."""
    check_adaptable(drafter)
    t0 = time.perf_counter()
    head, det = drafter.head, drafter.det.detector
    sample = evenly(images, SAMPLE)
    ctx.phase("adapting")
    lab_maps, lab_tgts = _labelled(ctx, det, labelled, head.locator.classes)
    current, rounds = drafter, []
    for r in range(ROUNDS):
        got = _round(ctx, current, head, sample, lab_maps, lab_tgts, r)
        if got is None:
            break
        current, info = got
        rounds.append(info)
    if not rounds:
        ctx.warn(f"adapt: no confident draft on {len(sample)} images; drafting with the set's own head")
        return None
    new = current.head
    info = {"from_head": head.head_id, "head": new.head_id, "images_sampled": len(sample),
            "labelled_images": len(lab_maps), "labelled_source": labelled_why if not lab_maps else str(labelled.root),
            "confident_rule": "every kept draft not flagged ambiguous", "rounds": rounds,
            **{k: rounds[-1][k] for k in ("pseudo_labels", "unsure_drafts", "images_with_pseudo_labels", "skipped",
                                          "finetuned")},
            "seconds": round(time.perf_counter() - t0, 2)}
    meta_dir.mkdir(parents=True, exist_ok=True)
    (meta_dir / HEAD_FILE).write_bytes(new.to_zip())
    (meta_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    ctx.log(f"adapt: {len(rounds)} round(s) in {info['seconds']:.1f} s; drafting with head {new.head_id} "
            f"(adapted from {head.head_id})")
    return Adapted(current, new, info)


def _round(ctx: JobContext, drafter: Drafter, shipped: HeadBundle, sample: list[Path], lab_maps: list, lab_tgts: list,
           r: int) -> tuple[Drafter, dict] | None:
    """One round: the sample drafted with `drafter`, its pseudo-labels, the shipped locator
    fine-tuned on them and the labelled maps -> (a drafter with that head, what the round did)."""
    det, loc = drafter.det.detector, shipped.locator
    K = len(loc.classes)
    maps, tgts, frames, boxes, per_class, unsure_n, skipped = [], [], [], [], dict.fromkeys(loc.classes, 0), 0, []
    ctx.phase(f"adapting, round {r + 1} of {ROUNDS}")
    for n, path in enumerate(sample):
        ctx.check_cancelled()
        got = _draft_one(det, drafter, path, n)
        ctx.progress(n + 1, len(sample), "images")
        if isinstance(got, str):
            skipped.append({"image": path.name, "reason": got})
            continue
        fmap, frame, drafted = got
        ok = [not b.ambiguous and b.class_name in per_class for b in drafted.boxes]
        sure = [b for b, k in zip(drafted.boxes, ok) if k]
        unsure = [b for b, k in zip(drafted.boxes, ok) if not k]
        unsure_n += len(unsure)
        if not sure:
            continue
        for b in sure:
            per_class[b.class_name] += 1
        ids = np.array([loc.classes.index(b.class_name) for b in sure], np.int64)
        maps.append(fmap)
        frames.append(frame)
        boxes.append(_xyxy(sure))
        tgts.append(loc_adapt.pseudo_targets(boxes[-1], ids, _xyxy(unsure), frame, K))
    pseudo = sum(per_class.values())
    if not pseudo:
        return None
    ctx.log(f"adapt round {r + 1}: {pseudo} pseudo-labels on {len(maps)} of {len(sample)} images ("
            + ", ".join(f"{c} {k}" for c, k in per_class.items()) + f"; {unsure_n} ambiguous drafts left out), "
            + f"{len(lab_maps)} labelled images")
    ctx.check_cancelled()
    epochs = loc_adapt.finetune_epochs(loc.meta)
    nets = loc_adapt.finetune(loc_adapt.nets_from_onnx(shipped.locator_bytes), maps + lab_maps, tgts + lab_tgts,
                              loc_adapt.params_of(loc.meta), epochs)
    refiner = loc_adapt.refiner_from_onnx(shipped.locator_bytes)
    feats = (loc_refiner.box_features(loc_refiner.pooler(maps[0], frames[0]), frames[0], boxes[0])
             if refiner is not None else None)
    info = {"pseudo_labels": per_class, "unsure_drafts": unsure_n, "images_with_pseudo_labels": len(maps),
            "skipped": skipped, "finetuned": {"epochs": epochs, "members": len(nets),
                                              "from_epochs": int(loc.meta.get("epochs", 0)),
                                              "refiner": "the head's own" if refiner is not None else "none"}}
    loc_bytes, loc_meta = loc_adapt.export_adapted(nets, loc.meta, refiner, maps, {**info, "round": r + 1}, feats)
    new = _bundle(shipped, loc_bytes, loc_meta)
    return with_head(drafter, new), info


def _draft_one(det, drafter: Drafter, path: Path, index: int):
    """(feature map C x R x Cols, its frame, DraftedImage) of one image, one encoder pass for
    both; or why the image cannot teach (unreadable, failed, or drafted in tiles)."""
    try:
        data = path.read_bytes()
        image = decode_image(data, path.name)
    except (OSError, MineheadError) as e:
        return f"unreadable: {e}"
    W, H = image.width, image.height
    if len(tiling.plan(W, H, drafter.head.object_px, drafter.head.object_sides).tiles) > 1:
        return "drafted in tiles (adaptation reads whole-image maps)"
    fmap, frame = _feature_map(det, image)  # kept by the detector's recent-images cache for the draft
    drafted = drafter.draft(data, path.name, index)
    if drafted.error or drafted.failure:
        return drafted.error or drafted.failure
    return fmap, frame, drafted


def _feature_map(det, image) -> tuple[np.ndarray, FeatureFrame]:
    """The detector's map of one image (C x R x Cols, its own encoder pass) and its frame."""
    fmap = det._features(det.set_image(image)).fmap
    return fmap, FeatureFrame.for_image(image.width, image.height, det.pre.input_size, det.pre.resize,
                                        fmap.shape[1], fmap.shape[2])


def _labelled(ctx, det, ds: Dataset | None, classes: list[str]) -> tuple[list, list]:
    """(maps, targets) of up to LABELLED labelled images (their boxes of the locator's classes)."""
    maps, tgts = [], []
    if ds is None:
        return maps, tgts
    names = {i: classes.index(c) for i, c in enumerate(ds.classes) if c in classes}
    for rec in evenly(ds.images, LABELLED):
        ctx.check_cancelled()
        try:
            image = decode_image(rec.path.read_bytes(), rec.path.name)
        except (OSError, MineheadError):
            continue
        fmap, frame = _feature_map(det, image)
        sel = np.array([int(c) in names for c in rec.class_ids], bool)
        ids = np.array([names[int(c)] for c in rec.class_ids[sel]], np.int64)
        maps.append(fmap)
        tgts.append(loc_adapt.per_class_valid(loc_targets.build(rec.boxes[sel], ids, frame, len(classes)), len(classes)))
    return maps, tgts


def _xyxy(boxes) -> np.ndarray:
    return np.array([[b.box.x1, b.box.y1, b.box.x2, b.box.y2] for b in boxes], np.float64).reshape(-1, 4)


def _bundle(head: HeadBundle, locator_bytes: bytes, locator_meta: dict) -> HeadBundle:
    """`head` with another locator: a new head (its own content id), display name marked."""
    meta = {k: v for k, v in head.meta.items() if k not in ("head_id", "display_name")}
    meta["locator"] = locator_meta
    meta["display_name"] = f"{head.display_name or head.head_id} (adapted)"
    meta["head_id"] = content_id(head.onnx_bytes, meta, locator_bytes)
    return HeadBundle.from_files({"head.onnx": head.onnx_bytes, "meta.json": json.dumps(meta).encode(),
                                  **({"report.json": json.dumps(head.report).encode()} if head.report else {}),
                                  "locator.onnx": locator_bytes})
