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
  hyperparameters  LocatorParams, metrics (held-out figures), parity_max_abs_err, training
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from minehead.core.errors import InvalidArgument

from minehead.locator.decode import LocatorDetections, decode
from minehead.locator.export import INPUT, OUTPUTS
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
    def session(self):
        with self._lock:
            if self._session is None:
                from minehead.encoders.onnx_backend import small_graph_session as onnx_session

                self._session = onnx_session(self.onnx_bytes)
            return self._session

    def check_graph(self) -> None:
        """The graph loads, takes N x in_channels x R x C and gives the three outputs in range:
        InvalidArgument otherwise (an upload's problem, named)."""
        import onnx

        if hashlib.sha256(self.onnx_bytes).hexdigest() != self.meta["onnx_sha256"]:
            raise InvalidArgument("locator.onnx does not match meta.json locator.onnx_sha256 (altered or mismatched files)")
        try:
            onnx.checker.check_model(onnx.load_from_string(self.onnx_bytes))
            sess = self.session
        except Exception as e:  # noqa: BLE001 - any loader error is the uploader's problem
            raise InvalidArgument(f"locator.onnx does not load: {type(e).__name__}: {str(e)[:300]}") from None
        ins, outs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
        if len(ins) != 1 or ins[0].name != INPUT or sorted(outs) != sorted(OUTPUTS):
            raise InvalidArgument(f"locator.onnx must take one input {INPUT!r} and give {list(OUTPUTS)}; "
                                  f"has {[i.name for i in ins]} -> {outs}")
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

    def detect(self, fmap: np.ndarray, frame: FeatureFrame, floor: float) -> LocatorDetections:
        return decode(*self.run(fmap), frame, floor)

    def frame_for(self, width: int, height: int, rows: int, cols: int) -> FeatureFrame:
        return FeatureFrame.for_image(width, height, int(self.meta["input_size"]), self.meta["resize"], rows, cols)
