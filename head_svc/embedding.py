"""Crop embeddings for training, fetched from the embedder service and cached on disk.

One EmbedCrops call per image with all its boxes (labelled and background). The cache key is
the image's sha256 + model id + weights sha256 + crop policy + boxes, so a second training on
the same data with the same model reads every vector from disk and calls the embedder for none.
Files are .npy written atomically (never pickles: np.load with allow_pickle=False).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from clients.embedder import EmbedderClient
from minehead.core import embeddings as codec
from minehead.embedder.v1 import embedder_pb2

from embedder_svc.crops import CropPolicy


class CropEmbeddingCache:
    def __init__(self, embedder_address: str, cache_dir: Path) -> None:
        self.address = embedder_address
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._client: EmbedderClient | None = None
        self.hits = 0
        self.calls = 0

    @property
    def client(self) -> EmbedderClient:
        if self._client is None:
            self._client = EmbedderClient(self.address)
        return self._client

    def model_info(self, model: str) -> embedder_pb2.Model:
        """The model's identity (id, weights sha256, dim, preprocessing); loads it if needed."""
        return self.client.get_model(model, load=True)

    def _path(self, model: embedder_pb2.Model, image_sha: str, policy: CropPolicy, boxes: np.ndarray) -> Path:
        h = hashlib.sha256(f"{model.id}|{model.weights_sha256}|{policy.key}|{image_sha}|".encode())
        h.update(np.round(np.asarray(boxes, np.float64), 2).tobytes())
        key = h.hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npy"

    def embed(self, data: bytes, boxes: np.ndarray, policy: CropPolicy, model: embedder_pb2.Model) -> np.ndarray:
        """boxes: N x 4 XYXY pixels in the image `data` -> N x dim float32."""
        if len(boxes) == 0:
            return np.zeros((0, model.dim), np.float32)
        path = self._path(model, hashlib.sha256(data).hexdigest(), policy, boxes)
        if path.is_file():
            self.hits += 1
            return np.load(path, allow_pickle=False)
        self.calls += 1
        resp = self.client.embed_crops_raw(data, boxes, model.id, policy.to_proto())
        vecs = codec.from_proto(resp.embeddings)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, vecs, allow_pickle=False)
        os.replace(tmp, path)
        return vecs

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
