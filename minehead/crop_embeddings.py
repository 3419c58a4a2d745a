"""Crop embeddings for training, fetched from the embedder service and cached on disk.

One EmbedCrops call per image with all its boxes (labelled and background). Vectors are cached
per box, in one file per image sha256 + model id + weights sha256 + crop policy, so a second
training on the same data with the same model reads every vector from disk and calls the
embedder for none, even when it asks for a subset of the boxes. Files are numeric .npz written
atomically (never pickles: np.load with allow_pickle=False).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from minehead.client.embedder import EmbedderClient
from minehead.core import embeddings as codec
from minehead.core.npz import load_arrays
from minehead.embedder.v1 import embedder_pb2

from minehead.crops import CropPolicy

# Requests a training job keeps open at once (EmbedCrops, GetFeatureMap): two cores' worth, so
# the embedder's encoder always has the next image while this side sends, decodes and writes.
IN_FLIGHT = 3


class CropEmbeddingCache:
    def __init__(self, embedder_address: str, cache_dir: Path) -> None:
        self.address = embedder_address
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._client: EmbedderClient | None = None
        self.hits = 0
        self.calls = 0
        self._count = threading.Lock()  # embed() may run in several threads at once
        self._mem: dict[Path, tuple] = {}

    @property
    def client(self) -> EmbedderClient:
        if self._client is None:
            self._client = EmbedderClient(self.address)
        return self._client

    def model_info(self, model: str) -> embedder_pb2.Model:
        """The model's identity (id, weights sha256, dim, preprocessing); loads it if needed."""
        return self.client.get_model(model, load=True)

    def _path(self, model: embedder_pb2.Model, image_sha: str, policy: CropPolicy) -> Path:
        key = hashlib.sha256(f"{model.id}|{model.weights_sha256}|{policy.key}|{image_sha}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npz"

    def embed(self, data: bytes, boxes: np.ndarray, policy: CropPolicy, model: embedder_pb2.Model) -> np.ndarray:
        """boxes: N x 4 XYXY pixels in the image `data` -> N x dim float32.

        Per image, the cache holds every box embedded so far; only boxes it lacks are sent, in
        one EmbedCrops call, and added to the file."""
        boxes = np.round(np.asarray(boxes, np.float64).reshape(-1, 4), 2)
        if len(boxes) == 0:
            return np.zeros((0, model.dim), np.float32)
        path = self._path(model, hashlib.sha256(data).hexdigest(), policy)
        known_b, known_v = np.zeros((0, 4)), np.zeros((0, model.dim), np.float32)
        index = None
        if path in self._mem:
            known_b, known_v, index = self._mem[path]
        elif path.is_file():
            known_b, known_v = load_arrays(path, "boxes", "vectors")
        if index is None:
            index = {tuple(b): i for i, b in enumerate(known_b)}
            self._remember(path, known_b, known_v, index)
        missing = [i for i, b in enumerate(boxes) if tuple(b) not in index]
        if not missing:
            with self._count:
                self.hits += 1
            return known_v[[index[tuple(b)] for b in boxes]]
        with self._count:
            self.calls += 1
        todo = np.unique(boxes[missing], axis=0)
        resp = self.client.embed_crops_raw(data, todo, model.id, policy.to_proto())
        known_b = np.concatenate([known_b, todo])
        known_v = np.concatenate([known_v, codec.from_proto(resp.embeddings)])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, boxes=known_b, vectors=known_v)
        os.replace(tmp, path)
        index = {tuple(b): i for i, b in enumerate(known_b)}
        self._remember(path, known_b, known_v, index)
        return known_v[[index[tuple(b)] for b in boxes]]

    def _remember(self, path, boxes, vectors, index) -> None:
        # Mining scores the same boxes many times over; keep recent images in memory.
        if len(self._mem) > 4096:
            self._mem.clear()
        self._mem[path] = (boxes, vectors, index)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class FeatureMapCache:
    """Images' dense feature maps (GetFeatureMap) for locator training, cached on disk per image
    sha256 + model id + weights sha256 (float32 .npz, no pickles), so training again on the same
    images calls the embedder for none."""

    def __init__(self, embeds: CropEmbeddingCache, cache_dir: Path) -> None:
        self.embeds = embeds
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.calls = 0
        self._count = threading.Lock()  # get() runs in several threads at once (get_many)

    def get_many(self, datas: Iterable[bytes], model: embedder_pb2.Model, in_flight: int = IN_FLIGHT) -> Iterator:
        """get() for each image, in order, with up to `in_flight` GetFeatureMap calls at once: the
        embedder's micro-batcher runs what arrives together as one encoder batch, and the
        transfer, decoding and cache writes of one image overlap the encoder pass of the next.
        `datas` is consumed lazily (a generator may build each image as it is needed)."""
        self.embeds.client  # noqa: B018 (made once, before the threads share it)
        with concurrent.futures.ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="fmap-get") as pool:
            pending: collections.deque = collections.deque()
            try:
                for data in datas:
                    pending.append(pool.submit(self.get, data, model))
                    if len(pending) > in_flight:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def get(self, data: bytes, model: embedder_pb2.Model):
        """-> (C x rows x cols float32, minehead.locator.frame.FeatureFrame)."""
        from minehead.locator.frame import FeatureFrame

        key = hashlib.sha256(f"{model.id}|{model.weights_sha256}|{hashlib.sha256(data).hexdigest()}".encode()).hexdigest()
        path = self.cache_dir / key[:2] / f"{key}.npz"
        if path.is_file():
            fmap, g = load_arrays(path, "fmap", "frame")
            with self._count:
                self.hits += 1
            return fmap, FeatureFrame.for_image(int(g[0]), int(g[1]), int(g[2]), model.preprocessing.resize,
                                                fmap.shape[1], fmap.shape[2])
        with self._count:
            self.calls += 1
        import grpc

        from minehead.core.errors import FailedPrecondition

        try:
            fmap, frame = self.embeds.client.feature_map(data, model.id)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise FailedPrecondition(e.details()) from None
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, fmap=fmap, frame=np.array([frame.image_width, frame.image_height, frame.input_size]))
        os.replace(tmp, path)
        return fmap, frame
