"""Recipes: what a recipe is and how one runs.

    background.py       BackgroundPolicy: the head's background veto, one name for it
    executor.py         Step, Gate, run_step / run_recipe: one recipe on one image (mining = inference)
    scorer.py           HeadScorer: crop embeddings and head probabilities for detected boxes
    detection_cache.py  CachedDetector: one detector run per (image, prompt) at the floor, kept
    codec.py            recipes.v2 messages <-> executor parameters
    store.py            RecipeStore, canonical JSON, content ids, recipe bundles
    sets.py             RecipeSetStore: one recipe per class, one head, one detector
    apply.py            ApplyRecipe's work: a stored recipe over images
    drafter.py          Drafter: a recipe set on one new image -> DraftedImage (drafting's unit)
    masks.py            masks as COCO RLE and polygons
"""
