"""Exemplar RPCs: FindSimilar (one image, unary) and FindSimilarImages (the exemplars' image, then
more images, streamed), over `miner_svc.exemplars.finder`."""

from __future__ import annotations

from minehead.core.errors import InvalidArgument, NotFound, PermissionDenied
from minehead.core.paths import image_ref_bytes
from minehead.miner.v1 import drafting_pb2, exemplars_pb2

from miner_svc.api.drafting_rpcs import _until_client_stops
from miner_svc.resources import MinerResources


class FindRPCs:
    res: MinerResources

    def FindSimilar(self, request, context):
        finder = self.res.finder()
        data, label = image_ref_bytes(request.image, self.res.allowed_roots)
        entry = finder.image(data, label or "image")
        protos, ex = finder.prototypes(entry, request.options)
        image, stats = finder.find(entry, protos, request.options, ex)
        return exemplars_pb2.FindSimilarResponse(image=image, stats=stats)

    def FindSimilarImages(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("item") != "exemplars":
            raise InvalidArgument("FindSimilarImages: the first message must carry the exemplars and their image")
        finder = self.res.finder()
        req = first.exemplars
        data, label = image_ref_bytes(req.image, self.res.allowed_roots)
        entry = finder.image(data, label or "#0")
        protos, ex = finder.prototypes(entry, req.options)
        yield finder.find(entry, protos, req.options, ex, index=0)[0]
        for i, msg in enumerate(_until_client_stops(request_iterator), start=1):
            if msg.WhichOneof("item") != "image":
                raise InvalidArgument(f"FindSimilarImages: message {i + 1} must carry an image")
            label = msg.image.label or f"#{i}"
            try:
                data, label = image_ref_bytes(msg.image, self.res.allowed_roots)
                other = finder.image(data, label or f"#{i}")
            except (InvalidArgument, NotFound, PermissionDenied) as e:
                yield drafting_pb2.DraftedImage(image=label or f"#{i}", index=i, error=str(e))
                continue
            yield finder.find(other, protos, req.options, None, index=i)[0]
