"""What mining reports: the recipe with its summary (held-out counts, background vetoes per
step and stage, image-level metrics, warnings), each class's line of the run summary, and the
"bg veto" log line.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minehead.heads.bundle import HeadBundle
from minehead.recipes.v2 import recipes_pb2

from miner_svc.detectors.base import DetectorInfo
from miner_svc.mining import selection
from miner_svc.mining.settings import MiningSettings
from miner_svc.recipes.codec import gate_proto, step_proto
from miner_svc.recipes.executor import Gate, ImageResult, Step, StepStats


@dataclasses.dataclass(frozen=True)
class MinedClass:
    """The class being mined: its name, its id in the dataset, its column in the head."""

    name: str
    class_id: int
    target: int


@dataclasses.dataclass
class Evaluation:
    """The chosen recipe run on both parts of the split (no runs when no step was found)."""

    tune: selection.Counts
    report: selection.Counts
    report_results: list[ImageResult]
    step_stats: list[StepStats]  # per step, tune and report together
    new_instances: list[int]  # per step: tune instances it matches that earlier steps do not


def veto_line(st: StepStats) -> str:
    return (f"bg veto: {st.seeds_vetoed}/{st.seeds_checked} seeds dropped ({st.seeds_vetoed_background_only} by background "
            f"alone), {st.final_vetoed}/{st.final_checked} final vetoed ({st.final_vetoed_background_only} by background "
            "alone)")


def step_logs(steps: list[Step], ev: Evaluation) -> list[recipes_pb2.StepLog]:
    out = []
    for i, (step, st) in enumerate(zip(steps, ev.step_stats)):
        out.append(recipes_pb2.StepLog(
            step_index=i, prompt=step.prompt, seeds_checked=st.seeds_checked, seeds_vetoed_background=st.seeds_vetoed,
            final_checked=st.final_checked, final_vetoed_background=st.final_vetoed,
            seeds_vetoed_background_only=st.seeds_vetoed_background_only,
            final_vetoed_background_only=st.final_vetoed_background_only, new_instances_covered=ev.new_instances[i],
            bg_veto_rate_seed=st.bg_veto_rate_seed, bg_veto_rate_final=st.bg_veto_rate_final, messages=[veto_line(st)]
            + (["the background check vetoed every seed on some image: retried without the veto"]
               if st.retried_without_veto else [])
            + ([f"prompt filter skipped expansion on {st.prompt_filtered} image(s)"] if st.prompt_filtered else [])))
    return out


def class_warnings(c: MinedClass, steps: list[Step], tune: selection.Counts, best_precision: float,
                   target_precision: float, run_warnings: list[str]) -> tuple[list[str], bool]:
    """(the class's warnings after the run's own, whether the target precision was met on tune).
    When it was not, the last warning says so (the job also reports it as it happens)."""
    warnings = list(run_warnings)
    if not steps:
        warnings.append(f"no step found for {c.name!r}: no prompt/threshold produced a detection the head kept")
    met = bool(steps) and selection.meets_target(tune, target_precision)
    if not met:
        best = max(best_precision, tune.precision)
        n = tune.tp + tune.fp
        if steps and n and tune.precision >= target_precision:  # the precision rests on too few boxes
            warnings.append(f"{c.name}: tune precision {tune.precision:.2f} rests on {n} box(es): by the rule of "
                            f"succession ({tune.tp} + 1) / ({n} + 2) = {tune.succession:.2f} < target "
                            f"{target_precision:.2f}")
        elif best < target_precision:
            warnings.append(f"{c.name}: best tune precision {best:.2f} < target {target_precision:.2f}")
        else:
            warnings.append(f"{c.name}: tune precision {tune.precision:.2f} < target {target_precision:.2f} "
                            "once the head gate and expansion were chosen")
    return warnings, met


def build_recipe(s: MiningSettings, det: DetectorInfo, head: HeadBundle, c: MinedClass, steps: list[Step], gate: Gate,
                 ev: Evaluation, warnings: list[str], met: bool, report_gt: list[np.ndarray],
                 fit_images: int = 0) -> recipes_pb2.Recipe:
    """The mined recipe: its steps, its gate as the recipe stores it, and the summary of its run
    on the report images (report_gt: each report image's boxes of the class, G x 4 XYXY).
    fit_images: how many images the shipped steps and gate were chosen on."""
    total = StepStats()
    for st in ev.step_stats:
        total.add(st)
    preds = [r.boxes for r in ev.report_results] if steps else [np.zeros((0, 4)) for _ in report_gt]
    il = selection.image_level(list(zip(preds, report_gt)))
    if det.meaningless:
        warnings = warnings + [f"detector {det.model_id} has random weights: these detections are meaningless"]
    rep, tune = ev.report, ev.tune
    return recipes_pb2.Recipe(
        class_name=c.name, steps=[step_proto(st) for st in steps], target_precision=s.target_precision,
        gate=gate_proto(gate, s.background, tuned=gate.background.veto and s.auto_tune),
        head=recipes_pb2.HeadRef(head_id=head.head_id, classes=head.classes, embedder_model=head.embedder_model),
        detector=recipes_pb2.DetectorRef(model_id=det.model_id, class_agnostic=det.class_agnostic,
                                         meaningless=det.meaningless),
        summary=recipes_pb2.Summary(
            precision=rep.precision, recall=rep.recall, true_positives=rep.tp, false_positives=rep.fp,
            ground_truth=rep.gt, duplicates=rep.dup, report_images=len(report_gt),
            bg_veto_rate_seed=total.bg_veto_rate_seed, bg_veto_rate_final=total.bg_veto_rate_final,
            bg_confusion_rate=total.bg_confusion_rate, steps=step_logs(steps, ev), warnings=warnings,
            tune_precision=tune.precision, tune_recall=tune.recall, target_met=met,
            selection_rule=selection.selection_rule(tune, s.target_precision),
            seeds_checked=total.seeds_checked, seeds_vetoed_background=total.seeds_vetoed,
            seeds_vetoed_background_only=total.seeds_vetoed_background_only, final_checked=total.final_checked,
            final_vetoed_background=total.final_vetoed, final_vetoed_background_only=total.final_vetoed_background_only,
            image_level=recipes_pb2.ImageLevelMetrics(**il), fit_images=fit_images))


def class_report(r: recipes_pb2.Recipe) -> dict:
    """One class's line of the run summary: the held-out counts, whether the target was met and
    by which rule the recipe was chosen, background vetoes per stage, and SAM3's metrics."""
    s = r.summary
    il = s.image_level
    return {"precision": round(s.precision, 4), "recall": round(s.recall, 4), "true_positives": s.true_positives,
            "false_positives": s.false_positives, "ground_truth": s.ground_truth,
            "tune_precision": round(s.tune_precision, 4), "target_precision": round(float(r.target_precision), 4),
            "target_met": s.target_met, "selection_rule": s.selection_rule, "fit_images": s.fit_images,
            "background": {"seeds_checked": s.seeds_checked, "seeds_vetoed_background": s.seeds_vetoed_background,
                           "seeds_vetoed_background_only": s.seeds_vetoed_background_only,
                           "final_checked": s.final_checked, "final_vetoed_background": s.final_vetoed_background,
                           "final_vetoed_background_only": s.final_vetoed_background_only,
                           "bg_veto_rate_seed": round(s.bg_veto_rate_seed, 4), "bg_veto_rate_final": round(s.bg_veto_rate_final, 4),
                           "bg_confusion_rate": round(s.bg_confusion_rate, 4)},
            "image_level": {"true_positives": il.true_positives, "false_positives": il.false_positives,
                            "false_negatives": il.false_negatives, "true_negatives": il.true_negatives,
                            "il_mcc": round(il.il_mcc, 4), "positive_micro_f1": round(il.positive_micro_f1, 4),
                            "cg_f1": round(il.cg_f1, 4)},
            "steps": [{"prompt": st.prompt, "new_instances_covered": st.new_instances_covered} for st in s.steps]}
