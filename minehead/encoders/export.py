"""Export a CLIP or DINOv3 vision tower to ONNX, with a manifest and a parity check.

    export_vision_tower("hf-clip:openai/clip-vit-base-patch32", "clip-b32", models_dir)

writes models_dir/onnx/clip-b32/{model.onnx, manifest.json}; the ONNX backend then serves it
as "clip-b32". The graph takes the normalised N x 3 x S x S float32 batch (normalisation stays
in the serving code, as for every ONNX model) and returns N x D features. Parity: the same
random images through torch and onnxruntime; the max abs difference is recorded in the manifest
and the export fails if it exceeds `tolerance`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minehead.core.errors import FailedPrecondition, InvalidArgument

from minehead.encoders import registry
from minehead.encoders.base import file_sha256

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def export_vision_tower(model_id: str, name: str, models_dir: Path, *, opset: int = 17, tolerance: float = 1e-4,
                        parity_images: int = 4, seed: int = 0) -> dict:
    """Returns the written manifest (with parity_max_abs_err)."""
    import torch

    if not _NAME.match(name):
        raise InvalidArgument(f"export name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a folder)")
    models_dir = Path(models_dir)
    spec = registry.resolve(model_id, models_dir)
    if spec.backend == "onnx":
        raise InvalidArgument(f"{model_id!r} is already an ONNX model")
    enc = registry.create_encoder(spec)
    if enc.device.type != "cpu" or enc.amp_dtype is not None:
        # Export the exact fp32 graph on the CPU; the ONNX runtime picks its own device later.
        enc.module.to("cpu").float()
        enc.device = torch.device("cpu")
        enc.amp_dtype = None
        enc._mean, enc._std = enc._mean.cpu(), enc._std.cpu()

    class VisionTower(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.inner = encoder.module  # registered so parameters are exported as initializers

        def forward(self, x):
            return self.encoder._forward_image(x)

    pre = enc.info.preprocessing
    tower = VisionTower(enc).eval()
    dummy = torch.zeros(2, 3, pre.input_size, pre.input_size)
    tmp = Path(tempfile.mkdtemp(prefix="export-"))
    try:
        onnx_path = tmp / "model.onnx"
        # Grad stays enabled on purpose: under no_grad/inference_mode nn.MultiheadAttention takes
        # its fused fast path (aten::_native_multi_head_attention), which has no ONNX symbolic.
        torch.onnx.export(tower, (dummy,), str(onnx_path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                          dynamo=False, verbose=False)
        manifest = {
            "schema_version": 1, "id": name, "input_name": "input", "output_name": "output",
            "input_size": pre.input_size, "mean": list(pre.mean), "std": list(pre.std), "resize": pre.resize,
            "pooling": "none", "crop_mode": "resize", "batch": None, "dim": enc.info.dim,
            "sha256": file_sha256(onnx_path), "source": f"export of {spec.id}",
            "source_weights_sha256": enc.info.weights_sha256, "opset": opset,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        err = _parity(enc, tmp, pre.input_size, parity_images, seed)
        manifest["parity_max_abs_err"] = err
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if err > tolerance:
            raise FailedPrecondition(f"ONNX export of {spec.id} differs from torch by {err:.3g} (> {tolerance}); not installed")
        out = models_dir / "onnx" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.with_name(name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(tmp, staged)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parity(enc, folder: Path, size: int, n: int, seed: int) -> float:
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    ref = enc.encode(batch)
    x = enc._pixels(batch).cpu().numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    got = sess.run(["output"], {"input": x})[0]
    return float(np.max(np.abs(got - ref)))
