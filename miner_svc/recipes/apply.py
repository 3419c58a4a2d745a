"""ApplyRecipe's work: one stored recipe over images, with the executor mining used."""

from __future__ import annotations

from typing import Iterable

from minehead.core.images import decode_image
from minehead.heads.bundle import HeadBundle
from minehead.miner.v1 import drafting_pb2, miner_pb2
from minehead.recipes.v2 import recipes_pb2

from miner_svc.recipes import masks as mask_codec
from miner_svc.recipes.codec import gate_of, steps_of
from miner_svc.recipes.detection_cache import CachedDetector
from miner_svc.recipes.executor import run_recipe
from miner_svc.recipes.scorer import HeadScorer

MaskFormat = miner_pb2.ApplyRecipeRequest


def apply_recipe(det: CachedDetector, scorer: HeadScorer, recipe: recipes_pb2.Recipe, head: HeadBundle,
                 images: Iterable[tuple[bytes, str, str]], mask_format: int) -> miner_pb2.ApplyRecipeResponse:
    """images: (bytes, name to decode by, label to answer with) per image, read lazily (a bad
    image fails the call when it is reached). Masks as polygons, COCO RLE or none."""
    fmt = mask_format or MaskFormat.POLYGON
    target = head.classes.index(recipe.class_name)
    steps, gate = steps_of(recipe), gate_of(recipe)
    before = det.counters.snapshot()
    out = miner_pb2.ApplyRecipeResponse()
    if recipe.detector.meaningless:
        out.warnings.append(f"detector {recipe.detector.model_id} has random weights: these detections are meaningless")
    for data, name, label in images:
        image = decode_image(data, name)
        r = run_recipe(det, det.set_image(image), data, steps, gate, target, scorer, masks=fmt != MaskFormat.NONE)
        im = out.images.add(label=label, width=image.width, height=image.height)
        for j in range(len(r.boxes)):
            d = im.detections.add(class_name=recipe.class_name, score=float(r.scores[j]),
                                  head_prob=float(r.probs[j, target]), head_probabilities=r.probs[j].tolist(),
                                  step_index=int(r.step_index[j]))
            d.box.x1, d.box.y1, d.box.x2, d.box.y2 = (float(v) for v in r.boxes[j])
            if r.masks is not None and fmt == MaskFormat.POLYGON:
                d.polygon.extend(mask_codec.polygon(r.masks[j]))
            elif r.masks is not None and fmt == MaskFormat.RLE:
                d.rle = mask_codec.rle(r.masks[j])
        out.warnings.extend(r.warnings)
    out.passes.CopyFrom(drafting_pb2.PassCounts(**det.counters.since(before)))
    return out
