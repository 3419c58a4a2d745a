"""Tiny random-initialised models built from the real classes, saved where the real loading
code looks for weights. Offline tests and benchmarks run every backend's true code path on them;
their embeddings are meaningless.

    make_tiny_open_clip(models_dir)  -> "open_clip:tiny-clip/random"
    make_tiny_hf_clip(models_dir)    -> "hf-clip:tiny/clip"
    make_tiny_dinov3(models_dir)     -> "dinov3:tiny/dinov3"
    make_random_open_clip(models_dir, "ViT-B-32") -> "open_clip:ViT-B-32/random" (full size)
"""

from __future__ import annotations

import json
from pathlib import Path


def make_tiny_open_clip(models_dir: Path, arch: str = "tiny-clip", tag: str = "random", seed: int = 0) -> str:
    import open_clip
    import torch
    from safetensors.torch import save_file

    oc = Path(models_dir) / "open_clip"
    (oc / arch).mkdir(parents=True, exist_ok=True)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (oc / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(oc / f"{arch}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(oc / arch / f"{tag}.safetensors"))
    return f"open_clip:{arch}/{tag}"


def make_random_open_clip(models_dir: Path, arch: str = "ViT-B-32", tag: str = "random", seed: int = 0) -> str:
    """A full-size architecture with random weights (for throughput measurements)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    d = Path(models_dir) / "open_clip" / arch
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / f"{tag}.safetensors"))
    return f"open_clip:{arch}/{tag}"


def make_tiny_hf_clip(models_dir: Path, name: str = "tiny/clip", seed: int = 0) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=24,
    )
    out = Path(models_dir) / "hf" / name
    CLIPModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return f"hf-clip:{name}"


def make_tiny_dinov3(models_dir: Path, name: str = "tiny/dinov3", seed: int = 0) -> str:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    cfg = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, num_register_tokens=2)
    out = Path(models_dir) / "hf" / name
    DINOv3ViTModel(cfg).save_pretrained(out)
    return f"dinov3:{name}"
