"""The HeadService gRPC edge: proto <-> library, nothing more."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from google.protobuf import timestamp_pb2

from minehead.core import embeddings as codec
from minehead.core.errors import FailedPrecondition, InvalidArgument, NotFound
from minehead.core.file_chunks import file_chunks, gather_chunks
from minehead.core.floats import user_float
from minehead.core.jobs import JobContext, JobRunner, struct_from_dict
from minehead.core.paths import image_ref_bytes, resolve_allowed
from minehead.head.v1 import head_pb2, head_pb2_grpc

from minehead.crops import CropPolicy, boxes_from_proto
from head_svc import cross_fit, locator_training, training
from minehead.heads.bundle import BG_PREFIX, MAX_FOLDS, HeadBundle
from minehead import dataset_store
from minehead.datasets import load_dataset
from minehead.crop_embeddings import CropEmbeddingCache, FeatureMapCache
from head_svc.registry import HeadRegistry
from minehead.locator.paste import MAX_PER_IMAGE as MAX_CROWDED_PER_IMAGE
from minehead.locator.train import LocatorParams
from head_svc.score_wire import score_response
from head_svc.scoring import DEFAULT_AMBIGUITY_MARGIN, effective_thresholds, score_embeddings

MAX_DATASET_ZIP = dataset_store.MAX_DATASET_ZIP
_HEAD_TYPES = {head_pb2.HEAD_TYPE_UNSPECIFIED: "logreg", head_pb2.LOGREG: "logreg", head_pb2.MLP: "mlp"}


def variant_from_spec(spec: head_pb2.TrainingSpec, name: str = "") -> training.Variant:
    st = spec.soft_targets
    uf = user_float  # float32 proto fields back to what the user typed (0.1, not 0.10000000149011612)
    return training.Variant(
        head_type=_HEAD_TYPES.get(spec.head_type, "logreg"), label_smoothing=uf(st.label_smoothing),
        teacher_temperature=uf(st.teacher_temperature), margin_loss=uf(st.margin_loss),
        hidden_sizes=tuple(spec.hidden_sizes) or (256,),
        dropout=uf(spec.dropout) if spec.HasField("dropout") else 0.1,
        weight_decay=uf(spec.weight_decay) if spec.HasField("weight_decay") else 1e-4,
        max_epochs=spec.max_epochs or 200, logreg_c=uf(spec.logreg_c) or 1.0, name=name)


def head_proto(b: HeadBundle, full: bool = False) -> head_pb2.Head:
    from minehead.common.v1 import common_pb2

    t = b.meta["default_thresholds"]
    ct = timestamp_pb2.Timestamp()
    ct.FromJsonString(b.meta["created_time"].replace("+00:00", "Z"))
    h = head_pb2.Head(
        name=f"heads/{b.head_id}", head_id=b.head_id, display_name=b.display_name,
        head_type=head_pb2.MLP if b.meta["head_type"] == "mlp" else head_pb2.LOGREG,
        classes=b.classes, background_indices=b.background_indices,
        embedder=common_pb2.ModelRef(model_id=b.embedder_model, weights_sha256=b.meta["embedder"].get("weights_sha256", ""),
                                     dim=b.dim),
        default_thresholds=head_pb2.Thresholds(min_prob=t["min_prob"], margin=t["margin"],
                                               background_guard=bool(t.get("background_guard", True)),
                                               background_margin=t["background_margin"]),
        create_time=ct, size_bytes=sum(len(v) for v in b.files().values()), has_locator=b.locator is not None)
    if full:
        h.meta.update(b.meta)
    return h


class HeadServicer(head_pb2_grpc.HeadServiceServicer):
    def __init__(self, service_dir: Path, embedder_address: str, allowed_roots: list[Path], runner: JobRunner) -> None:
        self.registry = HeadRegistry(service_dir / "heads")
        self.embeds = CropEmbeddingCache(embedder_address, service_dir / "embeddings")
        self.fmaps = FeatureMapCache(self.embeds, service_dir / "feature_maps")
        self.datasets_dir = service_dir / "datasets"
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        self.allowed_roots = allowed_roots
        self.runner = runner

    # -- datasets ---------------------------------------------------------------------------
    def _dataset_path(self, ref: head_pb2.DatasetRef) -> tuple[Path, str]:
        which = ref.WhichOneof("source")
        if which == "path":
            return resolve_allowed(ref.path, self.allowed_roots), ref.path
        if which == "name":
            return self._stored_dataset(ref.name)
        raise InvalidArgument("dataset: give a path (under the allowed roots) or an uploaded dataset name")

    def _stored_dataset(self, name: str) -> tuple[Path, str]:
        did = dataset_store.dataset_id(name)
        p = self.datasets_dir / did
        if not p.is_dir():
            raise NotFound(f"no uploaded dataset {name!r}")
        return p, f"datasets/{did}"

    def UploadDataset(self, request_iterator, context):
        data, fields = gather_chunks(request_iterator, MAX_DATASET_ZIP, f"dataset zip is over {MAX_DATASET_ZIP} bytes")
        display = fields.get("display_name", "")
        did = hashlib.sha256(data).hexdigest()[:16]
        # the same checks and unpacking as every other service that stores a dataset
        target = dataset_store.unpack(data, self.datasets_dir, did)
        ds = load_dataset(target)
        return head_pb2.Dataset(name=f"datasets/{did}", display_name=display, classes=ds.classes,
                                image_count=len(ds.images), label_count=ds.label_count, dropped=ds.dropped)

    def GetDataset(self, request, context):
        path, name = self._stored_dataset(request.name)
        ds = load_dataset(path)
        return head_pb2.Dataset(name=name, classes=ds.classes, image_count=len(ds.images), label_count=ds.label_count,
                                dropped=ds.dropped)

    def ExportDataset(self, request, context):
        path, _ = self._stored_dataset(request.name)
        yield from file_chunks(dataset_store.folder_zip(path))

    # -- jobs -------------------------------------------------------------------------------
    def StartTraining(self, request, context):
        spec = request.spec
        path, label = self._dataset_path(spec.dataset)
        ds = load_dataset(path)  # bad datasets fail the call, not a job later
        variant = variant_from_spec(spec)
        variant.validate()
        policy = CropPolicy.from_proto(spec.crop_policy if spec.HasField("crop_policy") else None)
        bg = spec.background_classes if spec.HasField("background_classes") else 2
        if bg < 0 or bg > 16:
            raise InvalidArgument(f"background_classes must be 0..16, got {bg}")
        frac = user_float(spec.holdout_fraction) or 0.25
        if not 0 < frac < 1:
            raise InvalidArgument(f"holdout_fraction must be in (0, 1), got {frac}")
        negatives = [load_dataset(self._dataset_path(ref)[0]) for ref in spec.negatives]
        if negatives and bg == 0:
            raise InvalidArgument("negatives feed the __bg_* classes: they need background_classes > 0")
        if spec.locator_hidden < 0 or spec.locator_hidden > 512 or spec.locator_max_epochs < 0 or spec.locator_max_epochs > 5000:
            raise InvalidArgument("locator_hidden must be 0..512 and locator_max_epochs 0..5000")
        if spec.locator_augment not in ("", "auto", "none", "flip", "dihedral"):
            raise InvalidArgument(f"locator_augment must be auto, none, flip or dihedral, got {spec.locator_augment!r}")
        if not (spec.cross_fit_folds in (0, 1) or 2 <= spec.cross_fit_folds <= MAX_FOLDS):
            raise InvalidArgument(f"cross_fit_folds must be 0 or 1 (none, the default) or 2..{MAX_FOLDS}, "
                                  f"got {spec.cross_fit_folds}")
        crowded = spec.locator_crowded_copies if spec.HasField("locator_crowded_copies") else None
        if crowded is not None and not 0 <= crowded <= MAX_CROWDED_PER_IMAGE:
            raise InvalidArgument(f"locator_crowded_copies must be 0 (none) .. {MAX_CROWDED_PER_IMAGE} copies an image, "
                                  f"or unset (auto), got {crowded}")
        loc_params = LocatorParams(hidden=spec.locator_hidden or 32, max_epochs=spec.locator_max_epochs or 400, seed=spec.seed,
                                   augment=spec.locator_augment or "auto", crowded_copies=crowded)

        def job(ctx: JobContext):
            ctx.phase("reading")
            ctx.log(f"dataset {label}: {len(ds.images)} images, {ds.label_count} labels, classes {', '.join(ds.classes)}")
            p = training.prepare(ds, ctx, self.embeds, model=spec.model, classes=list(spec.classes),
                                 background_classes=bg, holdout_fraction=frac, seed=spec.seed, policy=policy,
                                 negatives=negatives)
            ctx.phase("training")
            head, report = training.fit_variant(p, variant, ctx)
            cross = self._cross_fit(p, spec, variant, head, ctx)
            loc = self._locator(p, spec, ctx, loc_params, cross)
            if cross is not None:
                cross.locators = loc.folds if loc is not None else []
            ctx.phase("exporting")
            bundle = training.build_bundle(p, variant, head, report, spec.display_name, label, locator=loc, cross=cross)
            stored = self.registry.put(bundle)
            ctx.log(f"head {stored.head_id} saved: held-out accuracy {report.get('accuracy', 0):.3f}, "
                    f"macro F1 {report.get('macro_f1', 0):.3f}, parity {stored.meta['parity_max_abs_err']:.2g}")
            return head_pb2.TrainingResult(head=head_proto(stored), report=struct_from_dict(stored.report or {}))

        return self.runner.start("training", request, job)

    @staticmethod
    def _cross_fit(p: training.Prepared, spec: head_pb2.TrainingSpec, variant, head, ctx: JobContext):
        """The cross-fitting folds and their classifier heads (head_svc.cross_fit), or None."""
        k = cross_fit.folds_for(len(p.image_ids), spec.cross_fit_folds)
        if not k:
            if spec.cross_fit_folds > 1:
                ctx.warn(f"cross-fitting: none ({len(p.image_ids)} labelled image(s), fewer than the "
                         f"{spec.cross_fit_folds} folds asked for)")
            return None
        img_classes = [set() for _ in p.image_ids]
        for yi, gi in zip(p.y, p.group):
            if gi >= 0 and not p.classes[yi].startswith(BG_PREFIX):
                img_classes[gi].add(int(yi))
        folds = cross_fit.assign_folds(img_classes, k, p.seed)
        if np.bincount(folds, minlength=k).min() == 0:  # every fold model must leave something out
            ctx.log(f"cross-fitting: none (the {len(folds)} images did not fill {k} folds)")
            return None
        heads = cross_fit.fit_fold_heads(p, lambda part: training.fit_variant(part, variant, ctx, quiet=True)[0],
                                         folds, head, ctx)
        ctx.log(f"cross-fitting: {k} folds of {', '.join(str(int((folds == f).sum())) for f in range(k))} images, "
                "a head fitted without each")
        return cross_fit.CrossFit(folds, heads)

    def _locator(self, p: training.Prepared, spec: head_pb2.TrainingSpec, ctx: JobContext, params: LocatorParams,
                 cross=None):
        """The locator for this head, or None: off when asked, or (unless asked for) when the
        embedder model has no feature map."""
        if spec.HasField("locator") and not spec.locator:
            ctx.log("locator: off (locator = false)")
            return None
        try:
            return locator_training.train_locator(p, ctx, self.fmaps, params,
                                                  cross.image_fold if cross is not None else None)
        except FailedPrecondition as e:
            if spec.HasField("locator"):
                raise
            ctx.warn(f"locator: not trained ({e}); drafting with this head uses the detector's own proposals")
            return None

    def CompareHeads(self, request, context):
        path, label = self._dataset_path(request.dataset)
        ds = load_dataset(path)
        variants = [variant_from_spec(s) for s in request.variants] or [
            training.Variant("logreg"), training.Variant("logreg", label_smoothing=0.1),
            training.Variant("mlp"), training.Variant("mlp", label_smoothing=0.1)]
        for v in variants:
            v.validate()
        bg = request.background_classes if request.HasField("background_classes") else 2

        def job(ctx: JobContext):
            ctx.phase("reading")
            p = training.prepare(ds, ctx, self.embeds, model=request.model, classes=[], background_classes=bg,
                                 holdout_fraction=0.25, seed=request.seed, policy=CropPolicy())
            ctx.phase("training")
            reports = {}
            for i, v in enumerate(variants):
                ctx.check_cancelled()
                ctx.log(f"variant {i + 1}/{len(variants)}: {v.label}")
                _, reports[v.label] = training.fit_variant(p, v, ctx)
                ctx.progress(i + 1, len(variants), "variants")
            return head_pb2.ComparisonResult(report=struct_from_dict(comparison_report(p, reports)))

        return self.runner.start("comparison", request, job)

    # -- registry ---------------------------------------------------------------------------
    def ListHeads(self, request, context):
        heads, problems = self.registry.list()
        return head_pb2.ListHeadsResponse(heads=[head_proto(b, request.full) for b in heads], problems=problems)

    def GetHead(self, request, context):
        return head_proto(self.registry.get(request.name), full=True)

    def DownloadHead(self, request, context):
        yield from file_chunks(self.registry.get(request.name).to_zip())

    def UploadHead(self, request_iterator, context):
        from minehead.heads.bundle import MAX_ZIP_BYTES

        data, fields = gather_chunks(request_iterator, MAX_ZIP_BYTES, f"head bundle is over {MAX_ZIP_BYTES} bytes")
        if not data:
            raise InvalidArgument("no bundle bytes received")
        return head_proto(self.registry.put(HeadBundle.from_zip(data), fields.get("display_name") or None), full=True)

    def DeleteHead(self, request, context):
        self.registry.delete(request.name)
        return head_pb2.DeleteHeadResponse()

    # -- scoring ----------------------------------------------------------------------------
    def Score(self, request, context):
        b = self.registry.get(request.head)
        which = request.WhichOneof("input")
        if which == "embeddings":
            X = codec.from_proto(request.embeddings)
        elif which == "image_boxes":
            ib = request.image_boxes
            if not ib.boxes:
                raise InvalidArgument("no boxes given")
            # The head's own embedder model and crop policy: scoring sees what training saw.
            X = self.embeds.client.embed_crops(image_ref_bytes(ib.image, self.allowed_roots)[0], boxes_from_proto(ib.boxes),
                                               b.embedder_model, b.crop_policy.to_proto())
        else:
            raise InvalidArgument("give embeddings or image_boxes to score")
        th = request.thresholds
        t, warnings = effective_thresholds(
            b, *(getattr(th, f) if th.HasField(f) else None for f in ("min_prob", "margin", "background_guard", "background_margin")))
        amb = request.ambiguity_margin if request.HasField("ambiguity_margin") else DEFAULT_AMBIGUITY_MARGIN
        res = score_embeddings(b, X, request.target_class or None, t, warnings, amb)
        # Column-wise wire encoding: one CropScore built per crop through the API cost more than the head.
        return score_response(res, b.head_id, request.include_probabilities)

    def close(self) -> None:
        self.embeds.close()


def comparison_report(p: training.Prepared, reports: dict[str, dict]) -> dict:
    """Per-class precision / recall side by side, and each variant's confusion on the pairs the
    first variant confuses most."""
    labels = list(reports)
    real = [c for c in p.classes if not c.startswith("__bg_")]
    per_class = {c: {v: {"precision": reports[v].get("per_class", {}).get(c, {}).get("precision", 0.0),
                         "recall": reports[v].get("per_class", {}).get(c, {}).get("recall", 0.0)} for v in labels}
                 for c in real}
    base = reports[labels[0]].get("most_confused", [])[:3] if labels else []
    pairs = []
    for pair in base:
        row = {"a": pair["a"], "b": pair["b"]}
        for v in labels:
            cm = np.array(reports[v]["confusion_matrix"]["rows_true_cols_pred"])
            i, j = p.classes.index(pair["a"]), p.classes.index(pair["b"])
            row[v] = int(cm[i, j] + cm[j, i])
        pairs.append(row)
    return {"variants": labels,
            "summary": {v: {k: reports[v].get(k, 0.0) for k in ("accuracy", "macro_f1", "log_loss", "calibration_temperature")}
                        for v in labels},
            "per_class": per_class, "confused_pairs": pairs,
            "held_out_crops": int(p.hold.sum()), "held_out_images": int(len(np.unique(p.group[p.hold])))}
