"""SAM3 through transformers' Sam3Model: text prompts and box exemplars -> boxes, scores, masks.

Ids: "sam3:facebook/sam3" (or any repo/folder holding a Sam3Model; resolved from
models_dir/hf/<id>, then the Hugging Face cache, then the hub unless offline) and
"sam3-tiny-random": the same classes built from a small Sam3Config with seeded random weights,
so the whole chain runs where SAM3's gated weights cannot be had. Its detections mean nothing,
and every summary made with it says so.

Per image the vision backbone runs once (lazily, on the first prompt that is not cached) and
its output is reused for every prompt; each prompt's text embedding is computed once per
process. Scores are sigmoid(query logit) x sigmoid(presence logit), as SAM3's own
post-processing does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from minehead.core.errors import ModelUnavailable

from miner_svc.detectors.base import Detections, Detector, DetectorInfo, ImageState

TINY_ID = "sam3-tiny-random"
# "visual" is the text SAM3's processor pairs with box-only prompts.
VISUAL_PROMPT = "visual"


def tiny_sam3_config():
    from transformers import Sam3Config

    h = 32
    return Sam3Config(
        vision_config=dict(backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14,
                                                window_size=8, global_attn_indexes=[1], pretrain_image_size=224),
                           fpn_hidden_size=h, backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]]),
        text_config=dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1, num_attention_heads=2),
        geometry_encoder_config=dict(hidden_size=h, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=h, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=h, num_layers=1, num_queries=32, num_attention_heads=2, intermediate_size=64),
        mask_decoder_config=dict(hidden_size=h, num_attention_heads=2),
    )


class Sam3Detector(Detector):
    def __init__(self, model_id: str, models_dir: Path, offline: bool = True) -> None:
        super().__init__()
        import torch
        from transformers import Sam3Model

        from minehead.encoders.base import torch_device

        self.torch = torch
        self.device = torch.device(torch_device())
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        if model_id == TINY_ID:
            torch.manual_seed(0)
            model = Sam3Model(tiny_sam3_config())
            self.info = DetectorInfo(TINY_ID, meaningless=True,
                                     note="tiny random-initialised Sam3Model: its detections are meaningless")  # noqa: E501
        else:
            name = model_id.split(":", 1)[1] if model_id.startswith("sam3:") else model_id
            local = models_dir / "hf" / name
            src = str(local) if (local / "config.json").is_file() else name
            try:
                model = Sam3Model.from_pretrained(src, local_files_only=offline or src == str(local))
            except Exception as e:  # noqa: BLE001
                raise ModelUnavailable(
                    f"SAM3 model {model_id!r} is not available ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                    f"Its weights are gated: accept the licence on the hub, then download them into the Hugging Face "
                    f"cache or as a save_pretrained folder at {local}; or use {TINY_ID!r} to test the chain.") from None
            try:
                from transformers import Sam3ImageProcessor

                proc = Sam3ImageProcessor.from_pretrained(src, local_files_only=True)
                mean, std = tuple(proc.image_mean), tuple(proc.image_std)
            except Exception:  # noqa: BLE001 - SAM3's defaults
                pass
            self.info = DetectorInfo(f"sam3:{name}")
        self.model = model.to(self.device).eval()
        cfg = model.config
        self.size = int(cfg.vision_config.backbone_config.image_size)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        import open_clip

        # SAM3's text tower uses CLIP's BPE vocabulary, which open_clip ships (works offline).
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=int(cfg.text_config.max_position_embeddings))
        self._text: dict[str, object] = {}
        self._lock = threading.Lock()

    # -- passes -----------------------------------------------------------------------------
    def _vision(self, state: ImageState):
        with state.lock:
            if state.features is None:
                from PIL import Image

                im = Image.fromarray(state.image.pixels).resize((self.size, self.size), Image.BILINEAR)
                x = self.torch.from_numpy(np.array(im)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
                with self.torch.inference_mode():
                    state.features = self.model.get_vision_features(pixel_values=(x - self.mean) / self.std)
                self.counters.add(backbone=1)
            return state.features

    def _text_embeds(self, prompt: str):
        with self._lock:
            if prompt not in self._text:
                ids = self.tokenizer([prompt]).to(self.device)
                mask = (ids != 0).long()
                with self.torch.inference_mode():
                    self._text[prompt] = (self.model.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True), mask)
                self.counters.add(text=1)
            return self._text[prompt]

    def _decode(self, state: ImageState, prompt: str, threshold: float, boxes: np.ndarray | None = None) -> Detections:
        vision = self._vision(state)
        text, mask = self._text_embeds(prompt)
        H, W = state.image.height, state.image.width
        kw = {}
        if boxes is not None and len(boxes):
            b = np.asarray(boxes, np.float64) / [W, H, W, H]
            cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
            kw = {"input_boxes": self.torch.tensor(cxcywh[None], dtype=self.torch.float32, device=self.device),
                  "input_boxes_labels": self.torch.ones((1, len(b)), dtype=self.torch.long, device=self.device)}
        with self.torch.inference_mode():
            out = self.model(vision_embeds=vision, text_embeds=text, attention_mask=mask, **kw)
        self.counters.add(decoder=1)
        scores = self.torch.sigmoid(out.pred_logits[0])
        if out.presence_logits is not None:
            scores = scores * self.torch.sigmoid(out.presence_logits[0])
        keep = self.torch.nonzero(scores >= threshold).flatten()
        if len(keep) == 0:
            return Detections.empty(H, W)
        xyxy = (out.pred_boxes[0, keep].clamp(0, 1) * self.torch.tensor([W, H, W, H], device=self.device)).float()
        masks = self.torch.nn.functional.interpolate(out.pred_masks[:, keep].float(), size=(H, W), mode="bilinear",
                                                     align_corners=False)[0] > 0
        d = Detections(xyxy.cpu().numpy().astype(np.float32), scores[keep].float().cpu().numpy(), masks.cpu().numpy())
        ok = (d.boxes[:, 2] - d.boxes[:, 0] >= 1) & (d.boxes[:, 3] - d.boxes[:, 1] >= 1)
        return d.take(np.flatnonzero(ok))

    def predict_text(self, state: ImageState, prompt: str, threshold: float) -> Detections:
        return self._decode(state, prompt, threshold)

    def predict_exemplars(self, state: ImageState, boxes: np.ndarray, threshold: float) -> Detections:
        return self._decode(state, VISUAL_PROMPT, threshold, boxes)
