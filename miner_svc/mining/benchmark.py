"""The A/B benchmark of the background veto (seed brief 002): the same mining run with no veto,
the veto at seed and final stage, and the veto with a margin, side by side: precision,
coverage and veto rates per arm."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from minehead.core.jobs import JobContext, struct_from_dict
from minehead.miner.v1 import miner_pb2

from miner_svc.mining.job import MiningRun, mine
from miner_svc.recipes.scorer import HeadScorer
from miner_svc.scale.pool import ImagePool


def arms(margin: float) -> list[tuple[str, dict]]:
    """(name, changes to the run's BackgroundPolicy) per arm; the names are the report's."""
    return [("no guard", dict(veto=False)), ("guard seed+final", dict(veto=True, stage="both", margin=0.0)),
            (f"guard+margin {margin:g}", dict(veto=True, stage="both", margin=margin))]


def benchmark_job(ctx: JobContext, run: MiningRun, margin: float, new_scorer: Callable[[], HeadScorer],
                  pool: ImagePool) -> miner_pb2.BenchmarkResult:
    rows = []
    plan = arms(margin)
    for k, (name, changes) in enumerate(plan):
        ctx.phase(f"arm: {name}")
        s = run.settings
        arm = run.with_settings(dataclasses.replace(s, background=dataclasses.replace(s.background, **changes)))
        t0 = time.perf_counter()
        mined = mine(ctx, arm, new_scorer, pool)
        rows.append({"arm": name, **_arm_row(mined.recipes), "seconds": round(time.perf_counter() - t0, 3),
                     "passes": mined.summary["passes"]})
        ctx.progress(k + 1, len(plan), "arms")
    det = run.det.info
    return miner_pb2.BenchmarkResult(report=struct_from_dict({"arms": rows, "detector": det.model_id,
                                                              "meaningless": det.meaningless}))


def _arm_row(recipes) -> dict:
    tp = sum(r.summary.true_positives for r in recipes)
    fp = sum(r.summary.false_positives for r in recipes)
    gt = sum(r.summary.ground_truth for r in recipes)
    steps = [st for r in recipes for st in r.summary.steps]
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else 0.0, "coverage": round(tp / gt, 4) if gt else 0.0,
            "true_positives": tp, "false_positives": fp, "ground_truth": gt,
            "bg_veto_rate_seed": _rate(sum(st.seeds_vetoed_background for st in steps), sum(st.seeds_checked for st in steps)),
            "bg_veto_rate_final": _rate(sum(st.final_vetoed_background for st in steps), sum(st.final_checked for st in steps)),
            "seeds_vetoed_background_only": sum(st.seeds_vetoed_background_only for st in steps),
            "final_vetoed_background_only": sum(st.final_vetoed_background_only for st in steps)}


def _rate(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0
