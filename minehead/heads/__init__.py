"""Head bundles (ONNX + meta.json), their ONNX graph, and the keep rule: what every service
needs to score crops with a trained head, without the training code."""
