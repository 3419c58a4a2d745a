"""What the miner's capabilities share, made once when the miner starts: the recipe and recipe
set stores, loaded detectors (by model, floor and head), heads from the head service, the crop
embedding cache, datasets, the job runner and the ImagePool. The gRPC edge (`api/`) asks it for
these; the capabilities (`mining/`, `drafting/`, `recipes/`) take what they need as arguments.

Folders under the miner's data dir: recipes/, recipe_sets/, detections/ (the detection cache),
embeddings/, heads/ (head bundles by id), datasets/ (fetched from the head service),
negatives/ (per mining job), drafts/ (drafting jobs without an output folder).
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
from google.protobuf import json_format

from minehead.client.heads import HeadClient
from minehead.common.v1 import common_pb2
from minehead.core.errors import FailedPrecondition, InvalidArgument, MineheadError, NotFound
from minehead.core.jobs import JobRunner, job_id_from_name
from minehead.crop_embeddings import CropEmbeddingCache
from minehead.datasets import load_dataset
from minehead.drafts.folder import check_formats
from minehead.heads.bundle import HeadBundle
from minehead.miner.v1 import drafting_pb2, miner_pb2

from miner_svc.datasets import DatasetResolver
from miner_svc.detectors import create_detector
from miner_svc.detectors.shared_maps import EmbedderMaps
from miner_svc.exemplars.finder import ExemplarFinder
from miner_svc.recipes.drafter import Drafter, draft_floor, make_drafter, threshold_scale
from miner_svc.recipes.detection_cache import DEFAULT_FLOOR, CachedDetector
from miner_svc.recipes.scorer import HeadScorer, feature_pool
from miner_svc.recipes.sets import RecipeSetStore, make_set
from miner_svc.recipes.store import RecipeStore


class MinerResources:
    def __init__(self, service_dir: Path, models_dir: Path, head_address: str, embedder_address: str,
                 allowed_roots: list[Path], runner: JobRunner, pool, default_detector: str = "sam3-tiny-random",
                 offline: bool = True) -> None:
        """pool: the ImagePool (`miner_svc.scale`), chosen by the caller."""
        self.dir = service_dir
        self.models_dir = models_dir
        self.head_address = head_address
        self.allowed_roots = allowed_roots
        self.runner = runner
        self.pool = pool
        self.default_detector = default_detector
        self.offline = offline
        self.store = RecipeStore(service_dir / "recipes")
        self.sets = RecipeSetStore(service_dir / "recipe_sets")
        self.embeds = CropEmbeddingCache(embedder_address, service_dir / "embeddings")
        self.embedder_address = embedder_address
        self._finder: ExemplarFinder | None = None
        # one dataset store: folders under the allowed roots, or "datasets/{id}" from the head service
        self.datasets = DatasetResolver(head_address, allowed_roots, service_dir / "datasets")
        self.negatives_dir = service_dir / "negatives"
        self._models: dict[str, object] = {}  # model id -> loaded Detector
        self._detectors: dict[str, CachedDetector] = {}
        self._lock = threading.Lock()
        self.negatives_dir.mkdir(parents=True, exist_ok=True)
        (service_dir / "heads").mkdir(parents=True, exist_ok=True)

    # -- models -------------------------------------------------------------------------------
    def detector(self, model_id: str, floor: float = DEFAULT_FLOOR, head: HeadBundle | None = None,
                 out_of_fold: bool = False) -> CachedDetector:
        """The cached detector for a model and floor; a detector that proposes with the head is
        bound to `head` (one loaded model, one view per head; out_of_fold: mining's view, which
        proposes on each of a cross-fitted head's labelled images with its fold's models)."""
        with self._lock:
            if model_id not in self._models:
                det = create_detector(model_id, self.models_dir, self.offline)
                if hasattr(det, "share_maps"):
                    # the embedder's cache first: images `heads train` encoded cost mining no pass
                    det.share_maps(EmbedderMaps(self.embedder_address, det.encoder.info))
                self._models[model_id] = det
            base = self._models[model_id]
            bound = base.with_head(head, out_of_fold) if base.uses_head and head is not None else base
            key = f"{bound.cache_key}@{floor:g}"
            if key not in self._detectors:
                self._detectors[key] = CachedDetector(bound, self.dir / "detections", floor)
            return self._detectors[key]

    def fetch_head(self, name: str) -> HeadBundle:
        """The head bundle from the head service, kept locally by id (heads are immutable)."""
        try:
            with HeadClient(self.head_address) as c:
                hid = c.get(name).head_id
                cached = self.dir / "heads" / f"{hid}.zip"
                if not cached.is_file():
                    cached.write_bytes(c.download(hid))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"head {name!r}: {e.details()}") from None
            raise FailedPrecondition(f"head service at {self.head_address} answered {e.code().name}: {e.details()}") from None
        return HeadBundle.from_zip(cached.read_bytes())

    def scorer_for(self, head: HeadBundle, det: CachedDetector, keep_images: int = 256,
                   out_of_fold: bool = False) -> HeadScorer:
        """The head's scorer for runs with `det`: crop embeddings pooled from the detector's own
        feature map where its encoder is the head's embedder, else the embedder's (`feature_pool`);
        out_of_fold: a cross-fitted head's labelled images scored by their fold's head."""
        model = self.embeds.model_info(head.embedder_model)
        return HeadScorer(head, self.embeds, model, pool=feature_pool(det.detector, head, model), keep_images=keep_images,
                          out_of_fold=out_of_fold)

    def resolve_dataset(self, ref: str) -> Path:
        """A dataset folder the miner may read: a path under the allowed roots, or "datasets/{id}"
        uploaded to the head service (fetched once, kept by id)."""
        return self.datasets.resolve(ref)

    def labelled_dataset(self, rset: drafting_pb2.RecipeSet):
        """(the labelled dataset a set was mined on, or None; where it came from or why there is
        none): read from the set's mining job, when this miner ran it and still reaches it."""
        if not rset.source_job:
            return None, "the recipe set names no mining job (imported)"
        try:
            job = self.runner.store.get(job_id_from_name(rset.source_job))
            ref = json_format.MessageToDict(job.request).get("spec", {}).get("dataset", "") if job.kind == "mining" else ""
            if not ref:
                return None, f"{rset.source_job} names no dataset"
            return load_dataset(self.resolve_dataset(ref)), ref
        except MineheadError as e:
            return None, f"the dataset of {rset.source_job} cannot be read: {e}"

    # -- recipe sets and drafters ---------------------------------------------------------------
    def recipe_set(self, name: str) -> drafting_pb2.RecipeSet:
        """A stored set ("recipeSets/{id}" or an id), or the set a mining job made ("jobs/{id}")."""
        return self.set_for_job(name) if name.startswith("jobs/") else self.sets.get(name)

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
        head = self.store.head(result.recipes[0].recipe_id)
        return self.sets.put(make_set(list(result.recipes), head, job), head)

    def drafter(self, options: drafting_pb2.DraftOptions) -> tuple[Drafter, drafting_pb2.RecipeSet]:
        """A Drafter for the options (checked) and the recipe set it drafts with."""
        if not options.recipe_set:
            raise InvalidArgument("drafting needs a recipe set (recipeSets/{id} or the mining job jobs/{id})")
        check_formats(list(options.formats))
        if not 0 <= options.overlap_iou <= 1 or not 0 <= options.ambiguity_margin <= 1:
            raise InvalidArgument("overlap_iou and ambiguity_margin must be within [0, 1]")
        rset = self.recipe_set(options.recipe_set)
        head = self.sets.head(rset.recipe_set_id)
        shared = self.detector(rset.detector, draft_floor(rset, threshold_scale(options)), head)
        model = self.embeds.model_info(head.embedder_model)
        return make_drafter(shared.detector, head, rset, options, self.embeds, model, self.dir / "detections"), rset

    def finder(self) -> ExemplarFinder:
        """The exemplar search (FindSimilar), made on first use: the SAM decoder loads then."""
        with self._lock:
            if self._finder is None:
                self._finder = ExemplarFinder(self.embedder_address, self.models_dir)
            return self._finder

    def close(self) -> None:
        self.embeds.close()
        if self._finder is not None:
            self._finder.close()
        self.pool.close()
        for det in self._models.values():
            if getattr(det, "maps", None) is not None:
                det.maps.close()
