"""Drafting RPCs: StartDrafting (a job writing a draft folder, `miner_svc.drafting.job`),
ExportDraft (that folder as a zip), DraftImages (a stream: one image in, one DraftedImage out)."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
from google.protobuf import json_format

from minehead.core.errors import InvalidArgument, NotFound, PermissionDenied
from minehead.core.file_chunks import file_chunks
from minehead.core.jobs import job_id_from_name
from minehead.core.paths import image_ref_bytes, resolve_allowed
from minehead.core.safezip import make_zip
from minehead.drafts.folder import DraftFolder, export_files, list_images
from minehead.miner.v1 import drafting_pb2

from miner_svc.drafting import adapt
from miner_svc.drafting.job import draft_job, resumed_spec
from miner_svc.resources import MinerResources


class DraftingRPCs:
    res: MinerResources

    def StartDrafting(self, request, context):
        res = self.res
        spec = drafting_pb2.DraftingSpec()
        spec.CopyFrom(resumed_spec(res.runner.store, request.resume) if request.resume else request.spec)
        drafter, rset = res.drafter(spec.options)
        images, source = self._images(spec)
        if not spec.output_dir:
            spec.output_dir = str(res.dir / "drafts" / uuid.uuid4().hex)
        out = resolve_allowed(spec.output_dir, res.allowed_roots + [res.dir / "drafts"], must_exist=False)
        folder = DraftFolder(out, recipe_set=rset.name, classes=list(rset.classes), head_classes=drafter.head.classes,
                             formats_=list(spec.options.formats), polygons=spec.options.polygons, merge=spec.merge,
                             source=source)
        adapter = None
        if spec.adapt:
            adapt.check_adaptable(drafter)
            adapter = lambda ctx, d, imgs: adapt.adapted_drafter(  # noqa: E731
                ctx, d, imgs, folder.meta, lambda: res.labelled_dataset(rset))
        return res.runner.start("drafting", drafting_pb2.StartDraftingRequest(spec=spec, resume=request.resume),
                                lambda ctx: draft_job(ctx, drafter, folder, images, res.pool, request.resume, adapter))

    def _images(self, spec: drafting_pb2.DraftingSpec) -> tuple[list[Path], str]:
        which = spec.WhichOneof("source")
        if which == "folder":
            folder = resolve_allowed(spec.folder, self.res.allowed_roots)
        elif which == "dataset":
            folder = self.res.resolve_dataset(spec.dataset)
        else:
            raise InvalidArgument("give the images as a folder (under the allowed roots) or a dataset (datasets/{id})")
        if not folder.is_dir():
            raise InvalidArgument(f"{folder} is not a folder")
        return list_images(folder), str(folder)

    def ExportDraft(self, request, context):
        job = self.res.runner.store.get(job_id_from_name(request.job))
        if job.kind != "drafting":
            raise InvalidArgument(f"{request.job} is a {job.kind} job, not a drafting job")
        out = Path(json_format.MessageToDict(job.request)["spec"]["output_dir"])
        if not out.is_dir():
            raise NotFound(f"the output folder of {request.job} is gone ({out})")
        yield from file_chunks(make_zip(export_files(out)))

    def DraftImages(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("item") != "options":
            raise InvalidArgument("DraftImages: the first message must carry the options (recipe_set, …)")
        drafter, _ = self.res.drafter(first.options)
        for i, req in enumerate(_until_client_stops(request_iterator)):
            if req.WhichOneof("item") != "image":
                raise InvalidArgument(f"DraftImages: message {i + 2} must carry an image")
            label = req.image.label or f"#{i}"
            try:
                data, label = image_ref_bytes(req.image, self.res.allowed_roots)
            except (InvalidArgument, NotFound, PermissionDenied) as e:
                yield drafting_pb2.DraftedImage(image=label or f"#{i}", index=i, error=str(e))
                continue
            yield drafter.draft(data, label or f"#{i}", i)


def _until_client_stops(requests):
    """The client's messages until it half-closes or goes away (a client that stops listening
    cancels the call; that ends the stream, it is not a server error)."""
    try:
        yield from requests
    except grpc.RpcError:
        return
