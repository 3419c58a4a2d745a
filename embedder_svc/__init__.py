"""embedder_svc: CLIP / DINOv3 / ONNX image, crop and text embeddings, as a library and a gRPC service.

Library entry point: `embedder_svc.embedder.Embedder` (numpy in, numpy out; no gRPC).
"""
