"""Mining one class: the tune images, the cached detector and the head -> one recipe
(design notes section 7). Each step is a method that returns a small value:

    prompts_for       the class's prompts (one empty prompt for a class-agnostic detector)
    filter_prompts    drop a prompt whose seeds the background check mostly vetoes, before
                      paying for any expansion
    cover             greedy set cover of the tune split's ground truth with (prompt, seed
                      threshold) steps, scored by the one objective (selection.objective)
    tune_gate         the head gate sweep (min_prob x margin x background margin, vectorised)
                      on cached per-box rows
    expand            box-exemplar expansion, kept only where it helps on the tune images
    evaluate          the executor on both parts: counts, per-step background vetoes, the
                      instances each step adds, hard negatives
and `report.build_recipe` writes the recipe with its summary. Every evaluation is the executor
itself (`run_recipe`) over the detection cache, so it is CPU work after the first pass, and
mining's metrics and ApplyRecipe's agree.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from minehead.core.jobs import JobContext
from minehead.datasets import Dataset
from minehead.heads.bundle import HeadBundle
from minehead.recipes.v2 import recipes_pb2

from miner_svc.detectors.base import ImageState
from miner_svc.mining import selection
from miner_svc.mining.negatives import hard_negatives
from miner_svc.mining.report import Evaluation, MinedClass, build_recipe, class_warnings, veto_line
from miner_svc.mining.settings import MiningSettings
from miner_svc.recipes.detection_cache import CachedDetector
from miner_svc.recipes.executor import Gate, ImageResult, Step, StepStats, run_recipe
from miner_svc.recipes.scorer import HeadScorer


@dataclasses.dataclass
class ImageItem:
    """One dataset image, detected: its position in the dataset, file bytes, detector state, and
    ground truth (boxes G x 4 XYXY image pixels, their dataset class ids G)."""

    index: int
    data: bytes
    state: ImageState
    gt_boxes: np.ndarray
    gt_classes: np.ndarray


@dataclasses.dataclass
class Cover:
    """The set cover's steps, and the best tune precision of any setting it tried."""

    steps: list[Step]
    best_precision: float


class Miner:
    """Holds what one job needs: the dataset images, the cached detector and the head."""

    def __init__(self, ds: Dataset, det: CachedDetector, head: HeadBundle, scorer: HeadScorer, settings: MiningSettings,
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
        return selection.objective(c, self.s.target_precision, self.s.background.penalty, looseness), c

    # -- per class --------------------------------------------------------------------------
    def mine_class(self, name: str, tune: list[ImageItem], report: list[ImageItem]) -> recipes_pb2.Recipe:
        c = MinedClass(name, self.ds.classes.index(name), self.head.classes.index(name))
        steps, gate, cover = self.select(c, tune, timed=True)
        ev = self.evaluate(c, steps, tune, report, gate)
        warnings, met = class_warnings(c, steps, ev.tune, cover.best_precision, self.s.target_precision, self.warnings)
        if not met:
            self.ctx.warn(warnings[-1])
        fit = tune
        if self.s.refit_all_images and report:  # also when the tune split alone gave no step
            # The held-out figures are taken: with 2-4 labelled images every one of them counts,
            # so the shipped steps and gate are chosen again on all of them.
            fit = tune + report
            steps, gate, _ = self.select(c, fit)
            self.ctx.log(f"[{c.name}] refit on all {len(fit)} images: "
                         + ", ".join(f"{st.prompt!r} >= {st.seed_threshold:.3f}" for st in steps)
                         + f"; min_prob {gate.min_prob:.2f}")
        return build_recipe(self.s, self.det.info, self.head, c, steps, gate, ev, warnings, met,
                            [it.gt_boxes[it.gt_classes == c.class_id] for it in report], fit_images=len(fit))

    def select(self, c: MinedClass, items: list[ImageItem], timed: bool = False) -> tuple[list[Step], Gate, Cover]:
        """Steps and gate chosen on `items`: prompt filter, set cover, gate (and threshold) sweep,
        expansion."""
        gate = self.base_gate()
        t0 = time.perf_counter()
        live = self.filter_prompts(c, self.prompts_for(c.name), items, gate)
        cover = self.cover(c, live, items, gate)
        t1 = time.perf_counter()
        steps = cover.steps
        if not steps and live and self.s.auto_tune:
            # Nothing covered under the head's default gate (a head trained on a few images is
            # rarely sure of anything): the joint threshold and gate sweep gets the first prompt
            # from the floor, and keeps it only if it then finds something.
            steps = [Step(live[0], self.s.floor)]
        steps, gate = self.tune_gate(c, steps, items, gate)
        if steps and not cover.steps and self.score(items, steps, gate, c.target, c.class_id)[1].tp == 0:
            steps, gate = [], self.base_gate()
        if timed:
            self.timings[f"select:{c.name}"] = t1 - t0
            self.timings[f"gate:{c.name}"] = time.perf_counter() - t1
        return self.expand(c, steps, items, gate), gate, cover

    def base_gate(self) -> Gate:
        """The gate the search starts from: the head's default min_prob, no margin, the asked
        background policy, its veto on only where the head has background classes (and no
        prompt filter for a class-agnostic detector: its one prompt cannot be dropped)."""
        bg = dataclasses.replace(self.s.background, veto=self.s.background.veto and bool(self.head.background_indices))
        if self.det.info.class_agnostic:
            bg = dataclasses.replace(bg, filter_prompts=False)
        return Gate(min_prob=self.head.default_thresholds.min_prob, margin=0.0, background=bg)

    def prompts_for(self, name: str) -> list[str]:
        if self.det.info.class_agnostic:
            return [""]  # a text prompt cannot steer this detector: one step, the head assigns the class
        spoken = name.replace("_", " ")
        return [spoken] + [p for p in self.s.prompts.get(name, []) if p and p != spoken]

    def filter_prompts(self, c: MinedClass, prompts: list[str], tune: list[ImageItem], gate: Gate) -> list[str]:
        """The prompts the background check leaves (at least the first): a prompt whose seeds it
        mostly vetoes on the tune images is dropped before any expansion is paid for."""
        live = []
        for p in prompts:
            st = StepStats()
            for r in self.run(tune, [Step(p, self.s.floor)], gate, c.target):
                st.add(r.stats[0])
            if gate.background.veto and self.s.background.drops_prompt(st.seeds_checked, st.seeds_vetoed):
                self.ctx.log(f"[{c.name}] prompt {p!r} dropped: bg veto {st.seeds_vetoed}/{st.seeds_checked} seeds")
                continue
            live.append(p)
        return live or prompts[:1]

    def cover(self, c: MinedClass, prompts: list[str], tune: list[ImageItem], gate: Gate) -> Cover:
        """Greedy set cover over (prompt, threshold) steps on the tune images: add the step that
        scores best with the steps so far; stop at max_steps, when nothing new is covered, or
        when gains stall."""
        s = self.s
        grids = {p: selection.threshold_grid(np.concatenate([self.det.text(it.state, p).scores for it in tune]
                                                            or [np.zeros(0)]), s.floor) for p in prompts}
        chosen: list[Step] = []
        best_score, best_counts = -np.inf, None
        best_precision = 0.0  # over every setting tried, for the unreachable-target warning
        for round_ in range(s.max_steps):
            self.ctx.check_cancelled()
            cand_best = None
            for p in prompts:
                for t in grids[p]:
                    sc, counts = self.score(tune, chosen + [Step(p, t)], gate, c.target, c.class_id, looseness=1 - t)
                    best_precision = max(best_precision, counts.precision)
                    if cand_best is None or sc > cand_best[0]:
                        cand_best = (sc, counts, Step(p, t))
            covered_before = best_counts.tp if best_counts else 0
            if cand_best is None or cand_best[1].tp <= covered_before or cand_best[0] <= best_score + 1e-9:
                break  # nothing new covered, or gains stalled
            best_score, best_counts = cand_best[0], cand_best[1]
            chosen.append(cand_best[2])
            self.ctx.log(f"[{c.name}] step {round_ + 1}: {cand_best[2].prompt!r} >= {cand_best[2].seed_threshold:.3f} -> "
                         f"tune precision {best_counts.precision:.2f}, recall {best_counts.recall:.2f}")
        return Cover(chosen, best_precision)

    def tune_gate(self, c: MinedClass, steps: list[Step], tune: list[ImageItem], gate: Gate) -> tuple[list[Step], Gate]:
        """The head gate swept on cached per-box rows: the candidates with the seed-stage veto as
        configured and no final gate, so every candidate is a row. The background margin is
        tuned only while the veto is on.

        A one-step recipe has its seed threshold swept jointly with the gate: the cover chose
        the threshold under the head's default gate, so a detector that already tells the
        classes apart (a locator's per-class peaks) was held to the head's opinion, and a head
        that could not tell look-alikes apart cost half a class's recall at any threshold."""
        s, bg = self.s, gate.background
        if not (s.auto_tune and steps):
            return steps, gate
        open_gate = dataclasses.replace(gate, min_prob=-1.0, margin=0.0,
                                        background=dataclasses.replace(bg, stage="seed", veto=bg.at_seed))
        joint = len(steps) == 1
        probe = [dataclasses.replace(steps[0], seed_threshold=s.floor)] if joint else steps
        rows_p, rows_tp, rows_s, gt_n = [], [], [], 0
        for it, r in zip(tune, self.run(tune, probe, open_gate, c.target)):
            gt = it.gt_boxes[it.gt_classes == c.class_id]
            _, d2g = selection.count(r.boxes, r.scores, gt)
            rows_p.append(r.probs)
            rows_tp.append(d2g >= 0)
            rows_s.append(r.scores)
            gt_n += len(gt)
        probs, is_tp, scores = np.concatenate(rows_p), np.concatenate(rows_tp), np.concatenate(rows_s)
        if joint:
            thresholds = sorted({steps[0].seed_threshold, *selection.threshold_grid(scores, s.floor, n=16)})
            t, params, _ = selection.sweep_threshold_and_gate(scores, probs, is_tp, c.target, self.head.background_indices,
                                                              gt_n, thresholds, s.target_precision, bg.veto, bg.penalty)
        else:  # several steps: their own thresholds stand
            rows = selection.GateRows.from_probs(probs, c.target, self.head.background_indices, is_tp, gt_n)
            params, _ = selection.sweep_gate(rows, s.target_precision, bg.veto, bg.penalty)
        if not params:
            return steps, gate
        if joint and t != steps[0].seed_threshold:
            self.ctx.log(f"[{c.name}] seed threshold {steps[0].seed_threshold:.3f} -> {t:.3f} (tuned with the gate)")
            steps = [dataclasses.replace(steps[0], seed_threshold=float(t))]
        tuned = dataclasses.replace(gate, min_prob=params.min_prob, margin=params.margin,
                                    background=dataclasses.replace(bg, margin=params.background_margin if bg.veto else bg.margin))
        self.ctx.log(f"[{c.name}] gate: min_prob {tuned.min_prob:.2f}, margin {tuned.margin:.2f}"
                     + (f", background margin {tuned.background.margin:.2f}" if bg.veto else ""))
        return steps, tuned

    def expand(self, c: MinedClass, steps: list[Step], tune: list[ImageItem], gate: Gate) -> list[Step]:
        """The steps with box-exemplar expansion where it scores better on the tune images."""
        s = self.s
        if not (steps and s.max_visual_seeds > 0):
            return steps
        t0 = time.perf_counter()
        base, _ = self.score(tune, steps, gate, c.target, c.class_id)
        # SAM3 scores exemplar hits like text hits; the proposal detector scores them by
        # embedding similarity to the exemplars, which lives higher up.
        grid = (0.8, 0.9, 0.95) if self.det.info.class_agnostic else (0.3, 0.5, 0.7)
        for et in grid:
            trial = [dataclasses.replace(st, max_visual_seeds=s.max_visual_seeds, expand_threshold=et) for st in steps]
            sc, _ = self.score(tune, trial, gate, c.target, c.class_id)
            if sc > base + 1e-9:
                base, steps = sc, trial
        self.timings[f"expand:{c.name}"] = time.perf_counter() - t0
        return steps

    def evaluate(self, c: MinedClass, steps: list[Step], tune: list[ImageItem], report: list[ImageItem],
                 gate: Gate) -> Evaluation:
        """The executor on both parts: counts (report: the held-out metrics), each step's
        background vetoes, the instances each step adds on tune; hard negatives collected."""
        if not steps:
            gt = sum(int((it.gt_classes == c.class_id).sum()) for it in report)
            return Evaluation(selection.Counts(), selection.Counts(gt=gt), [], [], [])
        tune_results = self.run(tune, steps, gate, c.target)
        report_results = self.run(report, steps, gate, c.target)
        tune_c, _ = self.counts(tune, tune_results, c.class_id)
        report_c, _ = self.counts(report, report_results, c.class_id)
        step_stats = [StepStats() for _ in steps]
        for items, results in ((tune, tune_results), (report, report_results)):
            for it, r in zip(items, results):
                for i, st in enumerate(r.stats):
                    step_stats[i].add(st)
                self.negatives += hard_negatives(it, r, c.class_id, c.name, self.head.background_indices,
                                                 self.s.hard_negative_min_bg_prob)
        new = self.new_instances(tune, steps, gate, c, tune_results)
        for i, (step, st) in enumerate(zip(steps, step_stats)):
            self.ctx.log(f"[{c.name}] step {i} ({step.prompt!r}): {veto_line(st)}; {new[i]} new instance(s) on tune")
        return Evaluation(tune_c, report_c, report_results, step_stats, new)

    def new_instances(self, tune: list[ImageItem], steps: list[Step], gate: Gate, c: MinedClass,
                      full: list[ImageResult]) -> list[int]:
        """Per step, in recipe order: ground-truth instances on the tune split that steps[:k+1]
        match and steps[:k] do not, with the final gate (cached rows: CPU only). `full` is the
        whole recipe's results on tune, already computed."""
        covered: set[tuple[int, int]] = set()
        out = []
        for k in range(len(steps)):
            results = full if k == len(steps) - 1 else self.run(tune, steps[:k + 1], gate, c.target)
            now = set()
            for n, (it, r) in enumerate(zip(tune, results)):
                _, d2g = selection.count(r.boxes, r.scores, it.gt_boxes[it.gt_classes == c.class_id])
                now |= {(n, int(j)) for j in d2g[d2g >= 0]}
            out.append(len(now - covered))
            covered |= now
        return out
