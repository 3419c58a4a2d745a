"""miner_svc: Mine SAM3 recipes, keep the recipe store, apply recipes."""
