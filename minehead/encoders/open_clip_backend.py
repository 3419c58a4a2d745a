"""open_clip models: "open_clip:ARCH/PRETRAINED" (image and text).

Weights: models_dir/open_clip/ARCH/PRETRAINED.{safetensors,bin,pt} first; a custom
architecture's config may sit at models_dir/open_clip/ARCH.json. Otherwise the pretrained tag
resolves through open_clip's own registry: the Hugging Face cache, then the hub when online.
"""

from __future__ import annotations

import numpy as np

from minehead.core.errors import ModelUnavailable, NotFound

from minehead.encoders.base import ModelInfo, Preprocessing, file_sha256
from minehead.encoders.registry import ModelSpec, offline_reason
from minehead.encoders.torch_common import TorchEncoder

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class OpenClipEncoder(TorchEncoder):
    def __init__(self, spec: ModelSpec) -> None:
        import open_clip

        arch, tag = spec.name.split("/", 1)
        oc_dir = spec.models_dir / "open_clip"
        cfg = oc_dir / f"{arch}.json"
        if cfg.is_file():
            open_clip.add_model_config(cfg)
        if arch not in open_clip.list_models():
            raise NotFound(f"open_clip has no architecture {arch!r} (and there is no {cfg})")
        local = next((oc_dir / arch / f"{tag}{s}" for s in _WEIGHT_SUFFIXES if (oc_dir / arch / f"{tag}{s}").is_file()), None)
        if local is not None:
            pretrained, weights = str(local), local
        else:
            if tag not in open_clip.list_pretrained_tags_by_model(arch):
                raise NotFound(f"open_clip architecture {arch!r} has no pretrained tag {tag!r} and no local weights at {oc_dir / arch}/{tag}.safetensors")
            weights = _cached_open_clip_file(open_clip, arch, tag)
            if weights is None and (why := offline_reason(spec)):
                raise ModelUnavailable(_missing(spec, oc_dir, arch, tag, f"not in the Hugging Face cache, and {why}"))
            pretrained = str(weights) if weights else tag
        try:
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        except Exception as e:  # noqa: BLE001 - network, hub and file errors alike
            raise ModelUnavailable(_missing(spec, oc_dir, arch, tag, f"{type(e).__name__}: {e}")) from None
        if weights is None:
            weights = _cached_open_clip_file(open_clip, arch, tag)
        pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = pcfg.get("size", getattr(model.visual, "image_size", 224))
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = tuple(float(v) * 255 for v in pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(float(v) * 255 for v in pcfg.get("std", open_clip.OPENAI_DATASET_STD))
        pre = Preprocessing(size, mean, std, "squash")
        self._init_torch(model, pre)
        self.tokenizer = open_clip.get_tokenizer(arch)
        with self.torch.inference_mode():
            dim = int(model.encode_image(self.torch.zeros(1, 3, size, size, device=self.device)).shape[-1])
        self.info = ModelInfo(
            id=spec.id, backend="open_clip", dim=dim, preprocessing=pre, modalities=("image", "text"),
            weights_sha256=file_sha256(weights) if weights else "", device=str(self.device), dtype=self.dtype_name,
            source=str(weights) if weights else "hub",
        )

    def _forward_image(self, x):
        return self.module.encode_image(x)

    def _patch_tokens(self, x):
        # open_clip's VisionTransformer returns (pooled, patch tokens) with output_tokens set;
        # the tokens leave out the class token.
        visual = self.module.visual
        if not hasattr(visual, "output_tokens"):
            raise NotImplementedError(f"model {self.info.id!r}: this open_clip tower has no patch tokens")
        was, visual.output_tokens = visual.output_tokens, True
        try:
            return visual(x)[1]
        finally:
            visual.output_tokens = was

    def encode_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        with self.torch.inference_mode(), self._autocast():
            y = self.module.encode_text(tokens)
        return y.float().cpu().numpy()


def _cached_open_clip_file(open_clip, arch: str, tag: str):
    """The weights file for a pretrained tag in the HF cache, or None."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    repo = (cfg.get("hf_hub") or "").rstrip("/")
    if not repo:
        return None
    for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        p = try_to_load_from_cache(repo, fname)
        if isinstance(p, str):
            return Path(p)
    return None


def _missing(spec: ModelSpec, oc_dir, arch: str, tag: str, why: str) -> str:
    return (f"model {spec.id!r} is not available ({why}). Provide it by putting the weights at "
            f"{oc_dir / arch}/{tag}.safetensors, or by downloading it into the Hugging Face cache (HF_HOME) on a "
            "machine with network access.")
