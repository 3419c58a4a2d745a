"""The ImagePool on Ray (`pool.py`): mining's detection phase and drafting's per-image work run
on Ray actors instead of in the miner's process. Without `--ray-address` nothing here is imported.

    pool = RayPool("auto", workers=None, models_dir=..., offline=True)   # connects on first use
    for position, data, state, failure in pool.detect(ctx, det, head, model, images, prompts): ...   # mining
    for index, path, drafted in pool.draft(ctx, drafter, images): ...                       # drafting

What runs where. A `Worker` actor (`ray_worker.py`; one per GPU with num_gpus=1, else N on CPU)
loads each detector once and keeps it for every later job; per job it builds what the job needs
once (the head bound to the detector, or a whole `Drafter`) from a setup put in the object store
once (`specs.DetectSpec`, `specs.DraftSpec`). Images travel to it in chunks (bytes: workers need
not share a filesystem); results come back through the object store: for mining the floor runs
per (image, prompt) exactly as the miner's detection cache keeps them (`FloorRun`) plus the crop
embeddings of their boxes pooled from the worker's feature map; for drafting the serialized
`DraftedImage`s (`specs.DetectedChunk`, `specs.DraftedChunk`). Everything
after that (selection, gate sweep, the draft folder and its exactly-once ledger, job events)
stays in the miner, unchanged, so results equal the in-process ones.

Dispatch keeps one chunk in flight per actor (`ray.wait`), so a slow actor never holds work
another could do. An actor that dies (RayActorError) has its unfinished chunk put back at the
front of the queue and is replaced; a chunk that kills MAX_ATTEMPTS actors fails the job. Every
image is yielded once: a chunk's result is taken once, or re-run whole. Cancel is checked after
each result and every POLL_S while waiting; on cancel (or any error) queued tasks are cancelled
and running ones are told to stop after their current image (`Worker.stop`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import uuid
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from minehead.core.errors import FailedPrecondition
from minehead.core.images import decode_image
from minehead.core.jobs import JobContext
from minehead.heads.bundle import HeadBundle
from minehead.miner.v1 import drafting_pb2

from miner_svc.recipes.drafter import Drafter
from miner_svc.recipes.detection_cache import CachedDetector
from miner_svc.scale.pool import DetectedImage, DraftedFile, ImageToDetect, ImageToDraft, unreadable
from miner_svc.scale.ray_worker import Worker
from miner_svc.scale.specs import DetectSpec, DraftSpec, WorkerSetup

log = logging.getLogger(__name__)

NAMESPACE = "minehead"
CHUNK_IMAGES = 4  # small enough to balance and to lose little when an actor dies
MAX_ATTEMPTS = 3  # a chunk that takes down this many actors is poison: fail the job, naming it
POLL_S = 0.5  # cancel latency while waiting on workers
START_TIMEOUT_S = 180.0  # the first job waits this long for the workers to come up


class _Chunk:
    def __init__(self, items: list, meta: list) -> None:
        self.items, self.meta, self.attempts = items, meta, 0


class RayPool:
    """The miner's handle on its Ray workers. Thread-safe; connects and starts the actors on
    first use (a miner whose Ray cluster is not up yet still starts and serves)."""

    def __init__(self, address: str, workers: int | None, models_dir: Path, offline: bool = True,
                 chunk: int = CHUNK_IMAGES, worker_cpus: int | None = None) -> None:
        self.address, self.workers, self.models_dir, self.offline = address, workers, Path(models_dir), offline
        self.chunk = max(1, int(chunk or CHUNK_IMAGES))
        self.worker_cpus = worker_cpus or None  # CPUs (and ONNX Runtime threads) per CPU actor
        self.id = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._ray = None
        self._started_ray = False
        self._actors: list = []
        self._names: list[str] = []
        self._gen = itertools.count()
        self._opts: dict = {}
        self._threads = 0
        self._local_done: threading.Event | None = None

    # -- cluster ------------------------------------------------------------------------------
    def _connect(self):
        with self._lock:
            if self._ray is None:
                if self.address == "local":
                    # A one-machine cluster in this process: keep it on loopback (Ray would bind
                    # the node's network address); read when ray is first imported.
                    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                import ray

                if not ray.is_initialized():
                    kw = dict(namespace=NAMESPACE, log_to_driver=False)
                    if self.address == "local":
                        self._start_local(ray, kw)
                    else:
                        ray.init(address=self.address, **kw)
                    self._started_ray = True
                self._ray = ray
                self._start_actors(ray)
            ray = self._ray
        self._ready(ray)
        return ray

    def _start_local(self, ray, kw: dict) -> None:
        """`ray.init` for a local cluster, from a thread that lives until `close`: Ray's head
        processes die with the *thread* that spawned them (PR_SET_PDEATHSIG), and a job thread
        may end first (the runner's pool shutting down), which killed them mid-shutdown and
        left their agents orphaned."""
        started, failed = threading.Event(), []

        def keeper():
            try:
                ray.init(include_dashboard=False, **kw)
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                failed.append(e)
            started.set()
            self._local_done.wait()

        self._local_done = threading.Event()
        threading.Thread(target=keeper, name="ray-local", daemon=True).start()
        started.wait()
        if failed:
            raise failed[0]

    def _ready(self, ray) -> None:
        """Block until every worker has loaded Python and answered, replacing any that died
        since the last job: a cluster that cannot place them (no CPU or GPU free) fails the job
        with a message instead of hanging it."""
        for slot in range(len(self._actors)):
            handle = self._actors[slot]
            try:
                ray.get(handle.info.remote(), timeout=START_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                self._replace(slot, handle)
                self._ready_one(ray, slot)
            except ray.exceptions.GetTimeoutError:
                self._timeout(ray)

    def _ready_one(self, ray, slot: int) -> None:
        try:
            ray.get(self._actors[slot].info.remote(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self._timeout(ray)

    def _timeout(self, ray):
        raise FailedPrecondition(f"Ray at {self.address}: {len(self._actors)} worker(s) with {self._opts} did not "
                                 f"start within {START_TIMEOUT_S:.0f} s (cluster resources: {ray.cluster_resources()})")

    def _start_actors(self, ray) -> None:
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        if gpus:  # one per GPU: the GPU is the unit of work; ORT/torch pick CUDA inside
            n = self.workers or gpus
            self._opts, threads = {"num_gpus": 1 if n <= gpus else gpus / n, "num_cpus": self.worker_cpus or 1}, 0
        else:  # N on CPU, sharing the cores evenly (1 worker on a 2-core node gets both) unless told
            n = self.workers or (cpus // self.worker_cpus if self.worker_cpus else cpus) or 1
            share = self.worker_cpus or (cpus // n if n <= cpus else cpus / n)
            self._opts, threads = {"num_cpus": share}, max(1, int(share))
        self._threads = threads
        for _ in range(n):
            self._actors.append(None)
            self._names.append("")
            self._spawn(ray, len(self._actors) - 1)
        log.info("Ray at %s: %d worker(s), %s each", self.address, n, self._opts)

    def _spawn(self, ray, slot: int) -> None:
        name = f"minehead-worker-{self.id}-{slot}-{next(self._gen)}"
        cls = ray.remote(max_concurrency=2, max_restarts=0)(Worker)  # 2: stop/info run beside a chunk
        self._actors[slot] = cls.options(name=name, namespace=NAMESPACE, **self._opts).remote(
            str(self.models_dir), self.offline, self._threads)
        self._names[slot] = name

    def _replace(self, slot: int, handle) -> None:
        with self._lock:
            if self._actors[slot] is handle:  # another job may have replaced it already
                try:
                    self._ray.kill(handle, no_restart=True)
                except Exception:  # already gone
                    pass
                self._spawn(self._ray, slot)

    def worker_names(self) -> list[str]:
        """The named actors (namespace "minehead"), in slot order; for operators and the tests."""
        with self._lock:
            return list(self._names)

    def close(self) -> None:
        with self._lock:
            if self._ray is None:
                return
            for a in self._actors:
                try:
                    self._ray.kill(a, no_restart=True)
                except Exception:
                    pass
            if self._started_ray:
                self._ray.shutdown()
                if self._local_done is not None:
                    self._local_done.set()
            self._ray, self._actors, self._names = None, [], []

    def _chunk_size(self, total: int) -> int:
        """`chunk` images, fewer when the job is small: every worker should get a share (4
        images on 2 workers go 2 + 2, not 4 + 0). Read once the actors exist."""
        return max(1, min(self.chunk, -(-total // max(1, len(self._actors)))))

    # -- dispatch -----------------------------------------------------------------------------
    def _run(self, ctx, method: str, spec: WorkerSetup, chunks):
        """Yields (chunk, result) as chunks finish, in any order; see the module docstring."""
        ray = self._connect()
        spec_ref = ray.put(spec)
        token = uuid.uuid4().hex
        pending: deque[_Chunk] = deque()  # chunks whose actor died: they go first
        inflight: dict = {}  # ObjectRef -> (slot, actor handle, chunk)
        free = list(range(len(self._actors)))
        source = iter(chunks)
        try:
            while True:
                while free:  # one chunk in flight per actor
                    c = pending.popleft() if pending else next(source, None)
                    if c is None:
                        break
                    slot = free.pop()
                    handle = self._actors[slot]
                    inflight[getattr(handle, method).remote(spec_ref, token, c.items)] = (slot, handle, c)
                if not inflight:
                    return
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
                ctx.check_cancelled()
                for ref in ready:
                    slot, handle, c = inflight.pop(ref)
                    res = self._take(ctx, ray, ref, slot, handle, c)
                    free.append(slot)
                    if res is None:
                        pending.appendleft(c)
                    else:
                        yield c, res
        finally:
            for ref, (slot, handle, _) in inflight.items():
                try:
                    ray.cancel(ref)  # still queued in the actor: never runs
                    handle.stop.remote(token)  # running: stops after its current image
                except Exception:  # the actor is gone: nothing to stop
                    pass

    def _take(self, ctx, ray, ref, slot: int, handle, c: _Chunk):
        """A finished chunk's result; None when its actor died (the actor is replaced and the
        chunk runs again). A chunk that took down MAX_ATTEMPTS actors fails the job; the
        worker's own exception (a bug, a model that failed to load) is raised as in-process."""
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError) as e:
            c.attempts += 1
            if c.attempts >= MAX_ATTEMPTS:
                raise FailedPrecondition(f"{c.attempts} Ray workers died on images {', '.join(map(str, c.meta))}: "
                                         f"{type(e).__name__}") from None
            ctx.warn(f"Ray worker {self._names[slot]} died ({type(e).__name__}); its {len(c.items)} image(s) run again "
                     "on another worker")
            self._replace(slot, handle)
            return None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from None

    def detect(self, ctx: JobContext, det: CachedDetector, head: HeadBundle, model,
               images: list[ImageToDetect], prompts: list[str]) -> Iterator[DetectedImage]:
        """Mining's detection phase (ImagePool.detect): every (image, prompt) floor run the
        miner's detection cache lacks is made on the workers and stored in `det` as if made here;
        the crop embeddings the workers pooled for those boxes go with the image
        (`ImageState.pooled`), so the head's scorer needs no second encoder pass or embedder
        call. Images the cache already answers never wait on Ray."""
        prompts = list(dict.fromkeys(prompts + ([""] if det.info.class_agnostic else [])))
        spec = DetectSpec(key=f"detect|{det.detector.cache_key}|{det.floor:g}|{head.head_id}|{model.weights_sha256}",
                          model_id=det.info.model_id, head_zip=head.to_zip(), model=model.SerializeToString(),
                          floor=det.floor, prompts=tuple(prompts), out_of_fold=det.detector.out_of_fold)
        local: deque[DetectedImage] = deque()  # images the cache already answers: no Ray round trip
        states: dict[int, tuple[bytes, object]] = {}
        for _, res in self._run(ctx, "detect", spec, self._detect_chunks(ctx, det, images, prompts, local, states)):
            while local:
                yield local.popleft()
            det.counters.add_passes(res.passes)
            for rows in res.images:
                data, state = states.pop(rows.key)
                if rows.failure:
                    yield DetectedImage(rows.key, data, None, rows.failure)
                    continue
                for p in prompts:
                    det.put_text(state, p, rows.runs[p])
                if rows.vectors is not None:
                    state.pooled = {b.tobytes(): v for b, v in zip(rows.boxes, np.asarray(rows.vectors, np.float32))}
                yield DetectedImage(rows.key, data, state)
        while local:
            yield local.popleft()

    def _detect_chunks(self, ctx, det: CachedDetector, images: list[ImageToDetect], prompts: list[str], local: deque,
                       states: dict):
        """Chunks of the images the detection cache lacks; the others go to `local` ready."""
        batch: list = []
        size = self._chunk_size(len(images))
        for k, name, path in images:
            ctx.check_cancelled()  # as in-process, before each image (cache hits never wait on Ray)
            data = path.read_bytes()
            state = det.set_image(decode_image(data, name))
            if all(det.has_text(state.image.sha256, p) for p in prompts):
                for p in prompts:
                    det.text(state, p)
                local.append(DetectedImage(k, data, state))
                continue
            states[k] = (data, state)
            batch.append((k, name, data))
            if len(batch) == size:
                yield _Chunk(batch, [n for _, n, _ in batch])
                batch = []
        if batch:
            yield _Chunk(batch, [n for _, n, _ in batch])

    def draft(self, ctx: JobContext, drafter: Drafter, images: list[ImageToDraft]) -> Iterator[DraftedFile]:
        """Drafting's per-image work on the workers (ImagePool.draft): each worker rebuilds the
        drafter from its recipe set and options; the workers' pass counters, embedded / pooled
        box counts, look-alike counts and warnings are added to `drafter`'s, so the job's summary reads as
        in-process. Unreadable files are answered here."""
        rs = drafter.recipe_set.SerializeToString(deterministic=True)
        opts = drafter.options.SerializeToString(deterministic=True)
        spec = DraftSpec(key="draft|" + hashlib.sha256(rs + b"|" + opts + drafter.head.head_id.encode()).hexdigest(),
                         model_id=drafter.recipe_set.detector, head_zip=drafter.head.to_zip(),
                         model=drafter.scorer.model.SerializeToString(), recipe_set=rs, options=opts,
                         embedder=drafter.scorer.embeds.address, cache_dir=str(drafter.det.cache_dir))
        local: deque[DraftedFile] = deque()
        paths: dict[int, Path] = {}
        for _, res in self._run(ctx, "draft", spec, self._draft_chunks(images, local, paths)):
            while local:
                yield local.popleft()
            drafter.det.counters.add_passes(res.passes)
            drafter.scorer.boxes_embedded += res.boxes_embedded
            drafter.scorer.boxes_pooled += res.boxes_pooled
            drafter.relabelled += res.relabelled
            drafter.dropped += res.lookalikes_dropped
            drafter.warnings.extend(w for w in res.warnings if w not in drafter.warnings)
            for raw in res.drafted:
                d = drafting_pb2.DraftedImage.FromString(raw)
                yield DraftedFile(d.index, paths.pop(d.index), d)
        while local:
            yield local.popleft()

    def _draft_chunks(self, images: list[ImageToDraft], local: deque, paths: dict):
        batch: list = []
        size = self._chunk_size(len(images))
        for i, p in images:
            try:
                data = p.read_bytes()
            except OSError as e:
                local.append(DraftedFile(i, p, unreadable(i, p, e)))
                continue
            paths[i] = p
            batch.append((i, p.name, data))
            if len(batch) == size:
                yield _Chunk(batch, [n for _, n, _ in batch])
                batch = []
        if batch:
            yield _Chunk(batch, [n for _, n, _ in batch])
