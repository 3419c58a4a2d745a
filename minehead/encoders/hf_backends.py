"""transformers models: CLIP ("hf-clip:REPO", image and text) and DINOv3 ("dinov3:REPO", image).

Weights: models_dir/hf/REPO (a `save_pretrained` folder) first, then the Hugging Face cache,
then the hub unless offline.

DINOv3's embedding is `pooler_output`: the CLS token after the final layer norm. It is the
representation DINOv3 is trained to make linearly separable (its linear-probe results use it),
and unlike a patch mean it ignores register tokens and padding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minehead.core.errors import ModelUnavailable

from minehead.encoders.base import ModelInfo, Preprocessing, file_sha256
from minehead.encoders.registry import ModelSpec, offline_reason
from minehead.encoders.torch_common import TorchEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_hf(cls, spec: ModelSpec, what: str):
    """(model, source folder or repo id, weights folder or None). Local dir, then cache, then hub."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # service logs, not terminal progress bars
    local = spec.models_dir / "hf" / spec.name
    if (local / "config.json").is_file():
        try:
            return cls.from_pretrained(str(local)), str(local), local
        except Exception as e:  # noqa: BLE001
            raise ModelUnavailable(f"{what} {spec.id!r}: the local copy at {local} failed to load: {e}") from None
    errors = []
    for local_only in (True, False):
        if not local_only and (why_not_hub := offline_reason(spec)):
            errors.append(f"hub: not tried, {why_not_hub}")
            break
        try:
            model = cls.from_pretrained(spec.name, local_files_only=local_only)
            return model, spec.name, _snapshot_dir(spec.name)
        except Exception as e:  # noqa: BLE001 - hub/network/file errors alike
            msg = "not in the Hugging Face cache" if local_only else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            errors.append(f"{'cache' if local_only else 'hub'}: {msg}")
    raise ModelUnavailable(
        f"{what} {spec.id!r} is not available ({'; '.join(errors)}). Provide it "
        f"as a save_pretrained folder at {local}, or download it into the Hugging Face cache (HF_HOME) on a machine "
        "with network access."
    )


def _snapshot_dir(repo: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - the hash is informational
        return None


def _weights_sha(folder: Path | None) -> str:
    if folder is None:
        return ""
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    return file_sha256(files) if files else ""


def _processor_stats(src: str, local_only: bool, default_size: int, mean, std) -> Preprocessing:
    """Mean/std/size from the saved image processor when there is one, else the family defaults."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(src, local_files_only=local_only)
        mean = tuple(proc.image_mean)
        std = tuple(proc.image_std)
        size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        if isinstance(size, dict):
            default_size = int(size.get("height") or size.get("shortest_edge") or default_size)
    except Exception:  # noqa: BLE001 - a model without a processor config uses the defaults
        pass
    return Preprocessing(default_size, tuple(v * 255 for v in mean), tuple(v * 255 for v in std), "squash")


class HfClipEncoder(TorchEncoder):
    def __init__(self, spec: ModelSpec) -> None:
        from transformers import CLIPModel

        model, src, folder = load_hf(CLIPModel, spec, "CLIP model")
        local_only = folder is not None or spec.offline
        pre = _processor_stats(src, local_only, model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
        self._init_torch(model, pre)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.tokenizer = self._tokenizer(src, local_only, folder)
        self.info = ModelInfo(
            id=spec.id, backend="hf_clip", dim=int(model.config.projection_dim), preprocessing=pre,
            modalities=("image", "text"), weights_sha256=_weights_sha(folder), device=str(self.device),
            dtype=self.dtype_name, source=str(folder or "hub"),
        )

    def _tokenizer(self, src: str, local_only: bool, folder: Path | None):
        # AutoTokenizer "loads" even from a folder without tokenizer files and then emits junk
        # ids, so it is only trusted when the files are there.
        has_files = folder is not None and any((folder / f).is_file() for f in _TOKENIZER_FILES)
        if has_files:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            return lambda texts: tok(texts, padding="max_length", truncation=True, max_length=self.context_length,
                                     return_tensors="pt")["input_ids"]
        # No saved tokenizer: open_clip ships the same CLIP BPE vocabulary (49408 ids).
        import open_clip

        if self.module.config.text_config.vocab_size != 49408:
            raise ModelUnavailable(f"CLIP model at {src} has no tokenizer files and a vocabulary of "
                                   f"{self.module.config.text_config.vocab_size}, not CLIP's 49408")
        return open_clip.get_tokenizer("ViT-B-32", context_length=self.context_length)

    @staticmethod
    def _features(y):
        # transformers 5 may wrap features in a ModelOutput; 4.x returns the tensor.
        return y if hasattr(y, "float") else (y.pooler_output if getattr(y, "pooler_output", None) is not None else y[0])

    def _forward_image(self, x):
        return self._features(self.module.get_image_features(pixel_values=x))

    def _patch_tokens(self, x):
        # The vision tower's last hidden state: CLS first, then the patches row by row.
        return self.module.vision_model(pixel_values=x).last_hidden_state[:, 1:]

    def encode_text(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts).to(self.device)
        with self.torch.inference_mode(), self._autocast():
            y = self._features(self.module.get_text_features(input_ids=ids))
        return y.float().cpu().numpy()


class HfDinov3Encoder(TorchEncoder):
    def __init__(self, spec: ModelSpec) -> None:
        from transformers import AutoModel

        model, src, folder = load_hf(AutoModel, spec, "DINOv3 model")
        local_only = folder is not None or spec.offline
        pre = _processor_stats(src, local_only, int(getattr(model.config, "image_size", 224)), IMAGENET_MEAN, IMAGENET_STD)
        self._init_torch(model, pre)
        self.info = ModelInfo(
            id=spec.id, backend="hf_dinov3", dim=int(model.config.hidden_size), preprocessing=pre,
            modalities=("image",), weights_sha256=_weights_sha(folder), device=str(self.device),
            dtype=self.dtype_name, source=str(folder or "hub"),
        )

    def _forward_image(self, x):
        return self.module(pixel_values=x).pooler_output

    def _patch_tokens(self, x):
        # DINOv3's sequence is CLS, then its register tokens, then the patches row by row.
        skip = 1 + int(getattr(self.module.config, "num_register_tokens", 0) or 0)
        return self.module(pixel_values=x).last_hidden_state[:, skip:]
