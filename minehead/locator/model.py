"""The locator at run time: its ONNX graph and meta.json description, onnxruntime only.

    loc = Locator(onnx_bytes, meta["locator"])
    heat, size, offset = loc.run(fmap)                 # fmap: C x R x Cols float32 (one image)
    d = loc.detect(fmap, frame, floor=0.05)            # LocatorDetections, XYXY image pixels

The meta.json `locator` section (validated by `validate_meta`):
  onnx_sha256      sha256 of locator.onnx
  classes          the heatmap channels' classes, in order (the head's real classes)
  in_channels      C, the feature map's channels (the embedder model's map)
  embedder_model   the embedder model whose feature map it reads (the head's)
  resize           how that encoder fits an image into its input ("longest_side_pad" | "squash")
  input_size       the encoder's square input side S, pixels
  map_size         [rows, cols] of the map it was trained on (the graph takes any size)
  stride           input pixels per cell (S / cols)
  outputs          {"heat": "N x K x R x C probabilities", ...}: documentation of the graph
  peaks            optional {"separate": tol}: peaks beside peaks kept (minehead.locator.decode);
                   absent: 3 x 3 max-pool peaks only
  hyperparameters  LocatorParams, metrics (held-out figures), parity_max_abs_err, training
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from minehead.core.errors import InvalidArgument

from minehead.locator import refiner as loc_refiner
from minehead.locator.decode import LocatorDetections, decode
from minehead.locator.export import INPUT, OUTPUTS, REFINER_INPUT, REFINER_OUTPUTS, parts
from minehead.locator.frame import FeatureFrame

OUTPUT_DOCS = {
    "heat": "N x K x R x C float32: P(an object of class k is centred in cell (r, c))",
    "size": "N x 2 x R x C float32: log(width), log(height) of that object, in cells",
    "offset": "N x 2 x R x C float32: its centre inside the cell, (x, y) in [0, 1)",
}
PARITY_LIMIT = 1e-4


def validate_locator_meta(loc, head_classes: list[str]) -> None:
    """InvalidArgument naming the first problem with a meta.json `locator` section."""
    if not isinstance(loc, dict):
        raise InvalidArgument("meta.json locator must be an object")
    spec = {"onnx_sha256": str, "classes": list, "in_channels": int, "embedder_model": str, "resize": str,
            "input_size": int, "map_size": list, "stride": (int, float), "parity_max_abs_err": (int, float)}
    for k, typ in spec.items():
        if k not in loc:
            raise InvalidArgument(f"meta.json locator lacks the required field {k!r}")
        if not isinstance(loc[k], typ) or isinstance(loc[k], bool):
            raise InvalidArgument(f"meta.json locator.{k} has the wrong type ({type(loc[k]).__name__})")
    real = [c for c in head_classes if not c.startswith("__bg_")]
    if loc["classes"] != real:
        raise InvalidArgument(f"meta.json locator.classes {loc['classes']} must be the head's real classes {real}")
    if loc["resize"] not in ("longest_side_pad", "squash"):
        raise InvalidArgument(f"meta.json locator.resize must be longest_side_pad or squash, got {loc['resize']!r}")
    if not 0 < loc["in_channels"] <= 65536 or not 0 < loc["input_size"] <= 16384 or not loc["stride"] > 0:
        raise InvalidArgument("meta.json locator: in_channels, input_size and stride must be positive and sane")
    ms = loc["map_size"]
    if len(ms) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 4096 for x in ms):
        raise InvalidArgument("meta.json locator.map_size must be [rows, cols], positive integers")
    if "peaks" in loc:
        sep = loc["peaks"].get("separate") if isinstance(loc["peaks"], dict) else "missing"
        if sep is not None and not (type(sep) in (int, float) and 0 < sep <= 100):
            raise InvalidArgument("meta.json locator.peaks must be an object whose separate, if given, is a number in (0, 100]")
    if "refiner" in loc:
        r = loc["refiner"]
        if not isinstance(r, dict):
            raise InvalidArgument("meta.json locator.refiner must be an object")
        want = {"grid": loc_refiner.GRID, "context": loc_refiner.CONTEXT, "iterations": loc_refiner.ITERATIONS,
                "in_features": loc_refiner.GRID ** 2 * loc["in_channels"] + 2}
        for k, v in want.items():
            if r.get(k) != v:
                raise InvalidArgument(f"meta.json locator.refiner.{k} is {r.get(k)!r}; this version refines with {k} {v}")
        if not isinstance(r.get("classes"), list) or not r["classes"] or not set(r["classes"]) <= set(loc["classes"]):
            raise InvalidArgument("meta.json locator.refiner.classes must list some of the locator's classes")


class Locator:
    def __init__(self, onnx_bytes: bytes, meta: dict) -> None:
        self.onnx_bytes = onnx_bytes
        self.meta = meta
        self._session = None
        self._lock = threading.Lock()

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def in_channels(self) -> int:
        return int(self.meta["in_channels"])

    @property
    def has_refiner(self) -> bool:
        return "refiner" in self.meta

    def _sessions(self):
        """(locator part session, refiner part session or None), built on first use."""
        with self._lock:
            if self._session is None:
                from minehead.encoders.onnx_backend import small_graph_session as onnx_session

                loc, ref = parts(self.onnx_bytes)
                self._session = (onnx_session(loc), onnx_session(ref) if ref is not None else None)
            return self._session

    @property
    def session(self):
        return self._sessions()[0]

    def check_graph(self) -> None:
        """The graph loads, takes N x in_channels x R x C and gives the three outputs in range:
        InvalidArgument otherwise (an upload's problem, named)."""
        import onnx

        if hashlib.sha256(self.onnx_bytes).hexdigest() != self.meta["onnx_sha256"]:
            raise InvalidArgument("locator.onnx does not match meta.json locator.onnx_sha256 (altered or mismatched files)")
        try:
            model = onnx.load_from_string(self.onnx_bytes)
            onnx.checker.check_model(model)
            has_ref = REFINER_INPUT in {i.name for i in model.graph.input}
            if has_ref != self.has_refiner:
                raise InvalidArgument("locator.onnx has a box_features input exactly when meta.json locator has a "
                                      "refiner section" + ("" if has_ref else "; the graph has none"))
            sess, ref = self._sessions()
        except InvalidArgument:
            raise
        except Exception as e:  # noqa: BLE001 - any loader error is the uploader's problem
            raise InvalidArgument(f"locator.onnx does not load: {type(e).__name__}: {str(e)[:300]}") from None
        ins, outs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
        if len(ins) != 1 or ins[0].name != INPUT or sorted(outs) != sorted(OUTPUTS):
            raise InvalidArgument(f"locator.onnx must take one input {INPUT!r} and give {list(OUTPUTS)}; "
                                  f"has {[i.name for i in ins]} -> {outs}")
        if ref is not None:
            f = int(self.meta["refiner"]["in_features"])
            try:
                d, q = self.refiner_outputs(np.full((3, f), 0.01, np.float32))
            except Exception as e:  # noqa: BLE001
                raise InvalidArgument(f"locator.onnx's refiner fails on 3 x {f} box features: {str(e)[:300]}") from None
            if d.shape != (3, 4) or q.shape != (3,) or not (np.all(np.isfinite(d)) and np.all((q >= 0) & (q <= 1))):
                raise InvalidArgument(f"locator.onnx's refiner gives {list(d.shape)}, {list(q.shape)}; expected "
                                      "[M, 4] finite deltas and [M] probabilities")
        try:
            heat, size, offset = self.run(np.zeros((self.in_channels, 6, 6), np.float32) + 0.01)
        except Exception as e:  # noqa: BLE001
            raise InvalidArgument(f"locator.onnx fails on a {self.in_channels}-channel map: {str(e)[:300]}") from None
        k = len(self.classes)
        if heat.shape != (k, 6, 6) or size.shape != (2, 6, 6) or offset.shape != (2, 6, 6):
            raise InvalidArgument(f"locator.onnx outputs {list(heat.shape)}, {list(size.shape)}, {list(offset.shape)}; "
                                  f"expected [{k}, R, C], [2, R, C], [2, R, C] for {k} classes")
        if not (np.all((heat >= 0) & (heat <= 1)) and np.all(np.isfinite(size))):
            raise InvalidArgument("locator.onnx heat must be probabilities in [0, 1] and size finite")

    def run(self, fmap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fmap C x R x Cols -> (heat K x R x Cols, size 2 x R x Cols, offset 2 x R x Cols)."""
        fmap = np.asarray(fmap, np.float32)
        if fmap.ndim != 3 or fmap.shape[0] != self.in_channels:
            raise InvalidArgument(f"the locator takes a {self.in_channels} x R x C feature map, got {list(fmap.shape)}")
        out = self.session.run(list(OUTPUTS), {INPUT: fmap[None]})
        return tuple(o[0] for o in out)

    def refiner_outputs(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """box features M x F -> (deltas M x 4, quality M): the graph's refiner part."""
        d, q = self._sessions()[1].run(list(REFINER_OUTPUTS), {REFINER_INPUT: np.asarray(features, np.float32)})
        return d, q

    def detect(self, fmap: np.ndarray, frame: FeatureFrame, floor: float) -> LocatorDetections:
        """Peaks at or above `floor`; with a refiner their boxes moved and their scores peak x
        quality (then class-wise NMS at refiner.REFINED_NMS_IOU), best first."""
        d = decode(*self.run(fmap), frame, floor, separate=self.separate)
        classes = self.refined_classes
        if not classes or not len(d):
            return d
        return loc_refiner.refine_detections(d, loc_refiner.pooler(fmap, frame), frame, classes, self.refiner_outputs)

    @property
    def separate(self) -> float | None:
        """meta.json locator.peaks.separate: decode's tolerance for peaks beside peaks (heads
        trained before it carry none: max-pool peaks, as they were mined with)."""
        return (self.meta.get("peaks") or {}).get("separate")

    @property
    def refined_classes(self) -> list[int]:
        """Indices of the classes whose peaks the refiner moves and rescores (meta.json
        locator.refiner.classes: those whose held-out F1 it raised)."""
        if not self.has_refiner:
            return []
        names = self.meta["refiner"].get("classes", self.classes)
        return [k for k, c in enumerate(self.classes) if c in names]

    def frame_for(self, width: int, height: int, rows: int, cols: int) -> FeatureFrame:
        return FeatureFrame.for_image(width, height, int(self.meta["input_size"]), self.meta["resize"], rows, cols)
