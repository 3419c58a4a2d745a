"""What the torch backends share: device choice, mixed precision on CUDA, batched normalisation."""

from __future__ import annotations

import contextlib

import numpy as np

from minehead.encoders.base import Encoder, Preprocessing, torch_device


class TorchEncoder(Encoder):
    def _init_torch(self, module, pre: Preprocessing) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(torch_device())
        self.module = module.to(self.device).eval()
        # fp16/bf16 on GPUs (autocast keeps norms in fp32); exact fp32 on CPU.
        self.amp_dtype = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self._mean = torch.tensor(pre.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pre.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def dtype_name(self) -> str:
        return {None: "float32"}.get(self.amp_dtype, str(self.amp_dtype).replace("torch.", ""))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _pixels(self, batch: np.ndarray):
        """N x S x S x 3 uint8 -> normalised N x 3 x S x S float32 tensor on the device."""
        t = self.torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        t = t.permute(0, 3, 1, 2).float()
        return (t - self._mean) / self._std

    def _forward_image(self, x):
        raise NotImplementedError

    def _patch_tokens(self, x):
        """Normalised N x 3 x S x S -> N x h*w x D patch tokens (row-major, no CLS or register
        tokens). Backends with a ViT implement it."""
        raise NotImplementedError

    @property
    def has_feature_map(self) -> bool:
        return type(self)._patch_tokens is not TorchEncoder._patch_tokens

    def feature_maps(self, batch: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 -> N x D x h x w float32: the last layer's patch tokens on their grid
        (h = w = S / patch size; these encoders squash the image to the square)."""
        if not self.has_feature_map:
            raise NotImplementedError(f"model {self.info.id!r} has no patch tokens")
        with self.torch.inference_mode(), self._autocast():
            t = self._patch_tokens(self._pixels(batch)).float()
        n, hw, d = t.shape
        side = int(round(hw ** 0.5))
        if side * side != hw:
            raise ValueError(f"model {self.info.id!r}: {hw} patch tokens do not form a square grid")
        return t.transpose(1, 2).reshape(n, d, side, side).cpu().numpy()

    def encode(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode(), self._autocast():
            y = self._forward_image(self._pixels(batch))
        return y.float().cpu().numpy()
