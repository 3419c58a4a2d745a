"""Head bundles: head.onnx + meta.json (+ report.json). No pickles anywhere.

A bundle is what the registry stores, what users download and upload, what a recipe bundle
embeds, and what any process scores with onnxruntime alone:

    b = HeadBundle.load(folder)          # or HeadBundle.from_files({...}) for uploads
    probs = b.predict_proba(X)           # X: N x D embeddings from b.embedder_model

The head id is the content address: sha256 over head.onnx and meta.json with its own
`head_id` and `display_name` left out (the display name is a label that may change; the id
never does). The same bundle uploaded twice has the same id.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import numpy as np

from minehead.core.errors import InvalidArgument
from minehead.core.safezip import make_zip, safe_members

from minehead.crops import CropPolicy
from minehead.heads.keep_rule import Thresholds

META_SCHEMA_VERSION = 1
BG_PREFIX = "__bg_"
# meta.json dataset.image_sha256: the training images' sha256, this many hex digits each (64 bits:
# no collision in any labelled set), sorted; recorded up to MAX_IMAGE_IDS images (about 1 MB).
IMAGE_ID_HEX = 16
MAX_IMAGE_IDS = 50_000
_IMAGE_ID = re.compile(f"[0-9a-f]{{{IMAGE_ID_HEX}}}")
# Cross-fitting (meta.json "cross_fit"): the head and locator fitted K times, each time without
# one fold of the labelled images, so mining scores every labelled image with models that never
# saw it (HeadBundle.fold_for). Up to MAX_FOLDS folds, as head.fold{k}.onnx and locator.fold{k}.onnx.
MAX_FOLDS = 5
FOLD_MEMBERS = {f"{part}.fold{k}.onnx" for part in ("head", "locator") for k in range(MAX_FOLDS)}
MEMBERS = {"head.onnx", "meta.json", "report.json", "locator.onnx"} | FOLD_MEMBERS  # all but the first two optional
MAX_ONNX_BYTES = 64 << 20
MAX_JSON_BYTES = 4 << 20
MAX_FOLD_BYTES = 2 * MAX_ONNX_BYTES  # all fold graphs together
MAX_ZIP_BYTES = 2 * MAX_ONNX_BYTES + 2 * MAX_JSON_BYTES + MAX_FOLD_BYTES  # head, locator, meta, report, folds

# key -> (type or tuple of types, required)
_META_FIELDS = {
    "schema_version": (int, True),
    "head_type": (str, True),
    "classes": (list, True),
    "background_indices": (list, True),
    "embedder": (dict, True),
    "soft_targets": (dict, True),
    "hyperparameters": (dict, True),
    "calibration_temperature": ((int, float), True),
    "default_thresholds": (dict, True),
    "onnx_sha256": (str, True),
    "parity_max_abs_err": ((int, float), True),
    "created_time": (str, True),
    "metrics": (dict, False),
    "dataset": (dict, False),
    "locator": (dict, False),  # minehead.locator.model: present exactly when locator.onnx is
    "cross_fit": (dict, False),  # present exactly when head.fold{k}.onnx are (validate_cross_fit)
    "display_name": (str, False),
    "head_id": (str, False),
}


def content_id(onnx_bytes: bytes, meta: dict, locator_bytes: bytes = b"") -> str:
    """The head id: head.onnx, meta.json (less its id and display name) and locator.onnx when
    there is one (a head without a locator keeps the id it had before locators existed)."""
    body = {k: v for k, v in meta.items() if k not in ("head_id", "display_name")}
    h = hashlib.sha256(onnx_bytes)
    if locator_bytes:
        h.update(hashlib.sha256(locator_bytes).digest())
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def fold_names(k: int) -> tuple[str, str]:
    """(head, locator) member names of fold k."""
    return f"head.fold{k}.onnx", f"locator.fold{k}.onnx"


def validate_cross_fit(meta: dict, files: dict[str, bytes]) -> None:
    """meta.json "cross_fit" against the fold files: {"folds": K, "image_fold": {image id: fold},
    "onnx_sha256": {member: sha256}, "note": str}; each fold has its head graph, and its locator
    graph exactly when the bundle has a locator. InvalidArgument naming the first problem."""
    present = sorted(n for n in files if n in FOLD_MEMBERS)
    cf = meta.get("cross_fit")
    if cf is None:
        if present:
            raise InvalidArgument(f"{present[0]} needs meta.json's cross_fit section")
        return
    k = cf.get("folds")
    if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= MAX_FOLDS:
        raise InvalidArgument(f"meta.json cross_fit.folds must be an integer in 2..{MAX_FOLDS}")
    folds = cf.get("image_fold")
    if not (isinstance(folds, dict) and 0 < len(folds) <= MAX_IMAGE_IDS and all(
            isinstance(h, str) and _IMAGE_ID.fullmatch(h) and isinstance(f, int) and not isinstance(f, bool) and 0 <= f < k
            for h, f in folds.items())):
        raise InvalidArgument(f"meta.json cross_fit.image_fold must map training images' sha256 ({IMAGE_ID_HEX} hex "
                              f"digits) to a fold in 0..{k - 1}")
    want = {n for j in range(k) for n in fold_names(j)[: 2 if "locator" in meta else 1]}
    if set(present) != want:
        missing, extra = sorted(want - set(present)), sorted(set(present) - want)
        raise InvalidArgument("the bundle's fold graphs do not match meta.json cross_fit: "
                              + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"))
    sums = cf.get("onnx_sha256")
    if not isinstance(sums, dict) or set(sums) != want:
        raise InvalidArgument("meta.json cross_fit.onnx_sha256 must give the sha256 of every fold graph")
    for n in sorted(want):
        if hashlib.sha256(files[n]).hexdigest() != sums[n]:
            raise InvalidArgument(f"{n} does not match meta.json cross_fit.onnx_sha256 (altered or mismatched files)")
    if sum(len(files[n]) for n in want) > MAX_FOLD_BYTES:
        raise InvalidArgument(f"the fold graphs are over {MAX_FOLD_BYTES} bytes together")


def meta_json(meta: dict) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def validate_meta(meta) -> None:
    """InvalidArgument naming the first problem with a meta.json dict."""
    if not isinstance(meta, dict):
        raise InvalidArgument("meta.json must be a JSON object")
    for key, (typ, required) in _META_FIELDS.items():
        if key not in meta:
            if required:
                raise InvalidArgument(f"meta.json lacks the required field {key!r}")
            continue
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool) and typ is not bool:
            raise InvalidArgument(f"meta.json field {key!r} has the wrong type ({type(meta[key]).__name__})")
    unknown = set(meta) - set(_META_FIELDS)
    if unknown:
        raise InvalidArgument(f"meta.json has unknown fields: {', '.join(sorted(unknown))}")
    if meta["schema_version"] != META_SCHEMA_VERSION:
        raise InvalidArgument(f"meta.json schema_version {meta['schema_version']} is not supported (expected {META_SCHEMA_VERSION})")
    if meta["head_type"] not in ("logreg", "mlp"):
        raise InvalidArgument(f"meta.json head_type must be 'logreg' or 'mlp', got {meta['head_type']!r}")
    classes = meta["classes"]
    if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise InvalidArgument("meta.json classes must be unique, non-empty strings")
    bg = [i for i, c in enumerate(classes) if c.startswith(BG_PREFIX)]
    if sorted(meta["background_indices"]) != bg:
        raise InvalidArgument(f"meta.json background_indices {meta['background_indices']} do not match the __bg_* classes at {bg}")
    if bg and bg != list(range(len(classes) - len(bg), len(classes))):
        raise InvalidArgument("meta.json: background classes must come last")
    if len(classes) - len(bg) < 1:
        raise InvalidArgument("meta.json: a head needs at least one real class")
    emb = meta["embedder"]
    if not isinstance(emb.get("model_id"), str) or not isinstance(emb.get("dim"), int) or emb["dim"] <= 0:
        raise InvalidArgument("meta.json embedder needs model_id (string) and dim (positive integer)")
    if not isinstance(emb.get("crop_policy", {}), dict):
        raise InvalidArgument("meta.json embedder.crop_policy must be an object")
    if not meta["calibration_temperature"] > 0:
        raise InvalidArgument("meta.json calibration_temperature must be > 0")
    th = meta["default_thresholds"]
    for k in ("min_prob", "margin", "background_margin"):
        if not isinstance(th.get(k), (int, float)) or isinstance(th.get(k), bool):
            raise InvalidArgument(f"meta.json default_thresholds.{k} must be a number")
    sides = meta.get("dataset", {}).get("object_sides")
    if sides is not None and not (isinstance(sides, list) and len(sides) == 3
                                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in sides)
                                  and sides[0] <= sides[1] <= sides[2]):
        raise InvalidArgument("meta.json dataset.object_sides must be [min, median, max] shares of the image's longest side")
    px = meta.get("dataset", {}).get("object_px")
    if px is not None and not (isinstance(px, list) and len(px) == 3
                               and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1e5 for x in px)
                               and px[0] <= px[1] <= px[2]):
        raise InvalidArgument("meta.json dataset.object_px must be [min, median, max] longest sides in pixels")
    ids = meta.get("dataset", {}).get("image_sha256")
    if ids is not None and not (isinstance(ids, list) and len(ids) <= MAX_IMAGE_IDS
                                and all(isinstance(x, str) and _IMAGE_ID.fullmatch(x) for x in ids)):
        raise InvalidArgument(f"meta.json dataset.image_sha256 must list at most {MAX_IMAGE_IDS} training images' "
                              f"sha256, {IMAGE_ID_HEX} lower-case hex digits each")
    if "locator" in meta:
        from minehead.locator.model import validate_locator_meta

        validate_locator_meta(meta["locator"], classes)
        if meta["locator"]["embedder_model"] != emb["model_id"]:
            raise InvalidArgument(f"meta.json locator.embedder_model {meta['locator']['embedder_model']!r} is not the "
                                  f"head's embedder {emb['model_id']!r}")


class HeadBundle:
    """A validated head: its files, meta, and a lazily created onnxruntime session."""

    def __init__(self, onnx_bytes: bytes, meta: dict, report: dict | None, folder: Path | None = None,
                 locator_bytes: bytes = b"", folds: dict[str, bytes] | None = None) -> None:
        self.onnx_bytes = onnx_bytes
        self.locator_bytes = locator_bytes
        self.fold_files = dict(folds or {})
        self._folds: dict[int, "HeadBundle"] = {}
        self._locator = None
        self.meta = meta
        self.report = report
        self.folder = folder
        self._session = None
        self._lock = threading.Lock()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> "HeadBundle":
        """Validate bundle files ({'head.onnx': …, 'meta.json': …}) completely."""
        missing = {"head.onnx", "meta.json"} - set(files)
        if missing:
            raise InvalidArgument(f"head bundle lacks {', '.join(sorted(missing))}")
        extra = set(files) - MEMBERS
        if extra:
            raise InvalidArgument(f"head bundle has unexpected files: {', '.join(sorted(extra))}")
        if len(files["head.onnx"]) > MAX_ONNX_BYTES:
            raise InvalidArgument(f"head.onnx is {len(files['head.onnx'])} bytes; the limit is {MAX_ONNX_BYTES}")
        if len(files.get("locator.onnx", b"")) > MAX_ONNX_BYTES:
            raise InvalidArgument(f"locator.onnx is {len(files['locator.onnx'])} bytes; the limit is {MAX_ONNX_BYTES}")
        for name in ("meta.json", "report.json"):
            if name in files and len(files[name]) > MAX_JSON_BYTES:
                raise InvalidArgument(f"{name} is {len(files[name])} bytes; the limit is {MAX_JSON_BYTES}")
        try:
            meta = json.loads(files["meta.json"])
        except ValueError as e:
            raise InvalidArgument(f"meta.json is not valid JSON: {e}") from None
        validate_meta(meta)
        report = None
        if "report.json" in files:
            try:
                report = json.loads(files["report.json"])
            except ValueError as e:
                raise InvalidArgument(f"report.json is not valid JSON: {e}") from None
        onnx_bytes = files["head.onnx"]
        if hashlib.sha256(onnx_bytes).hexdigest() != meta["onnx_sha256"]:
            raise InvalidArgument("head.onnx does not match meta.json onnx_sha256 (altered or mismatched files)")
        locator_bytes = files.get("locator.onnx", b"")
        if bool(locator_bytes) != ("locator" in meta):
            raise InvalidArgument("a head bundle has locator.onnx exactly when meta.json has a locator section; "
                                  + ("meta.json has no locator section" if locator_bytes else "locator.onnx is missing"))
        validate_cross_fit(meta, files)  # the fold graphs' digests are in meta, so in the content id
        want = content_id(onnx_bytes, meta, locator_bytes)
        if meta.get("head_id") and meta["head_id"] != want:
            raise InvalidArgument(f"meta.json head_id {meta['head_id']} does not match the bundle's content id {want}")
        meta["head_id"] = want
        b = cls(onnx_bytes, meta, report, locator_bytes=locator_bytes,
                folds={n: files[n] for n in files if n in FOLD_MEMBERS})
        for part in [b] + [b.fold(k) for k in range(b.folds)]:
            what = "" if part is b else f" (fold {part.meta['cross_fit_fold']})"
            try:
                part._check_graph()
                if part.locator is not None:
                    part.locator.check_graph()
            except InvalidArgument as e:
                raise InvalidArgument(f"{e}{what}") from None
        return b

    @classmethod
    def from_zip(cls, data: bytes) -> "HeadBundle":
        return cls.from_files(safe_members(data, max_member_bytes=MAX_ONNX_BYTES, max_total_bytes=MAX_ZIP_BYTES,
                                           max_members=len(MEMBERS), allowed=MEMBERS))

    @classmethod
    def load(cls, folder: Path) -> "HeadBundle":
        files = {n: (folder / n).read_bytes() for n in MEMBERS if (folder / n).is_file()}
        b = cls.from_files(files)
        b.folder = folder
        return b

    def _check_graph(self) -> None:
        """The graph loads, takes N x dim and gives N x len(classes) rows that sum to 1."""
        import onnx

        try:
            model = onnx.load_from_string(self.onnx_bytes)
            onnx.checker.check_model(model)
            sess = self.session
        except Exception as e:  # noqa: BLE001 - any loader error is the uploader's problem
            raise InvalidArgument(f"head.onnx does not load: {type(e).__name__}: {str(e)[:300]}") from None
        ins, outs = sess.get_inputs(), sess.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise InvalidArgument(f"head.onnx must have one input and one output, has {len(ins)} and {len(outs)}")
        dim = self.dim
        if ins[0].shape[-1] != dim:
            raise InvalidArgument(f"head.onnx input width {ins[0].shape[-1]} does not match embedder dim {dim}")
        try:
            p = sess.run(None, {ins[0].name: np.zeros((2, dim), np.float32) + 0.01})[0]
        except Exception as e:  # noqa: BLE001
            raise InvalidArgument(f"head.onnx fails on a {dim}-wide input: {str(e)[:300]}") from None
        if p.shape != (2, len(self.classes)):
            raise InvalidArgument(f"head.onnx outputs shape {list(p.shape)}, expected [N, {len(self.classes)}] for the classes in meta.json")
        if not np.allclose(p.sum(1), 1.0, atol=1e-3):
            raise InvalidArgument("head.onnx outputs do not sum to 1: it must end in a softmax")

    # -- properties ------------------------------------------------------------------------
    @property
    def head_id(self) -> str:
        return self.meta["head_id"]

    @property
    def display_name(self) -> str:
        return self.meta.get("display_name", "")

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def background_indices(self) -> list[int]:
        return list(self.meta["background_indices"])

    @property
    def real_classes(self) -> list[str]:
        return [c for c in self.classes if not c.startswith(BG_PREFIX)]

    @property
    def dim(self) -> int:
        return int(self.meta["embedder"]["dim"])

    @property
    def embedder_model(self) -> str:
        return self.meta["embedder"]["model_id"]

    @property
    def crop_policy(self) -> CropPolicy:
        return CropPolicy(**self.meta["embedder"].get("crop_policy", {}))

    @property
    def object_sides(self) -> list[float] | None:
        """[min, median, max] of the labelled objects' longest sides, as a share of their image's
        longest side (None for heads trained before it was recorded, or uploaded without it)."""
        return self.meta.get("dataset", {}).get("object_sides")

    @property
    def object_px(self) -> list[float] | None:
        """[min, median, max] of the labelled objects' longest sides in pixels (None when not
        recorded): what large images are tiled by (the objects' scale in the user's images)."""
        return self.meta.get("dataset", {}).get("object_px")

    @property
    def training_images(self) -> frozenset[str] | None:
        """The sha256 (first IMAGE_ID_HEX hex digits) of the images the head and its locator
        were fitted on; None when not recorded (older heads, uploads without it, huge sets)."""
        ids = self.meta.get("dataset", {}).get("image_sha256")
        return frozenset(ids) if ids is not None else None

    @property
    def folds(self) -> int:
        """K when the bundle carries cross-fitted models (meta.json cross_fit), else 0."""
        return int(self.meta.get("cross_fit", {}).get("folds", 0))

    def fold(self, k: int) -> "HeadBundle":
        """Fold k's head (and locator): fitted on every labelled image except fold k's. A bundle
        of its own to score with (same classes and policy; head_id "{head_id}.fold{k}", so no
        cache mixes its outputs with the shipped head's); not a registry entry."""
        with self._lock:
            if k not in self._folds:
                head, loc = fold_names(k)
                meta = {key: v for key, v in self.meta.items() if key != "cross_fit"}
                meta["head_id"], meta["cross_fit_fold"] = f"{self.head_id}.fold{k}", k
                meta["onnx_sha256"] = hashlib.sha256(self.fold_files[head]).hexdigest()
                loc_bytes = self.fold_files.get(loc, b"") if self.locator_bytes else b""
                if loc_bytes:
                    meta["locator"] = {**meta["locator"], "onnx_sha256": hashlib.sha256(loc_bytes).hexdigest()}
                self._folds[k] = HeadBundle(self.fold_files[head], meta, None, locator_bytes=loc_bytes)
            return self._folds[k]

    def fold_for(self, image_sha256: str) -> "HeadBundle":
        """The bundle to score this image with when a score must not come from models fitted on
        it (mining's tune and report figures): its fold's, for a labelled image of a
        cross-fitted head; the shipped head itself for any other image."""
        k = self.meta.get("cross_fit", {}).get("image_fold", {}).get(image_sha256[:IMAGE_ID_HEX])
        return self if k is None else self.fold(k)

    @property
    def locator(self):
        """The head's minehead.locator.model.Locator, or None for a head without one."""
        if not self.locator_bytes:
            return None
        with self._lock:
            if self._locator is None:
                from minehead.locator.model import Locator

                self._locator = Locator(self.locator_bytes, self.meta["locator"])
            return self._locator

    @property
    def default_thresholds(self) -> Thresholds:
        t = self.meta["default_thresholds"]
        return Thresholds(min_prob=float(t["min_prob"]), margin=float(t["margin"]),
                          background_guard=bool(t.get("background_guard", True)),
                          background_margin=float(t["background_margin"]))

    @property
    def session(self):
        with self._lock:
            if self._session is None:
                from minehead.heads.onnx_export import onnx_session

                self._session = onnx_session(self.onnx_bytes)
            return self._session

    # -- use -------------------------------------------------------------------------------
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """X: N x dim embeddings -> N x C probabilities (float32), in `classes` order."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise InvalidArgument(f"embeddings must be N x {self.dim} for head {self.head_id}, got {list(X.shape)}")
        if len(X) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.session.run(None, {self.session.get_inputs()[0].name: X})[0]

    def files(self) -> dict[str, bytes]:
        out = {"head.onnx": self.onnx_bytes, "meta.json": meta_json(self.meta), **self.fold_files}
        if self.locator_bytes:
            out["locator.onnx"] = self.locator_bytes
        if self.report is not None:
            out["report.json"] = (json.dumps(self.report, indent=2, sort_keys=True) + "\n").encode()
        return out

    def to_zip(self) -> bytes:
        return make_zip(self.files())


def bundle_from_head(head, classes: list[str], model_id: str, *, crop_policy: dict | None = None,
                     weights_sha256: str = "", created_time: str = "2026-01-01T00:00:00+00:00", **meta_extra) -> HeadBundle:
    """A minimal valid bundle for a fitted head (LogRegHead / MLPHead with temperature_).
    Training adds metrics, dataset and soft-target details; benchmarks and tests need only this."""
    from minehead.heads.onnx_export import export_head

    onnx_bytes = export_head(head)
    meta = {"schema_version": META_SCHEMA_VERSION, "head_type": head.head_type, "classes": list(classes),
            "background_indices": [i for i, c in enumerate(classes) if c.startswith(BG_PREFIX)],
            "embedder": {"model_id": model_id, "weights_sha256": weights_sha256, "dim": int(len(head.mean_)),
                         "crop_policy": crop_policy or {}},
            "soft_targets": {"label_smoothing": 0.0, "teacher_temperature": 0.0, "margin_loss": 0.0},
            "hyperparameters": head.params(), "calibration_temperature": float(getattr(head, "temperature_", 1.0)),
            "default_thresholds": {"min_prob": 0.5, "margin": 0.0, "background_margin": 0.0},
            "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(), "parity_max_abs_err": 0.0,
            "created_time": created_time, **meta_extra}
    return HeadBundle.from_files({"head.onnx": onnx_bytes, "meta.json": meta_json(meta)})
