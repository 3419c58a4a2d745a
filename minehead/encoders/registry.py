"""One factory, many backends, chosen by model id (the open_clip / timm registry pattern).

Model ids:
  onnx:NAME  or a bare NAME with models_dir/onnx/NAME/manifest.json  -> "onnx"
  open_clip:ARCH/TAG  or a bare ARCH/TAG with an open_clip architecture -> "open_clip"
  hf-clip:REPO_OR_DIR  or a bare id containing "clip"                   -> "hf_clip"
  dinov3:REPO_OR_DIR   or a bare id containing "dinov3"                 -> "hf_dinov3"
A bare id naming a folder under models_dir/hf/ goes by that folder's config.json model_type.

Weights resolve from the local models dir first, then the Hugging Face cache, then the hub
(unless offline). A known model whose weights are nowhere is ModelUnavailable
(FAILED_PRECONDITION) with a message saying where to put them; an id no backend claims is
NotFound.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path

from minehead.core.errors import NotFound

from minehead.encoders.base import Encoder, model_identity

# backend name -> "module:Class", imported only when used (torch and open_clip are slow imports).
BACKENDS = {
    "onnx": "minehead.encoders.onnx_backend:OnnxEncoder",
    "open_clip": "minehead.encoders.open_clip_backend:OpenClipEncoder",
    "hf_clip": "minehead.encoders.hf_backends:HfClipEncoder",
    "hf_dinov3": "minehead.encoders.hf_backends:HfDinov3Encoder",
}
PREFIXES = {"onnx:": "onnx", "open_clip:": "open_clip", "hf-clip:": "hf_clip", "dinov3:": "hf_dinov3"}
CANONICAL_PREFIX = {v: k for k, v in PREFIXES.items()}
_HF_MODEL_TYPES = {"clip": "hf_clip", "dinov3_vit": "hf_dinov3"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    backend: str
    name: str  # the id without its backend prefix
    models_dir: Path
    offline: bool = False

    @property
    def id(self) -> str:
        """Canonical id: local ONNX models keep their bare name, others carry their prefix."""
        return self.name if self.backend == "onnx" else CANONICAL_PREFIX[self.backend] + self.name


def is_offline() -> bool:
    return any(os.environ.get(v, "") in ("1", "true", "yes") for v in ("MINEHEAD_OFFLINE", "HF_HUB_OFFLINE"))


_hub_probe: tuple[float, bool] | None = None


def hub_reachable(timeout_s: float = 3.0, ttl_s: float = 60.0) -> bool:
    """One TCP connect to the hub (HF_ENDPOINT), remembered for a minute. Without it, a machine
    with no route to the hub spends 30-50 s in the hub clients' retries before saying so."""
    global _hub_probe
    import socket
    import time
    from urllib.parse import urlparse

    now = time.monotonic()
    if _hub_probe and now - _hub_probe[0] < ttl_s:
        return _hub_probe[1]
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s):
            ok = True
    except OSError:
        ok = False
    _hub_probe = (now, ok)
    return ok


def offline_reason(spec: "ModelSpec") -> str | None:
    """Why the hub will not be tried: 'offline mode (…)' or 'the hub is unreachable', else None."""
    if spec.offline:
        return "offline mode (MINEHEAD_OFFLINE / HF_HUB_OFFLINE)"
    if not hub_reachable():
        return f"the hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is unreachable"
    return None


def resolve(model_id: str, models_dir: Path, offline: bool | None = None) -> ModelSpec:
    """Model id -> which backend serves it. NotFound when no backend recognises the id."""
    offline = is_offline() if offline is None else offline
    model_id = model_id.strip()
    if not model_id:
        raise NotFound("empty model id")
    for prefix, backend in PREFIXES.items():
        if model_id.startswith(prefix):
            name = model_id[len(prefix):]
            if not name:
                raise NotFound(f"model id {model_id!r} names no model after the prefix")
            if backend == "open_clip" and name.count("/") != 1:
                raise NotFound(f"open_clip ids are open_clip:ARCH/PRETRAINED, got {model_id!r}")
            return ModelSpec(backend, name, models_dir, offline)
    if (models_dir / "onnx" / model_id / "manifest.json").is_file():
        return ModelSpec("onnx", model_id, models_dir, offline)
    cfg = models_dir / "hf" / model_id / "config.json"
    if cfg.is_file():
        try:
            mtype = json.loads(cfg.read_text()).get("model_type", "")
        except ValueError:
            mtype = ""
        if mtype in _HF_MODEL_TYPES:
            return ModelSpec(_HF_MODEL_TYPES[mtype], model_id, models_dir, offline)
    low = model_id.lower()
    if "dinov3" in low:
        return ModelSpec("hf_dinov3", model_id, models_dir, offline)
    if model_id.count("/") == 1 and _is_open_clip_arch(model_id.split("/")[0], models_dir):
        return ModelSpec("open_clip", model_id, models_dir, offline)
    if "clip" in low:
        return ModelSpec("hf_clip", model_id, models_dir, offline)
    raise NotFound(
        f"unknown model {model_id!r}: not a local ONNX model ({models_dir}/onnx/{model_id}/manifest.json), "
        "not a local Hugging Face folder, and no backend recognises the name. Use a prefix: "
        "onnx:NAME, open_clip:ARCH/PRETRAINED, hf-clip:REPO, dinov3:REPO"
    )


def _is_open_clip_arch(arch: str, models_dir: Path) -> bool:
    if (models_dir / "open_clip" / f"{arch}.json").is_file() or (models_dir / "open_clip" / arch).is_dir():
        return True
    import open_clip

    return arch in open_clip.list_models()


def backend_class(backend: str) -> type[Encoder]:
    mod, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(mod), cls)


def create_encoder(spec: ModelSpec) -> Encoder:
    """Load the model's weights and return a ready encoder (may raise ModelUnavailable)."""
    return backend_class(spec.backend)(spec)


def discover_local(models_dir: Path) -> list[ModelSpec]:
    """Models whose weights sit in the local models dir (listed before they are loaded)."""
    found: list[ModelSpec] = []
    for m in sorted((models_dir / "onnx").glob("*/manifest.json")):
        found.append(ModelSpec("onnx", m.parent.name, models_dir))
    hf = models_dir / "hf"
    for cfg in sorted(hf.glob("**/config.json")):
        try:
            mtype = json.loads(cfg.read_text()).get("model_type", "")
        except ValueError:
            continue
        if mtype in _HF_MODEL_TYPES:
            found.append(ModelSpec(_HF_MODEL_TYPES[mtype], str(cfg.parent.relative_to(hf)), models_dir))
    oc = models_dir / "open_clip"
    for w in sorted(oc.glob("*/*")):
        if w.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            found.append(ModelSpec("open_clip", f"{w.parent.name}/{w.stem}", models_dir))
    return found


def peek_info(spec: ModelSpec) -> dict:
    """What can be known without loading: for local ONNX models, the manifest's dim and input."""
    if spec.backend != "onnx":
        return {}
    try:
        m = json.loads((spec.models_dir / "onnx" / spec.name / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"dim": int(m.get("dim") or 0), "input_size": int(m.get("input_size") or 0),
            "mean": m.get("mean", []), "std": m.get("std", []), "resize": m.get("resize", ""),
            "weights_sha256": model_identity(m)}
