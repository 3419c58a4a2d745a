"""Image encoders: one registry, many backends (open_clip, transformers CLIP / DINOv3, ONNX),
chosen by model name. Shared by the embedder service and the miner's detectors."""
