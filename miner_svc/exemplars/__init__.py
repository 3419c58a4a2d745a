"""Exemplars on the miner: FindSimilar / FindSimilarImages (finder: the feature map from the
embedder's cache, matching, refine: SAM's decoder on the kept boxes)."""
