"""head_svc: Train classifier heads, keep the head registry, score crops."""
