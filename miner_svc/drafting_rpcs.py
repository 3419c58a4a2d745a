"""The gRPC edge of recipe sets and drafting, mixed into MinerServicer (which provides
`detector`, `scorer_for`, `store`, `sets`, `runner`, `dir`, `allowed_roots`, `resolve_dataset`).

Kept apart from the mining RPCs: one reason to change each. The work itself lives in
`miner_svc.drafting` (per image) and `minehead.drafts` (the output folder).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
from google.protobuf import json_format

from minehead.common.v1 import common_pb2
from minehead.core.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from minehead.core.jobs import JobContext, job_id_from_name
from minehead.core.paths import image_ref_bytes, resolve_allowed
from minehead.core.safezip import make_zip
from minehead.drafts.folder import DraftFolder, check_formats, describe, draft_result, list_images
from minehead.miner.v1 import drafting_pb2, miner_pb2

from miner_svc.drafting import Drafter, draft_floor, make_drafter
from miner_svc.recipe_sets import make_set

CHUNK = 1 << 20
RESUMABLE = (common_pb2.Job.INTERRUPTED, common_pb2.Job.CANCELLED, common_pb2.Job.FAILED, common_pb2.Job.SUCCEEDED)


class DraftingRPCs:
    # -- recipe sets --------------------------------------------------------------------------
    def set_for_job(self, job: str) -> drafting_pb2.RecipeSet:
        """The set a mining job made; built from the job's recipes if it made none (cancelled)."""
        try:
            return self.sets.for_job(job)
        except NotFound:
            pass
        done = self.runner.store.get(job_id_from_name(job))
        result = miner_pb2.MiningResult()
        if done.kind != "mining" or not done.result.Unpack(result) or not result.recipes:
            raise NotFound(f"{job} is not a mining job with recipes (state {common_pb2.Job.State.Name(done.state)})")
        return self.sets.put(make_set(list(result.recipes), self.store.head(result.recipes[0].recipe_id), job),
                             self.store.head(result.recipes[0].recipe_id))

    def CreateRecipeSet(self, request, context):
        if request.WhichOneof("source") == "job":
            return self.set_for_job(request.job)
        names = list(request.recipes.names)
        if not names:
            raise InvalidArgument("give recipe names or a mining job")
        recipes = [self.store.get(n) for n in names]
        head = self.store.head(recipes[0].recipe_id)
        return self.sets.put(make_set(recipes, head), head)

    def ListRecipeSets(self, request, context):
        return drafting_pb2.ListRecipeSetsResponse(recipe_sets=self.sets.list())

    def GetRecipeSet(self, request, context):
        return self.set_for_job(request.name) if request.name.startswith("jobs/") else self.sets.get(request.name)

    def DeleteRecipeSet(self, request, context):
        self.sets.delete(request.name)
        return drafting_pb2.DeleteRecipeSetResponse()

    def ExportRecipeSet(self, request, context):
        s = self.GetRecipeSet(request, context)
        data = self.sets.export_zip(s.recipe_set_id)
        for i in range(0, len(data), CHUNK):
            yield common_pb2.FileChunk(data=data[i:i + CHUNK])

    def ImportRecipeSet(self, request_iterator, context):
        data = bytearray()
        for part in request_iterator:
            data += part.chunk.data
            if len(data) > 128 << 20:
                raise InvalidArgument("recipe set bundle is over 128 MiB")
        return self.sets.import_zip(bytes(data))

    # -- drafting -----------------------------------------------------------------------------
    def drafter(self, options: drafting_pb2.DraftOptions) -> tuple[Drafter, drafting_pb2.RecipeSet]:
        if not options.recipe_set:
            raise InvalidArgument("drafting needs a recipe set (recipeSets/{id} or the mining job jobs/{id})")
        check_formats(list(options.formats))
        if not 0 <= options.overlap_iou <= 1 or not 0 <= options.ambiguity_margin <= 1:
            raise InvalidArgument("overlap_iou and ambiguity_margin must be within [0, 1]")
        rset = self.GetRecipeSet(drafting_pb2.GetRecipeSetRequest(name=options.recipe_set), None)
        head = self.sets.head(rset.recipe_set_id)
        shared = self.detector(rset.detector, draft_floor(rset), head)
        model = self.embeds.model_info(head.embedder_model)
        return make_drafter(shared.detector, head, rset, options, self.embeds, model, self.dir / "detections"), rset

    def _images(self, spec: drafting_pb2.DraftingSpec) -> tuple[list[Path], str]:
        which = spec.WhichOneof("source")
        if which == "folder":
            folder = resolve_allowed(spec.folder, self.allowed_roots)
        elif which == "dataset":
            folder = self.resolve_dataset(spec.dataset)
        else:
            raise InvalidArgument("give the images as a folder (under the allowed roots) or a dataset (datasets/{id})")
        if not folder.is_dir():
            raise InvalidArgument(f"{folder} is not a folder")
        return list_images(folder), str(folder)

    def StartDrafting(self, request, context):
        spec = drafting_pb2.DraftingSpec()
        if request.resume:
            prev = self.runner.store.get(job_id_from_name(request.resume))
            if prev.kind != "drafting":
                raise InvalidArgument(f"{request.resume} is a {prev.kind} job, not a drafting job")
            if prev.state not in RESUMABLE:
                raise FailedPrecondition(f"{request.resume} is {common_pb2.Job.State.Name(prev.state)}; only a finished, "
                                         "cancelled, failed or interrupted drafting job can be resumed")
            json_format.ParseDict(json_format.MessageToDict(prev.request)["spec"], spec, ignore_unknown_fields=True)
        else:
            spec.CopyFrom(request.spec)
        drafter, rset = self.drafter(spec.options)
        images, source = self._images(spec)
        if not spec.output_dir:
            spec.output_dir = str(self.dir / "drafts" / uuid.uuid4().hex)
        out = resolve_allowed(spec.output_dir, self.allowed_roots + [self.dir / "drafts"], must_exist=False)
        folder = DraftFolder(out, recipe_set=rset.name, classes=list(rset.classes), head_classes=drafter.head.classes,
                             formats_=list(spec.options.formats), polygons=spec.options.polygons, merge=spec.merge,
                             source=source)

        def job(ctx: JobContext):
            return self._draft_job(ctx, drafter, rset, folder, images, request.resume, spec.options)

        return self.runner.start("drafting", drafting_pb2.StartDraftingRequest(spec=spec, resume=request.resume), job)

    def _draft_job(self, ctx: JobContext, drafter: Drafter, rset, folder: DraftFolder, images: list[Path], resumed: str,
                   options: drafting_pb2.DraftOptions):
        result = drafting_pb2.DraftingResult(output_dir=str(folder.root), images=len(images))
        ctx.partial_result = result
        done = folder.finished()
        if done:
            ctx.log(f"resuming {resumed or 'this folder'}: {len(done)} of {len(images)} images already drafted, kept as they are")
        counts: Counter = Counter()
        seen_stems: dict[str, str] = {}
        before = drafter.det.counters.snapshot()
        t0, last = time.perf_counter(), 0.0
        todo = []
        for i, p in enumerate(images):
            other = seen_stems.setdefault(p.stem, p.name)
            if other != p.name:
                result.skipped.add(image=p.name, reason=f"same stem as {other}: YOLO label files are named by stem")
                ctx.warn(f"skipped {p.name}: same stem as {other}")
            elif p.name not in done:
                todo.append((i, p))
        ctx.phase("drafting")

        def summary(final: bool) -> dict:
            secs = time.perf_counter() - t0
            after = drafter.det.counters.snapshot()
            return {"recipe_set": rset.name, "head": rset.head_id, "detector": rset.detector, "classes": list(rset.classes),
                    "images": len(images), "drafted_this_run": n_done, "already_done": len(done),
                    "boxes_this_run": sum(counts.values()), "class_counts_this_run": dict(counts),
                    "seconds": round(secs, 3), "images_per_s": round(n_done / secs, 4) if secs > 0 else 0.0,
                    "passes": {k: after[k] - before[k] for k in after}, "boxes_embedded": drafter.scorer.boxes_embedded,
                    "boxes_pooled": drafter.scorer.boxes_pooled,
                    "skipped": [{"image": s.image, "reason": s.reason} for s in result.skipped],
                    # Sorted: on Ray (or any parallel drafting) images finish in any order, and
                    # the same job must write the same summary.
                    "merged_lines": dict(result.merged_lines), "warnings": sorted(drafter.warnings), "complete": final}

        n_done = 0
        if self.ray is not None:  # each image drafted on a Ray worker; the folder is written here
            results = self.ray.draft(ctx, drafter, rset, options, todo, self.embeds.address, self.dir / "detections")
        else:
            results = _draft_here(ctx, drafter, todo)
        try:
            for n, (i, p, drafted) in enumerate(results):
                added = folder.add(drafted, p)
                if drafted.error:
                    ctx.warn(f"skipped {p.name}: {drafted.error}")
                if added:
                    result.merged_lines[f"labels/{p.stem}.txt"] = added
                counts.update(b.class_name for b in drafted.boxes)
                n_done += 1
                now = time.perf_counter()
                ctx.progress(len(done) + n + 1, len(images), "images")
                if now - last > 1.0 or n + 1 == len(todo):
                    last = now
                    ctx.metrics({"images_per_s": round(n_done / (now - t0), 4), **{f"count/{k}": v for k, v in counts.items()}})
        except Cancelled:
            results.close()  # stop the Ray workers' chunks before writing the folder's files
            self._finish(ctx, folder, result, summary(False))
            raise
        finally:
            results.close()
        self._finish(ctx, folder, result, summary(True))
        return result

    def _finish(self, ctx, folder: DraftFolder, result, summary: dict) -> None:
        """Assemble the whole-folder files from every finished image (this run's and earlier ones)."""
        ctx.phase("writing")
        result.CopyFrom(draft_result(folder.finish(summary), folder.root))
        ctx.log(describe(result))

    def ExportDraft(self, request, context):
        job = self.runner.store.get(job_id_from_name(request.job))
        if job.kind != "drafting":
            raise InvalidArgument(f"{request.job} is a {job.kind} job, not a drafting job")
        out = Path(json_format.MessageToDict(job.request)["spec"]["output_dir"])
        if not out.is_dir():
            raise NotFound(f"the output folder of {request.job} is gone ({out})")
        files = {}
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out)
            if p.is_symlink() or not p.is_file() or rel.parts[0] in (".minehead-draft", "images") or p.name.startswith(".tmp-"):
                continue
            files[str(rel)] = p.read_bytes()
        data = make_zip(files)
        for i in range(0, len(data), CHUNK):
            yield common_pb2.FileChunk(data=data[i:i + CHUNK])

    def DraftImages(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("item") != "options":
            raise InvalidArgument("DraftImages: the first message must carry the options (recipe_set, …)")
        drafter, _ = self.drafter(first.options)
        for i, req in enumerate(_until_client_stops(request_iterator)):
            if req.WhichOneof("item") != "image":
                raise InvalidArgument(f"DraftImages: message {i + 2} must carry an image")
            label = req.image.label or f"#{i}"
            try:
                data, label = image_ref_bytes(req.image, self.allowed_roots)
            except (InvalidArgument, NotFound, PermissionDenied) as e:
                yield drafting_pb2.DraftedImage(image=label or f"#{i}", index=i, error=str(e))
                continue
            yield drafter.draft(data, label or f"#{i}", i)


def _draft_here(ctx: JobContext, drafter: Drafter, todo: list[tuple[int, Path]]):
    """In-process drafting: (index, path, DraftedImage) per image, cancel checked before each."""
    for i, p in todo:
        ctx.check_cancelled()
        try:
            data = p.read_bytes()
        except OSError as e:
            yield i, p, drafting_pb2.DraftedImage(image=p.name, index=i, error=f"unreadable: {e.strerror}")
        else:
            yield i, p, drafter.draft(data, p.name, i)


def _until_client_stops(requests):
    """The client's messages until it half-closes or goes away (a client that stops listening
    cancels the call; that ends the stream, it is not a server error)."""
    try:
        yield from requests
    except grpc.RpcError:
        return
