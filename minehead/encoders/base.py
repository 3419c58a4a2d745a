"""The encoder interface every backend implements.

An encoder takes a batch of prepared images, NxSxSx3 uint8 RGB with S = preprocessing.input_size,
and returns NxD float32 features (the Embedder L2-normalises them). Normalisation by mean/std
happens inside the encoder, on its device, in a batched tensor. Text-capable encoders also
implement `encode_text`.

Region encoders (`crop_mode == "roi"`) run once per whole image and pool each box's region
from the feature map (`feature_maps` + minehead.roi), the way SAM's predictor sets an
image once and answers many prompts: an encoder whose input is fixed at 1024x1024 would
otherwise pay a full pass per box.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    input_size: int
    mean: tuple[float, float, float]  # RGB, 0..255 scale
    std: tuple[float, float, float]  # RGB, 0..255 scale
    resize: str = "squash"  # "squash" | "longest_side_pad"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModelInfo:
    id: str
    backend: str
    dim: int
    preprocessing: Preprocessing
    modalities: tuple[str, ...] = ("image",)
    weights_sha256: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    source: str = ""
    crop_mode: str = "resize"  # "resize" | "roi"
    max_batch: int = 64  # the largest batch the encoder takes in one call


class Encoder:
    """Base class. Subclasses set `info` and implement `encode` (and optionally `encode_text`,
    `feature_maps`)."""

    info: ModelInfo

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """batch: NxSxSx3 uint8 RGB -> NxD float32 (not yet normalised)."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """texts -> NxD float32. Only for encoders with the "text" modality."""
        raise NotImplementedError(f"model {self.info.id!r} has no text tower")

    def feature_maps(self, batch: np.ndarray) -> np.ndarray:
        """NxSxSx3 uint8 -> NxCxhxw float32, cell (r, c) covering input pixels [c*S/w, (c+1)*S/w) x
        [r*S/h, (r+1)*S/h): a region encoder's map, or a ViT's patch tokens. Only where
        `has_feature_map`."""
        raise NotImplementedError

    @property
    def has_feature_map(self) -> bool:
        """Whether `feature_maps` is implemented for this model (dense features for the locator)."""
        return False

    def close(self) -> None:
        pass


def file_sha256(paths: list[Path] | Path) -> str:
    """sha256 over one or more weight files, streamed (weights can be GBs)."""
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def torch_device() -> str:
    """'cuda' when a GPU is usable (MINEHEAD_DEVICE overrides), else 'cpu'."""
    want = os.environ.get("MINEHEAD_DEVICE", "auto")
    if want != "auto":
        return want
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_present() -> bool:
    """Cheap check that does not import torch (onnxruntime-only processes stay light)."""
    if os.environ.get("MINEHEAD_DEVICE", "auto") == "cpu":
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def model_identity(m: dict, file_sha: str = "") -> str:
    """The weights_sha256 a manifest's model reports: the ONNX file's sha256, folded with the
    colour weight when it has one (the same weights with colour channels embed differently, so
    caches and heads must not mix the two)."""
    sha = m.get("sha256") or file_sha
    w = float(m.get("colour_weight") or 0)
    if sha and w > 0:
        sha = hashlib.sha256(f"{sha}|colour_weight={w:g}".encode()).hexdigest()
    return sha
