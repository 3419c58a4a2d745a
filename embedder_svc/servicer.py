"""The Embedder gRPC service: a thin edge over embedder_svc.embedder.Embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minehead.common.v1 import common_pb2
from minehead.core import embeddings as emb_codec
from minehead.core.errors import InvalidArgument
from minehead.core.images import DecodedImage, decode_image
from minehead.core.paths import image_ref_bytes
from minehead.embedder.v1 import embedder_pb2, embedder_pb2_grpc

from minehead.crops import CropPolicy, boxes_from_proto
from embedder_svc.embedder import Embedder
from minehead.encoders import registry
from minehead.encoders.base import ModelInfo

MAX_IMAGES = 1024
_MODALITY = {"image": embedder_pb2.IMAGE, "text": embedder_pb2.TEXT}


def read_image(ref: common_pb2.ImageRef, allowed_roots: list[Path], index: int | None = None) -> DecodedImage:
    """ImageRef (bytes, or a path under the allowed roots) -> decoded image."""
    data, label = image_ref_bytes(ref, allowed_roots)
    return decode_image(data, label or (f"#{index}" if index is not None else ""))


def model_ref(info: ModelInfo) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(model_id=info.id, weights_sha256=info.weights_sha256, dim=info.dim)


def model_proto(spec, info: ModelInfo | None, default_id: str | None) -> embedder_pb2.Model:
    m = embedder_pb2.Model(id=spec.id, backend=spec.backend, loaded=info is not None, is_default=spec.id == default_id)
    if info is None:
        peek = registry.peek_info(spec)
        if peek:
            m.dim = peek["dim"]
            m.weights_sha256 = peek["weights_sha256"]
            m.preprocessing.CopyFrom(embedder_pb2.Preprocessing(input_size=peek["input_size"], mean=peek["mean"],
                                                                std=peek["std"], resize=peek["resize"]))
    if info is not None:
        pre = info.preprocessing
        m.modalities.extend(_MODALITY[x] for x in info.modalities)
        m.dim = info.dim
        m.preprocessing.CopyFrom(embedder_pb2.Preprocessing(input_size=pre.input_size, mean=pre.mean, std=pre.std, resize=pre.resize))
        m.weights_sha256 = info.weights_sha256
        m.device = info.device
        m.dtype = info.dtype
        m.source = info.source
    return m


def feature_map_proto(fmap: np.ndarray, frame, hit: bool, info: ModelInfo) -> embedder_pb2.FeatureMap:
    """C x rows x cols float32 + its FeatureFrame -> the wire message (rows x cols x C, HWC)."""
    c, r, w = fmap.shape
    valid = frame.valid
    return embedder_pb2.FeatureMap(
        model=model_ref(info), rows=r, cols=w, channels=c,
        data=np.ascontiguousarray(fmap.transpose(1, 2, 0), dtype="<f4").tobytes(),
        input_size=frame.input_size, resize=info.preprocessing.resize, scale_x=frame.scale_x, scale_y=frame.scale_y,
        stride_x=frame.stride_x, stride_y=frame.stride_y, image_width=frame.image_width, image_height=frame.image_height,
        valid_rows=int(valid.any(1).sum()), valid_cols=int(valid.any(0).sum()), cache_hit=hit)


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, embedder: Embedder, allowed_roots: list[Path]) -> None:
        self.embedder = embedder
        self.allowed_roots = allowed_roots

    def _default_id(self) -> str | None:
        try:
            return self.embedder.resolve(None).id
        except Exception:  # noqa: BLE001 - no default is a valid state for listing
            return None

    def ListModels(self, request, context):
        default = self._default_id()
        return embedder_pb2.ListModelsResponse(
            models=[model_proto(spec, info, default) for spec, info in self.embedder.list_models()])

    def GetModel(self, request, context):
        spec = self.embedder.resolve(request.id)
        info = self.embedder.model(spec.id).info if request.load else next(
            (i for s, i in self.embedder.list_models() if s.id == spec.id), None)
        return model_proto(spec, info, self._default_id())

    def EmbedImages(self, request, context):
        if not request.images:
            raise InvalidArgument("no images given")
        if len(request.images) > MAX_IMAGES:
            raise InvalidArgument(f"{len(request.images)} images in one request; the limit is {MAX_IMAGES}")
        images = [read_image(ref, self.allowed_roots, i) for i, ref in enumerate(request.images)]
        vecs, hits, info = self.embedder.embed_images(images, request.model or None)
        return embedder_pb2.EmbedImagesResponse(embeddings=emb_codec.to_proto(vecs), model=model_ref(info), cache_hits=hits)

    def EmbedCrops(self, request, context):
        if not request.HasField("image"):
            raise InvalidArgument("no image given")
        if not request.boxes:
            raise InvalidArgument("no boxes given")
        policy = CropPolicy.from_proto(request.crop_policy if request.HasField("crop_policy") else None)
        image = read_image(request.image, self.allowed_roots)
        vecs, hits, info, policy = self.embedder.embed_crops(image, boxes_from_proto(request.boxes), policy, request.model or None)
        return embedder_pb2.EmbedCropsResponse(embeddings=emb_codec.to_proto(vecs), model=model_ref(info), cache_hits=hits,
                                               crop_policy=policy.to_proto())

    def GetFeatureMap(self, request, context):
        if not request.HasField("image"):
            raise InvalidArgument("no image given")
        image = read_image(request.image, self.allowed_roots)
        fmap, frame, hit, info = self.embedder.dense_features(image, request.model or None)
        return feature_map_proto(fmap, frame, hit, info)

    def EmbedText(self, request, context):
        vecs, info = self.embedder.embed_text(list(request.texts), request.model or None)
        return embedder_pb2.EmbedTextResponse(embeddings=emb_codec.to_proto(vecs), model=model_ref(info))
