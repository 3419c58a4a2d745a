"""The mining job: dataset + head + detector -> one recipe per class (design notes section 7).

    mined = mine(ctx, run, new_scorer, pool)      # the recipes, the run summary, hard negatives

1. Detect: every (image, prompt) once at the floor, on the ImagePool (in process or on Ray);
   the detection cache makes every later threshold a filter.
2. Split the images into select/tune and report parts (stratified by class, by image).
3. Per class, `Miner.mine_class` on the tune part; metrics on the report part.
4. The run summary: detector, background settings, passes, cache hits, time per phase,
   warnings, each class's report line.

`mining_job` is StartMining's job: it stores each recipe as its class finishes (a cancelled job
keeps the classes it completed), makes the job's recipe set, and keeps the hard negatives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import numpy as np

from minehead import sampling
from minehead.core.jobs import JobContext, job_id_from_name, struct_from_dict
from minehead.datasets import Dataset
from minehead.heads.bundle import IMAGE_ID_HEX, HeadBundle
from minehead.miner.v1 import miner_pb2
from minehead.recipes.v2 import recipes_pb2

from miner_svc.mining import negatives
from miner_svc.mining.miner import ImageItem, Miner
from miner_svc.mining.report import class_report
from miner_svc.mining.settings import MiningSettings
from miner_svc.recipes.detection_cache import CachedDetector
from miner_svc.recipes.scorer import HeadScorer
from miner_svc.recipes.sets import RecipeSetStore, make_set
from miner_svc.recipes.store import RecipeStore
from miner_svc.scale.pool import ImagePool


@dataclasses.dataclass
class MiningRun:
    """A mining job's inputs, checked when the job was asked for. label: the dataset as the
    user named it (a path or "datasets/{id}"), for the recipes' provenance."""

    dataset: Dataset
    head: HeadBundle
    det: CachedDetector
    settings: MiningSettings
    label: str

    def with_settings(self, settings: MiningSettings) -> "MiningRun":
        return dataclasses.replace(self, settings=settings)


@dataclasses.dataclass
class Mined:
    recipes: list[recipes_pb2.Recipe]
    summary: dict  # MiningResult.summary, before the hard-negative count
    negatives: list[dict]


def split_images(ds: Dataset, classes: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(select/tune positions, report positions) of ds.images, stratified by class, by image."""
    ids = [ds.classes.index(c) for c in classes]
    sets = [{int(c) for c in r.class_ids if int(c) in ids} for r in ds.images]
    tune, report, _ = sampling.group_split(sets, fraction, np.random.default_rng(seed), ds.classes)
    return tune, report


def mining_job(ctx: JobContext, run: MiningRun, new_scorer: Callable[[], HeadScorer], pool: ImagePool,
               store: RecipeStore, sets: RecipeSetStore, negatives_dir: Path) -> miner_pb2.MiningResult:
    """StartMining's job: mine, keep each recipe in the store as its class finishes, make the
    job's recipe set, keep the hard negatives."""
    ctx.phase("preparing")
    result = miner_pb2.MiningResult()
    ctx.partial_result = result

    def keep(r: recipes_pb2.Recipe) -> recipes_pb2.Recipe:
        stored = store.put(r, run.head)
        result.recipes.append(stored)
        return stored

    mined = mine(ctx, run, new_scorer, pool, on_recipe=keep)
    if result.recipes:
        rset = sets.put(make_set(list(result.recipes), run.head, ctx.name), run.head)
        result.recipe_set = rset.name
        ctx.log(f"recipe set {rset.name}: {', '.join(rset.classes)} (draft with `minehead draft --recipes {rset.name}`)")
    negatives.save(negatives_dir, job_id_from_name(ctx.name), run.dataset.root, mined.negatives)
    mined.summary["hard_negatives"] = len(mined.negatives)
    result.summary.CopyFrom(struct_from_dict(mined.summary))
    return result


def mine(ctx: JobContext, run: MiningRun, new_scorer: Callable[[], HeadScorer], pool: ImagePool,
         on_recipe: Callable[[recipes_pb2.Recipe], recipes_pb2.Recipe] | None = None) -> Mined:
    """Mine every class of the run; `on_recipe(recipe)` runs as each class finishes."""
    det, s = run.det, run.settings
    t_start = time.perf_counter()
    before, hits0, misses0 = det.counters.snapshot(), det.hits, det.misses
    scorer = new_scorer()
    warnings = _run_warnings(ctx, run)
    ctx.phase("detecting")
    positions = list(range(len(run.dataset.images)))[: s.max_images or None]
    items, failed = _detect(ctx, run, positions, scorer, pool)
    if failed:
        warnings.append(f"{len(failed)} image(s) failed with an unexpected error and were left out of mining "
                        f"({failed[0]['image']}: {failed[0]['reason']}; all in the summary's `failed_images`)")
        positions = [p for p, it in zip(positions, items) if it is not None]
        items = [it for it in items if it is not None]
    t_detect = time.perf_counter() - t_start
    tune_i, report_i = _split(run, positions)
    tune, report = [items[i] for i in tune_i], [items[i] for i in report_i]
    ctx.log(f"split: {len(tune)} select/tune images, {len(report)} report images")
    oof = out_of_fold_images(run, [it.state.image.sha256 for it in items])
    if oof is not None:
        ctx.log(f"out-of-fold: {oof} of {len(items)} images scored by the fold models of head {run.head.head_id} "
                "that were not fitted on them (cross-fitting)")
    # images scored out of fold are new to the models that scored them
    seen = seen_in_training(run.head, [it.state.image.sha256 for it in report
                                       if oof is None or run.head.fold_for(it.state.image.sha256) is run.head])
    if seen:
        warnings.append(f"{seen} of {len(report)} report images are among the images head {run.head.head_id} was "
                        f"trained on ({'its locator' if run.head.locator is not None else 'its classifier'} was fitted "
                        "on them): the held-out precision and recall overstate what new images get; mine on "
                        "labelled images the head did not train on for figures that carry over")
        ctx.warn(warnings[-1])
    miner = Miner(run.dataset, det, run.head, scorer, s, ctx)
    miner.warnings = warnings
    recipes = []
    for k, c in enumerate(s.classes):
        ctx.phase(f"mining {c}")
        r = miner.mine_class(c, tune, report)
        _provenance(r, ctx, run, items, tune_i, report_i)
        recipes.append(on_recipe(r) if on_recipe else r)
        ctx.metrics({"class": c, "precision": r.summary.precision, "recall": r.summary.recall,
                     "true_positives": r.summary.true_positives, "false_positives": r.summary.false_positives,
                     "ground_truth": r.summary.ground_truth, "steps": len(r.steps)})
        ctx.progress(k + 1, len(s.classes), "classes")
    summary = {
        "detector": det.info.model_id, "detector_meaningless": det.info.meaningless, "head": run.head.head_id,
        "background": _background_summary(run), "passes": det.counters.since(before),
        "detection_cache": {"hits": det.hits - hits0, "misses": det.misses - misses0},
        "images": len(items), "tune_images": len(tune), "report_images": len(report),
        **({"failed_images": failed} if failed else {}),
        **({"report_images_seen_in_training": seen} if seen is not None else {}),
        **({"out_of_fold": {"folds": run.head.folds, "images": oof}} if oof is not None else {}),
        "seconds": {"detecting": round(t_detect, 3), **{k: round(v, 3) for k, v in miner.timings.items()},
                    "total": round(time.perf_counter() - t_start, 3)},
        # run-level warnings, then each class's own (an unreachable target, no step found)
        "warnings": warnings + list(dict.fromkeys(w for r in recipes for w in r.summary.warnings if w not in warnings)),
        "classes": {r.class_name: class_report(r) for r in recipes},
    }
    return Mined(recipes, summary, miner.negatives)


def out_of_fold_images(run: MiningRun, image_sha256: list[str]) -> int | None:
    """How many of these images are scored by a fold's models (mining out of fold with a
    cross-fitted head); None when mining scores every image with the shipped head."""
    if not (run.settings.out_of_fold and run.head.folds):
        return None
    return sum(run.head.fold_for(h) is not run.head for h in image_sha256)


def seen_in_training(head: HeadBundle, image_sha256: list[str]) -> int | None:
    """How many of these images (sha256 hex of their files) the head was trained on; None when
    the head does not record its training images (older heads, uploads without them)."""
    trained = head.training_images
    if trained is None:
        return None
    return sum(h[:IMAGE_ID_HEX] in trained for h in image_sha256)


def _run_warnings(ctx: JobContext, run: MiningRun) -> list[str]:
    """What holds for the whole run: a head without background classes, a meaningless detector."""
    warnings = []
    if not run.head.background_indices:
        warnings.append(f"head {run.head.head_id} has no __bg_* classes: every background feature is off")
        if run.settings.background.veto:
            ctx.warn(warnings[-1])
    info = run.det.info
    if info.meaningless:
        warnings.append(f"detector {info.model_id} is a {info.note or 'random-weight model: its detections are meaningless'}")
        ctx.warn(warnings[-1])
    return warnings


def _detect(ctx: JobContext, run: MiningRun, positions: list[int], scorer: HeadScorer,
            pool: ImagePool) -> tuple[list[ImageItem | None], list[dict]]:
    """Every image's floor runs for every prompt of every class, on the pool: ImageItems in
    position order (None where the image failed), and the failed images with their errors."""
    ds, s = run.dataset, run.settings
    prompts = {c: [c.replace("_", " ")] + s.prompts.get(c, []) for c in s.classes}
    images = [(k, ds.images[i].path.name, ds.images[i].path) for k, i in enumerate(positions)]
    items: list = [None] * len(positions)
    failed = []
    with closing(pool.detect(ctx, run.det, run.head, scorer.model, images, [p for c in s.classes for p in prompts[c]])) as done:
        for n, (k, data, state, failure) in enumerate(done):
            rec = ds.images[positions[k]]
            if failure:
                failed.append({"image": rec.path.name, "reason": failure})
                ctx.warn(f"{rec.path.name} failed: {failure} (left out of mining)")
            else:
                items[k] = ImageItem(positions[k], data, state, rec.boxes, rec.class_ids)
            ctx.progress(n + 1, len(positions), "images")
    return items, sorted(failed, key=lambda f: f["image"])


def _split(run: MiningRun, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ds, s = run.dataset, run.settings
    sub = type(ds)(ds.root, ds.classes, [ds.images[i] for i in positions], ds.dropped, ds.has_splits)
    return split_images(sub, s.classes, s.report_fraction, s.seed)


def _provenance(r: recipes_pb2.Recipe, ctx: JobContext, run: MiningRun, items: list[ImageItem], tune_i, report_i) -> None:
    r.provenance.dataset = run.label
    r.provenance.job = ctx.name
    r.provenance.mining_settings_json = run.settings.provenance_json()
    r.provenance.sample_sha256 = _sha([it.state.image.sha256 for it in items])
    r.provenance.split_sha256 = _sha([str(i) for i in tune_i] + ["|"] + [str(i) for i in report_i])


def _background_summary(run: MiningRun) -> dict:
    """The background settings as the summary reports them (the seed briefs' names)."""
    bg = run.settings.background
    return {"clip_head_background_guard": bg.veto and bool(run.head.background_indices),
            "clip_head_background_apply": bg.stage, "clip_head_background_margin": bg.margin,
            "clip_head_background_penalty": bg.penalty}


def _sha(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
