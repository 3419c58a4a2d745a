"""Embedder client: numpy out, images in as paths, bytes or HxWx3 uint8 arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from minehead.common.v1 import common_pb2
from minehead.core import embeddings as emb_codec
from minehead.core.images import encode_png
from minehead.embedder.v1 import embedder_pb2, embedder_pb2_grpc

from minehead.client.channel import ServiceClient
from minehead.locator.frame import FeatureFrame

ImageLike = str | Path | bytes | np.ndarray


def image_ref(image: ImageLike, label: str = "") -> common_pb2.ImageRef:
    """Client-side files are sent as bytes (the server may not see this file system)."""
    if isinstance(image, np.ndarray):
        return common_pb2.ImageRef(data=encode_png(image), label=label)
    if isinstance(image, bytes):
        return common_pb2.ImageRef(data=image, label=label)
    p = Path(image)
    return common_pb2.ImageRef(data=p.read_bytes(), label=label or p.name)


def boxes_proto(boxes: Iterable[Sequence[float]]) -> list[common_pb2.BoxXYXY]:
    """Boxes as N x 4 XYXY pixels."""
    return [common_pb2.BoxXYXY(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3])) for b in boxes]


class EmbedderClient(ServiceClient):
    service = "embedder"

    def __init__(self, address: str | None = None, **kw) -> None:
        super().__init__(address, **kw)
        self.stub = embedder_pb2_grpc.EmbedderServiceStub(self.channel)

    def list_models(self) -> list[embedder_pb2.Model]:
        return list(self.stub.ListModels(embedder_pb2.ListModelsRequest(), timeout=self.timeout).models)

    def get_model(self, model: str = "", load: bool = False) -> embedder_pb2.Model:
        return self.stub.GetModel(embedder_pb2.GetModelRequest(id=model, load=load), timeout=self.timeout)

    def embed_images_raw(self, images: Sequence[ImageLike], model: str = "") -> embedder_pb2.EmbedImagesResponse:
        req = embedder_pb2.EmbedImagesRequest(model=model, images=[image_ref(im) for im in images])
        return self.stub.EmbedImages(req, timeout=self.timeout)

    def embed_images(self, images: Sequence[ImageLike], model: str = "") -> np.ndarray:
        """N images -> N x D L2-normalised float32."""
        return emb_codec.from_proto(self.embed_images_raw(images, model).embeddings)

    def embed_crops_raw(self, image: ImageLike, boxes, model: str = "",
                        crop_policy: common_pb2.CropPolicy | None = None) -> embedder_pb2.EmbedCropsResponse:
        req = embedder_pb2.EmbedCropsRequest(model=model, image=image_ref(image), boxes=boxes_proto(boxes))
        if crop_policy is not None:
            req.crop_policy.CopyFrom(crop_policy)
        return self.stub.EmbedCrops(req, timeout=self.timeout)

    def embed_crops(self, image: ImageLike, boxes, model: str = "", crop_policy=None) -> np.ndarray:
        """Boxes (N x 4 XYXY pixels) in one image -> N x D L2-normalised float32."""
        return emb_codec.from_proto(self.embed_crops_raw(image, boxes, model, crop_policy).embeddings)

    def embed_text(self, texts: Sequence[str], model: str = "") -> np.ndarray:
        r = self.stub.EmbedText(embedder_pb2.EmbedTextRequest(model=model, texts=list(texts)), timeout=self.timeout)
        return emb_codec.from_proto(r.embeddings)

    def feature_map(self, image: ImageLike, model: str = "") -> tuple[np.ndarray, FeatureFrame]:
        """An image's dense feature map: (C x rows x cols float32, the FeatureFrame placing its
        cells on the image). The wire carries rows x cols x C (embedder.proto FeatureMap)."""
        r = self.stub.GetFeatureMap(embedder_pb2.GetFeatureMapRequest(model=model, image=image_ref(image)),
                                    timeout=self.timeout)
        return feature_map_from_proto(r)


def feature_map_from_proto(r: embedder_pb2.FeatureMap) -> tuple[np.ndarray, FeatureFrame]:
    # one copy, channels first and C-contiguous (what an encoder's own pass gives and onnxruntime takes)
    fmap = np.ascontiguousarray(np.frombuffer(r.data, "<f4").reshape(r.rows, r.cols, r.channels).transpose(2, 0, 1),
                                dtype=np.float32)
    frame = FeatureFrame.for_image(r.image_width, r.image_height, r.input_size, r.resize, r.rows, r.cols)
    return fmap, frame
