"""Training and comparison jobs: dataset -> crops -> embeddings -> heads -> bundle.

`prepare()` does the shared part once (read the dataset, sample background boxes, embed,
cluster the background, split by image); `fit_variant()` trains one head on it and measures it
on the held-out images; `train()` adds export, parity and the registry; `compare()` fits several
variants on the same split. All report through a JobContext and stop at its cancel checks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json

import numpy as np

from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.core.images import decode_image
from minehead.core.jobs import JobContext

from minehead.crops import CropPolicy
from minehead import geometry, sampling
from minehead.heads.bundle import (BG_PREFIX, IMAGE_ID_HEX, MAX_IMAGE_IDS, META_SCHEMA_VERSION, HeadBundle, content_id,
                                   fold_names, meta_json)
from minehead.datasets import Dataset
from minehead.crop_embeddings import IN_FLIGHT, CropEmbeddingCache
from head_svc import cross_fit
from head_svc.cross_fit import CrossFit
from head_svc.estimators import LogRegHead, MLPHead, fit_temperature, smooth_targets, teacher_targets
from head_svc.metrics import classification_report
from minehead.heads.onnx_export import export_head, parity

MAX_DROPPED_LOG_LINES = 50
BG_PER_IMAGE = 3  # random boxes of 8-40 % of the side (design notes, section 2)
THINGS_PER_IMAGE = 3  # object-sized boxes on unlabelled things (sampling.sample_thing_boxes)
PARITY_LIMIT = 1e-5


@dataclasses.dataclass
class Variant:
    """One head to fit: what TrainingSpec says, with defaults applied."""

    head_type: str = "logreg"
    label_smoothing: float = 0.0
    teacher_temperature: float = 0.0
    margin_loss: float = 0.0
    hidden_sizes: tuple[int, ...] = (256,)
    dropout: float = 0.1
    weight_decay: float = 1e-4
    max_epochs: int = 200
    logreg_c: float = 1.0
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [self.head_type]
        if self.label_smoothing:
            parts.append(f"ls{self.label_smoothing:g}")
        if self.teacher_temperature:
            parts.append(f"T{self.teacher_temperature:g}")
        if self.margin_loss:
            parts.append(f"m{self.margin_loss:g}")
        return "+".join(parts)

    def validate(self) -> None:
        if self.head_type not in ("logreg", "mlp"):
            raise InvalidArgument(f"head_type must be logreg or mlp, got {self.head_type!r}")
        if not 0 <= self.label_smoothing < 1:
            raise InvalidArgument(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.teacher_temperature < 0 or self.margin_loss < 0:
            raise InvalidArgument("teacher_temperature and margin_loss must be >= 0")
        if self.margin_loss and self.head_type != "mlp":
            raise InvalidArgument("margin_loss applies to the MLP head only")
        if not 1 <= len(self.hidden_sizes) <= 2 or min(self.hidden_sizes) < 1:
            raise InvalidArgument(f"hidden_sizes must be 1 or 2 positive widths, got {list(self.hidden_sizes)}")
        if not 0 <= self.dropout < 1:
            raise InvalidArgument(f"dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class Prepared:
    X: np.ndarray  # N x D embeddings
    y: np.ndarray  # N class indices into `classes`
    group: np.ndarray  # N image indices
    classes: list[str]  # real classes, then __bg_*
    train: np.ndarray  # N bool: sample is in a training image
    hold: np.ndarray  # N bool: sample is in a held-out image
    model: object  # embedder_pb2.Model
    policy: CropPolicy
    dataset: Dataset
    fingerprint: str
    notes: list[str]
    seed: int
    holdout_fraction: float
    object_sides: list[float]  # the labelled objects' [min, median, max] relative sides (geometry.side_summary)
    object_px: list[float] = dataclasses.field(default_factory=list)  # ... and longest sides in pixels
    hold_images: np.ndarray | None = None  # per dataset image: held out (the split above, by image)
    class_map: dict[int, int] = dataclasses.field(default_factory=dict)  # dataset class id -> index in classes
    image_ids: list[str] = dataclasses.field(default_factory=list)  # per dataset image: its sha256, IMAGE_ID_HEX digits

    def fitted_images(self, with_locator: bool) -> list[str]:
        """The images (IMAGE_ID_HEX sha256 digits, sorted) some part of the head is fitted on: the
        classifier on those not held out, a locator's final fit on every one."""
        if with_locator or self.hold_images is None:
            return sorted(set(self.image_ids))
        return sorted({h for h, held in zip(self.image_ids, self.hold_images) if not held})

    @property
    def background_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c.startswith(BG_PREFIX)]


def prepare(ds: Dataset, ctx: JobContext, embeds: CropEmbeddingCache, *, model: str, classes: list[str],
            background_classes: int, holdout_fraction: float, seed: int, policy: CropPolicy,
            negatives: list[Dataset] = ()) -> Prepared:
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if ds.dropped:
        ctx.warn(f"{len(ds.dropped)} label line(s) dropped while reading {ds.root.name}:")
        for line in ds.dropped[:MAX_DROPPED_LOG_LINES]:
            ctx.warn(f"  dropped {line}")
        if len(ds.dropped) > MAX_DROPPED_LOG_LINES:
            ctx.warn(f"  … and {len(ds.dropped) - MAX_DROPPED_LOG_LINES} more (all listed in report.json)")
    wanted = classes or ds.classes
    unknown = [c for c in wanted if c not in ds.classes]
    if unknown:
        raise InvalidArgument(f"classes {unknown} are not in the dataset's labelmap ({', '.join(ds.classes)})")
    keep_ids = {ds.classes.index(c): i for i, c in enumerate(wanted)}

    ctx.phase("embedding")
    m = embeds.model_info(model)
    ctx.log(f"embedder model {m.id} (dim {m.dim}, weights {m.weights_sha256[:12] or 'unknown'})")
    X_parts, y_parts, g_parts, bg_parts, bg_groups, sides, sides_px = [], [], [], [], [], [], []
    hits_before, calls_before = embeds.hits, embeds.calls
    fp = hashlib.sha256()
    image_ids = []
    n_pos = ds.label_count
    per_image_bg = BG_PER_IMAGE if background_classes > 0 else 0
    embeds.client  # noqa: B018 (made once, before the pool's threads share it)
    pool = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="embed-crops")
    pending: collections.deque = collections.deque()
    try:
        for gi, rec in enumerate(ds.images):
            ctx.check_cancelled()
            data = rec.path.read_bytes()
            digest = hashlib.sha256(data)
            fp.update(digest.digest())
            image_ids.append(digest.hexdigest()[:IMAGE_ID_HEX])
            fp.update(rec.boxes.round(2).tobytes() + rec.class_ids.tobytes())
            sel = np.array([c in keep_ids for c in rec.class_ids], bool)
            pos = rec.boxes[sel]
            sides.append(geometry.relative_sides(pos, rec.width, rec.height))
            sides_px.append(geometry.relative_sides(pos, 1, 1))
            bg = sampling.sample_background_boxes(rec.width, rec.height, rec.boxes, per_image_bg, rng,
                                                  padding_ratio=policy.padding_ratio) if per_image_bg else np.zeros((0, 4))
            if per_image_bg and not len(bg) and len(rec.boxes):
                # The objects fill the image (a canopy, a wall): no box fits between them, so the
                # background is what a detector gets wrong there: boxes at their scale matching none.
                bg = sampling.sample_misaligned_boxes(rec.width, rec.height, rec.boxes, per_image_bg, rng)
            if per_image_bg and len(rec.boxes):
                bg = np.concatenate([bg, sampling.sample_thing_boxes(decode_image(data, rec.path.name).pixels, rec.boxes,
                                                                     THINGS_PER_IMAGE, rng, padding_ratio=policy.padding_ratio)])
            # The boxes are drawn here, in order (the rng's); the EmbedCrops calls run IN_FLIGHT at a
            # time, so this side decodes and samples the next images while the embedder encodes.
            pending.append((gi, len(pos), pool.submit(embeds.embed, data, np.concatenate([pos, bg]), policy, m)))
            y_parts.append(np.array([keep_ids[c] for c in rec.class_ids[sel]], np.int64))
            g_parts.append(np.full(len(pos), gi))
            bg_groups.append(np.full(len(bg), gi))
            while len(pending) > IN_FLIGHT or (pending and gi == len(ds.images) - 1):
                done_i, n_pos_i, fut = pending.popleft()
                vecs = fut.result()
                X_parts.append(vecs[:n_pos_i])
                bg_parts.append(vecs[n_pos_i:])
                ctx.progress(done_i + 1, len(ds.images), "images")
    finally:
        pool.shutdown(cancel_futures=True)
    X = np.concatenate(X_parts) if X_parts else np.zeros((0, m.dim), np.float32)
    y = np.concatenate(y_parts)
    group = np.concatenate(g_parts)
    counts = np.bincount(y, minlength=len(wanted))
    for c, n in zip(wanted, counts):
        if n == 0:
            raise InvalidArgument(f"class {c!r} has no labelled boxes in the dataset")
    ctx.log(f"{len(X)} labelled crops in {len(ds.images)} images: {embeds.hits - hits_before} images from the "
            f"embedding cache, {embeds.calls - calls_before} EmbedCrops calls")

    classes = list(wanted)
    Xb = np.concatenate(bg_parts) if bg_parts else np.zeros((0, m.dim), np.float32)
    gb = np.concatenate(bg_groups) if bg_groups else np.zeros(0, int)
    if background_classes > 0:
        cap = max(1, int(2 * n_pos / 3))
        if len(Xb) > cap:  # about 2/3 of the positives, so background never dominates
            pick = np.sort(rng.choice(len(Xb), cap, replace=False))
            Xb, gb = Xb[pick], gb[pick]
        if negatives:
            # Hard negatives: the boxes a miner exported (false positives in their images),
            # each a background example embedded as the miner embeds it; an image without
            # label lines counts whole. They join training only (group -1 is never held out)
            # and are not capped.
            neg, n_images = [], 0
            for nds in negatives:
                for rec in nds.images:
                    ctx.check_cancelled()
                    boxes = rec.boxes if len(rec.boxes) else np.array([[0, 0, rec.width, rec.height]], float)
                    neg.append(embeds.embed(rec.path.read_bytes(), boxes, policy, m))
                    n_images += 1
            if neg:
                neg = np.concatenate(neg)
                Xb = np.concatenate([Xb, neg])
                gb = np.concatenate([gb, np.full(len(neg), -1)])
                ctx.log(f"{len(neg)} hard-negative boxes from {n_images} images added as background")
        k = min(background_classes, len(Xb))
        if k < background_classes:
            notes.append(f"only {len(Xb)} background crops: {k} background classes instead of {background_classes}")
        if k > 0:
            from sklearn.cluster import KMeans

            ctx.log(f"clustering {len(Xb)} background crops into {k} classes")
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(Xb) if k > 1 else np.zeros(len(Xb), int)
            classes += [f"{BG_PREFIX}{j}" for j in range(k)]
            X = np.concatenate([X, Xb])
            y = np.concatenate([y, len(wanted) + labels])
            group = np.concatenate([group, gb])
    else:
        notes.append("no background classes (background_classes = 0): background checks are off for this head")

    ctx.phase("splitting")
    if ds.has_splits:
        hold_img = np.array([r.split == "val" for r in ds.images])
        notes.append("using the dataset's own train/val split")
    else:
        img_classes = [set() for _ in ds.images]
        for yi, gi in zip(y, group):
            if yi < len(wanted) and gi >= 0:
                img_classes[gi].add(int(yi))
        _, hold_idx, split_notes = sampling.group_split(img_classes, holdout_fraction, rng, classes)
        notes += split_notes
        hold_img = np.zeros(len(ds.images), bool)
        hold_img[hold_idx] = True
    hold = np.where(group >= 0, hold_img[np.maximum(group, 0)], False)
    for n in notes:
        ctx.warn(n)
    ctx.log(f"split by image: {int((~hold_img).sum())} training images ({int((~hold).sum())} crops), "
            f"{int(hold_img.sum())} held-out images ({int(hold.sum())} crops)")
    px = np.concatenate(sides_px)
    return Prepared(X, y, group, classes, ~hold, hold, m, policy, ds, fp.hexdigest(), notes, seed, holdout_fraction,
                    geometry.side_summary(np.concatenate(sides)),
                    [round(float(v), 1) for v in np.quantile(px, [0, 0.5, 1])] if len(px) else [],
                    hold_img, keep_ids, image_ids)


def fit_variant(p: Prepared, v: Variant, ctx: JobContext, quiet: bool = False) -> tuple[object, dict]:
    """Fit one head on the training images, calibrate and measure it on the held-out ones.
    quiet: no metrics events (a cross-fitting fold's fit, head_svc.cross_fit)."""
    v.validate()
    C = len(p.classes)
    Xt, yt = p.X[p.train], p.y[p.train]
    Xh, yh = p.X[p.hold], p.y[p.hold]
    targets = None
    if v.teacher_temperature > 0:
        teacher = LogRegHead(C=v.logreg_c, seed=p.seed).fit(Xt, yt, C)
        targets = teacher_targets(teacher.logits(Xt), v.teacher_temperature)
        ctx.log(f"[{v.label}] soft targets from a logreg teacher at temperature {v.teacher_temperature:g}")
    if v.label_smoothing > 0:
        smooth = smooth_targets(yt, C, v.label_smoothing)
        targets = smooth if targets is None else (1 - v.label_smoothing) * targets + v.label_smoothing * smooth
    ctx.check_cancelled()
    if v.head_type == "logreg":
        head = LogRegHead(C=v.logreg_c, seed=p.seed).fit(Xt, yt, C, targets=targets)
    else:
        # Early stopping watches a slice of the *training* images: the held-out images stay
        # untouched until calibration and the final metrics.
        rng = np.random.default_rng(p.seed + 1)
        imgs = np.unique(p.group[p.train])
        imgs = imgs[imgs >= 0]  # hard negatives (group -1) stay in the fitting part
        val_imgs = rng.choice(imgs, max(1, int(0.15 * len(imgs))), replace=False) if len(imgs) >= 4 else np.array([], int)
        is_val = np.isin(p.group[p.train], val_imgs)
        fit_t = targets[~is_val] if targets is not None else None

        def on_epoch(epoch, train_loss, val_loss, held_out_loss):
            ctx.check_cancelled()
            if quiet:
                return
            m = {"variant": v.label, "epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5)}
            if np.isfinite(held_out_loss):
                m["held_out_loss"] = round(held_out_loss, 5)
            ctx.metrics(m)

        head = MLPHead(hidden_sizes=v.hidden_sizes, dropout=v.dropout, weight_decay=v.weight_decay,
                       max_epochs=v.max_epochs, margin_loss=v.margin_loss, seed=p.seed).fit(
            Xt[~is_val], yt[~is_val], C, targets=fit_t, X_val=Xt[is_val], y_val=yt[is_val], on_epoch=on_epoch,
            X_monitor=Xh, y_monitor=yh)
        if not quiet:
            ctx.log(f"[{v.label}] {head.epochs_run_} epochs (early stopping on {int(is_val.sum())} crops of training images)")
    head.temperature_ = fit_temperature(head.logits(Xh), yh) if len(yh) else 1.0
    report = classification_report(yh, head.predict_proba(Xh).argmax(1), p.classes) if len(yh) else {}
    if len(yh):
        held_loss = float(-np.log(np.clip(head.predict_proba(Xh)[np.arange(len(yh)), yh], 1e-12, None)).mean())
        report["log_loss"] = round(held_loss, 5)
    report["calibration_temperature"] = round(head.temperature_, 5)
    if quiet:
        return head, report
    ctx.metrics({"variant": v.label, "held_out_accuracy": report.get("accuracy", 0.0),
                 "held_out_macro_f1": report.get("macro_f1", 0.0)})
    return head, report


def build_bundle(p: Prepared, v: Variant, head, report: dict, display_name: str, dataset_label: str,
                 locator=None, cross: CrossFit | None = None) -> HeadBundle:
    """locator: a head_svc.locator_training.TrainedLocator to ship beside the head, or None;
    cross: the cross-fitted fold models (head_svc.cross_fit), or None."""
    onnx_bytes = export_head(head)
    check = p.X[p.hold] if p.hold.any() else p.X[:256]
    err = parity(head, onnx_bytes, check)
    fold_files = {}
    for k, fold_head in enumerate(cross.heads if cross is not None else []):
        head_name, loc_name = fold_names(k)
        fold_files[head_name] = export_head(fold_head)
        err = max(err, parity(fold_head, fold_files[head_name], check))
        if locator is not None:
            fold_files[loc_name] = cross.locators[k]
    if err > PARITY_LIMIT:
        raise FailedPrecondition(f"exported head differs from the trained one by {err:.3g} (> {PARITY_LIMIT}); not saved")
    bg = p.background_indices
    pre = p.model.preprocessing
    meta = {
        "schema_version": META_SCHEMA_VERSION,
        "head_type": v.head_type,
        "classes": p.classes,
        "background_indices": bg,
        "embedder": {"model_id": p.model.id, "weights_sha256": p.model.weights_sha256, "dim": int(p.model.dim),
                     "preprocessing": {"input_size": pre.input_size, "mean": list(pre.mean), "std": list(pre.std),
                                       "resize": pre.resize},
                     "crop_policy": p.policy.to_dict()},
        "soft_targets": {"label_smoothing": v.label_smoothing, "teacher_temperature": v.teacher_temperature,
                         "margin_loss": v.margin_loss},
        "hyperparameters": {**head.params(), "seed": p.seed, "holdout_fraction": p.holdout_fraction,
                            "background_classes": len(bg)},
        "calibration_temperature": round(float(head.temperature_), 6),
        "default_thresholds": {"min_prob": 0.5, "margin": 0.0, "background_margin": 0.0, "background_guard": bool(bg)},
        "metrics": {k: report[k] for k in ("accuracy", "macro_f1", "log_loss", "samples", "per_class", "most_confused",
                                           "confusion_matrix") if k in report},
        "dataset": {"source": dataset_label, "fingerprint": p.fingerprint, "images": len(p.dataset.images),
                    "labels": p.dataset.label_count, "dropped_lines": len(p.dataset.dropped),
                    "held_out_images": int(len(np.unique(p.group[p.hold]))), "held_out_crops": int(p.hold.sum()),
                    # what the head-guided detector's anchors are sized by (minisam_guided.anchors)
                    "object_sides": p.object_sides,  # every class has a box: prepare() checked
                    # what large images are tiled by when drafting (miner tiling)
                    **({"object_px": p.object_px} if p.object_px else {}),
                    # which images the head (and its locator) were fitted on: mining tells whether
                    # its report images are new to them (miner_svc.mining.job)
                    **({"image_sha256": fitted} if 0 < len(fitted := p.fitted_images(locator is not None))
                       <= MAX_IMAGE_IDS else {})},
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "parity_max_abs_err": err,
        "created_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
    }
    if locator is not None:
        meta["locator"] = locator.meta
    if cross is not None:
        meta["cross_fit"] = cross_fit.meta_section(cross, p.image_ids, {n: hashlib.sha256(b).hexdigest()
                                                                       for n, b in fold_files.items()})
    if display_name:
        meta["display_name"] = display_name
    meta["head_id"] = content_id(onnx_bytes, meta, locator.onnx_bytes if locator is not None else b"")
    full_report = {"held_out": report, "dropped_lines": p.dataset.dropped, "notes": p.notes,
                   "class_counts": {c: int((p.y == i).sum()) for i, c in enumerate(p.classes)},
                   # epoch, train loss, early-stopping loss, held-out loss (null when there is none)
                   "history": [[x if not isinstance(x, float) or np.isfinite(x) else None for x in h]
                               for h in getattr(head, "history_", [])]}
    files = {"head.onnx": onnx_bytes, "meta.json": meta_json(meta),
             "report.json": json.dumps(full_report, sort_keys=True).encode()}
    if locator is not None:
        full_report["locator"] = locator.report
        files["report.json"] = json.dumps(full_report, sort_keys=True).encode()
        files["locator.onnx"] = locator.onnx_bytes
    return HeadBundle.from_files({**files, **fold_files})
