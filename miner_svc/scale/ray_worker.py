"""The Ray actor of the scale-out (`ray_pool.RayPool` starts and feeds it): one process on a
Ray node holding a loaded detector, doing the per-image work of mining's detection phase
(`detect`) and of drafting (`draft`) for chunks of images sent as bytes.

It is a plain class (RayPool wraps it with `ray.remote`), so importing it needs no Ray, and it
is pickled by reference: every Ray node needs the minehead package installed (one image).

    w = Worker(models_dir, offline=True, threads=1)        # in the actor process
    w.detect(spec, token, [(key, name, jpeg_bytes), ...])   # -> DetectedChunk: floor runs + pooled crop vectors
    w.draft(spec, token, [(index, name, jpeg_bytes), ...])  # -> DraftedChunk: serialized DraftedImages

`spec` is one job's setup (`specs.DetectSpec` or `specs.DraftSpec`), put in Ray's object store
once by the pool. The worker builds what a job needs once, keyed by `spec.key`, and keeps the
last few (a job's chunks come one after another). Work runs one chunk at a time (a lock); the
actor runs with two threads so `stop` and `info` answer while a chunk runs.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np

from minehead.core.images import decode_image

from miner_svc.recipes.detection_cache import FloorRun
from miner_svc.scale.pool import failure
from miner_svc.scale.specs import DetectedChunk, DetectedRows, DetectSpec, DraftedChunk, DraftSpec, WorkerSetup

SETUPS_KEPT = 4  # per-job setups (bound heads, drafters) an actor keeps


class Worker:
    """The Ray actor (wrapped with ray.remote by RayPool; a plain class so importing this
    module needs no Ray). Runs one chunk at a time; `stop` and `info` answer meanwhile."""

    def __init__(self, models_dir: str, offline: bool, threads: int = 0) -> None:
        if threads:  # CPU actors share the node's cores: ORT's pool must not oversubscribe them
            os.environ["MINEHEAD_ORT_THREADS"] = str(threads)
        self.models_dir, self.offline = Path(models_dir), offline
        self.scratch = Path(tempfile.mkdtemp(prefix="minehead-worker-"))
        self._models: dict[str, object] = {}
        self._setups: OrderedDict[str, object] = OrderedDict()
        self._work = threading.Lock()
        self._stopped: deque[str] = deque(maxlen=64)
        self.images_done = 0
        self.busy = False

    def info(self) -> dict:
        return {"pid": os.getpid(), "images_done": self.images_done, "busy": self.busy, "models": sorted(self._models)}

    def stop(self, token: str) -> None:
        self._stopped.append(token)

    # -- setup, once per job ------------------------------------------------------------------
    def _setup(self, spec: WorkerSetup):
        """(bound detector, head, crop-vector pool) for a DetectSpec; a Drafter for a DraftSpec."""
        got = self._setups.get(spec.key)
        if got is not None:
            self._setups.move_to_end(spec.key)
            return got
        from minehead.crop_embeddings import CropEmbeddingCache
        from minehead.embedder.v1 import embedder_pb2
        from minehead.heads.bundle import HeadBundle
        from minehead.miner.v1 import drafting_pb2
        from miner_svc.detectors import create_detector
        from miner_svc.recipes.drafter import make_drafter
        from miner_svc.recipes.scorer import feature_pool

        head = HeadBundle.from_zip(spec.head_zip)
        model = embedder_pb2.Model.FromString(spec.model)
        if spec.model_id not in self._models:
            self._models[spec.model_id] = create_detector(spec.model_id, self.models_dir, self.offline)
        base = self._models[spec.model_id]
        det = base.with_head(head, getattr(spec, "out_of_fold", False)) if base.uses_head else base
        if isinstance(spec, DraftSpec):
            embeds = CropEmbeddingCache(spec.embedder, self.scratch / "embeddings")
            got = make_drafter(det, head, drafting_pb2.RecipeSet.FromString(spec.recipe_set),
                               drafting_pb2.DraftOptions.FromString(spec.options), embeds, model,
                               self._cache_dir(spec.cache_dir))
        else:
            got = (det, head, feature_pool(det, head, model))
        self._setups[spec.key] = got
        while len(self._setups) > SETUPS_KEPT:
            old = self._setups.popitem(last=False)[1]
            if hasattr(old, "scorer"):
                old.scorer.embeds.close()
        return got

    def _cache_dir(self, shared: str) -> Path:
        """The miner's detection cache where this node sees it (same machine, or a shared volume
        at the same path): mined images are then not detected again. Else a scratch folder."""
        try:
            Path(shared).mkdir(parents=True, exist_ok=True)
            return Path(shared)
        except OSError:
            return self.scratch / "detections"

    # -- work ---------------------------------------------------------------------------------
    def detect(self, spec: DetectSpec, token: str, chunk: list) -> DetectedChunk:
        """chunk: [(key, name, bytes)] -> each image's floor runs, their distinct boxes and the
        boxes' crop vectors pooled from the feature map (when the head's embedder is the
        detector's encoder)."""
        with self._work:
            self.busy = True
            try:
                det, head, pool = self._setup(spec)
                before = det.counters.snapshot()
                out = []
                for key, name, data in chunk:
                    if token in self._stopped:
                        break
                    try:
                        out.append(self._detect_one(det, head, pool, spec, key, decode_image(data, name)))
                    except Exception as e:  # noqa: BLE001 - one image never fails the job
                        out.append(DetectedRows(key, {}, np.zeros((0, 4), np.float32), None, failure(name, e)))
                    self.images_done += 1
                return DetectedChunk(out, det.counters.since(before))
            finally:
                self.busy = False

    @staticmethod
    def _detect_one(det, head, pool, spec: DetectSpec, key: int, image) -> DetectedRows:
        state = det.set_image(image)
        h, w = state.image.height, state.image.width
        if det.info.class_agnostic:  # the prompt cannot steer it: one run serves all
            run = FloorRun.pack(det.predict_text(state, "", spec.floor), h, w)
            runs = {p: run for p in spec.prompts}
        else:
            runs = {p: FloorRun.pack(det.predict_text(state, p, spec.floor), h, w) for p in spec.prompts}
        boxes = np.unique(np.concatenate([r.boxes for r in runs.values()] + [np.zeros((0, 4), np.float32)]), axis=0)
        vectors = pool(state, boxes, head.crop_policy) if pool is not None and len(boxes) else None
        return DetectedRows(key, runs, boxes, vectors)

    def draft(self, spec: DraftSpec, token: str, chunk: list) -> DraftedChunk:
        """chunk: [(index, name, bytes)] -> the serialized DraftedImages, the counters, warnings."""
        with self._work:
            self.busy = True
            try:
                drafter = self._setup(spec)
                before = drafter.det.counters.snapshot()
                e0, p0 = drafter.scorer.boxes_embedded, drafter.scorer.boxes_pooled
                r0, d0 = drafter.relabelled, drafter.dropped
                out = []
                for i, name, data in chunk:
                    if token in self._stopped:
                        break
                    out.append(drafter.draft(data, name, i).SerializeToString())
                    self.images_done += 1
                return DraftedChunk(out, drafter.det.counters.since(before), drafter.scorer.boxes_embedded - e0,
                                    drafter.scorer.boxes_pooled - p0, list(drafter.warnings),
                                    drafter.relabelled - r0, drafter.dropped - d0)
            finally:
                self.busy = False
