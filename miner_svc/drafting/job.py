"""The drafting job: a recipe set over a folder of images, written to a draft folder one image
at a time (minehead.drafts.folder), resumable, with the per-image work on an ImagePool
(`miner_svc.scale`: in process or on Ray workers).

    result = draft_job(ctx, drafter, folder, images, pool, resumed="")

Images whose stem another image already has are skipped (YOLO label files are named by stem);
images the folder has finished are kept as they are. On cancel the folder's whole-folder files
are still written from every image finished so far.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Callable
from pathlib import Path
from google.protobuf import json_format

from minehead.common.v1 import common_pb2
from minehead.core.errors import Cancelled, FailedPrecondition, InvalidArgument
from minehead.core.jobs import JobContext, JobStore, job_id_from_name
from minehead.drafts.folder import DraftFolder, describe, draft_result, tiled_entry
from minehead.miner.v1 import drafting_pb2

from miner_svc.drafting import outlook
from miner_svc.recipes.drafter import Drafter
from miner_svc.scale.pool import ImagePool

RESUMABLE = (common_pb2.Job.INTERRUPTED, common_pb2.Job.CANCELLED, common_pb2.Job.FAILED, common_pb2.Job.SUCCEEDED)


def resumed_spec(jobs: JobStore, name: str) -> drafting_pb2.DraftingSpec:
    """The spec of an earlier drafting job, to run again on the same folder (`--resume`)."""
    prev = jobs.get(job_id_from_name(name))
    if prev.kind != "drafting":
        raise InvalidArgument(f"{name} is a {prev.kind} job, not a drafting job")
    if prev.state not in RESUMABLE:
        raise FailedPrecondition(f"{name} is {common_pb2.Job.State.Name(prev.state)}; only a finished, "
                                 "cancelled, failed or interrupted drafting job can be resumed")
    spec = drafting_pb2.DraftingSpec()
    json_format.ParseDict(json_format.MessageToDict(prev.request)["spec"], spec, ignore_unknown_fields=True)
    return spec


Adapter = Callable[[JobContext, Drafter, list[Path]], tuple[Drafter, dict]]


def draft_job(ctx: JobContext, drafter: Drafter, folder: DraftFolder, images: list[Path], pool: ImagePool,
              resumed: str = "", adapt: Adapter | None = None) -> drafting_pb2.DraftingResult:
    """Draft every image the folder has not finished; the job's result, also as it goes
    (`ctx.partial_result`). adapt: the `--adapt` step (miner_svc.drafting.adapt), run first
    when there is anything left to draft; its summary goes to summary.json "adapt"."""
    result = drafting_pb2.DraftingResult(output_dir=str(folder.root), images=len(images))
    ctx.partial_result = result
    done = folder.finished()
    if done:
        ctx.log(f"resuming {resumed or 'this folder'}: {len(done)} of {len(images)} images already drafted, kept as they are")
    todo = _todo(ctx, images, done, result)
    adapted = None
    if adapt is not None and todo:
        drafter, adapted = adapt(ctx, drafter, images)
    tally = _Tally(drafter, folder, len(images), len(done), adapted=adapted)
    ctx.phase("drafting")
    drafted = pool.draft(ctx, drafter, todo)
    try:
        for n, (_, path, image) in enumerate(drafted):
            tally.record(ctx, folder, result, path, image, last=n + 1 == len(todo))
    except Cancelled:
        drafted.close()  # stop the Ray workers' chunks before writing the folder's files
        _finish(ctx, folder, result, tally.summary(result, complete=False))
        raise
    finally:
        drafted.close()
    _finish(ctx, folder, result, tally.summary(result, complete=True))
    return result


def _todo(ctx: JobContext, images: list[Path], done: dict[str, int], result) -> list[tuple[int, Path]]:
    """(index, path) of the images to draft: not finished, and not sharing a stem with an earlier
    image (those are skipped, with the reason, in `result.skipped`)."""
    seen_stems: dict[str, str] = {}
    todo = []
    for i, p in enumerate(images):
        other = seen_stems.setdefault(p.stem, p.name)
        if other != p.name:
            result.skipped.add(image=p.name, reason=f"same stem as {other}: YOLO label files are named by stem")
            ctx.warn(f"skipped {p.name}: same stem as {other}")
        elif p.name not in done:
            todo.append((i, p))
    return todo


@dataclasses.dataclass
class _Tally:
    """This run's counts as images finish, and the run's summary from them."""

    drafter: Drafter
    folder: DraftFolder
    images: int
    already_done: int
    drafted: int = 0
    counts: Counter = dataclasses.field(default_factory=Counter)
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    last_metrics: float = 0.0
    tiled: dict = dataclasses.field(default_factory=dict)  # image name -> Tiling as a dict
    adapted: dict | None = None  # the adapt step's summary, when asked for

    def __post_init__(self) -> None:
        self.passes_before = self.drafter.det.counters.snapshot()

    def record(self, ctx: JobContext, folder: DraftFolder, result, path: Path, image: drafting_pb2.DraftedImage,
               last: bool) -> None:
        """One finished image: its labels and record written, progress and metrics reported."""
        added = folder.add(image, path)
        if image.error:
            ctx.warn(f"skipped {path.name}: {image.error}")
        if image.failure:
            ctx.warn(f"{path.name} failed: {image.failure} (the job goes on; resuming it retries this image)")
        if added:
            result.merged_lines[f"labels/{path.stem}.txt"] = added
        self.counts.update(b.class_name for b in image.boxes)
        if (t := tiled_entry(image)) is not None:
            self.tiled[path.name] = t
        self.drafted += 1
        now = time.perf_counter()
        ctx.progress(self.already_done + self.drafted, self.images, "images")
        if now - self.last_metrics > 1.0 or last:
            self.last_metrics = now
            ctx.metrics({"images_per_s": round(self.drafted / (now - self.t0), 4),
                         **{f"count/{k}": v for k, v in self.counts.items()}})

    def summary(self, result, complete: bool) -> dict:
        """The run's summary (summary.json; the folder adds its totals)."""
        secs = time.perf_counter() - self.t0
        d, rset = self.drafter, self.drafter.recipe_set
        unlike = outlook.unlike_labelled(
            {r.image: len(r.boxes) for r in self.folder.records() if not (r.error or r.failure)}, d.head)
        return {"recipe_set": rset.name, "head": rset.head_id, "detector": rset.detector, "classes": list(rset.classes),
                "images": self.images, "drafted_this_run": self.drafted, "already_done": self.already_done,
                "boxes_this_run": sum(self.counts.values()), "class_counts_this_run": dict(self.counts),
                "seconds": round(secs, 3), "images_per_s": round(self.drafted / secs, 4) if secs > 0 else 0.0,
                "passes": d.det.counters.since(self.passes_before), "boxes_embedded": d.scorer.boxes_embedded,
                "boxes_pooled": d.scorer.boxes_pooled,
                "skipped": [{"image": s.image, "reason": s.reason} for s in result.skipped],
                # Sorted: on Ray (or any parallel drafting) images finish in any order, and
                # the same job must write the same summary.
                "merged_lines": dict(result.merged_lines), "warnings": sorted(d.warnings), "complete": complete,
                "tiled_images": dict(sorted(self.tiled.items())), "relabelled": d.relabelled,
                "lookalikes_dropped": d.dropped, "threshold_scale": d.threshold_scale,
                **({"adapt": self.adapted} if self.adapted is not None else {}),
                "expected": outlook.expected(rset), "unlike_labelled": unlike,
                "images_unlike_labelled": len(unlike),
                "adapted_head": (self.adapted or {}).get("head", "") if (self.adapted or {}).get("adapted") else ""}


def _finish(ctx: JobContext, folder: DraftFolder, result, summary: dict) -> None:
    """Assemble the whole-folder files from every finished image (this run's and earlier ones)."""
    ctx.phase("writing")
    result.CopyFrom(draft_result(folder.finish(summary), folder.root))
    ctx.log(describe(result))
