"""Label Studio's interactive mode: the annotator draws a few rectangles with auto-annotation on;
Label Studio sends them in /predict's `params.context.result` (Label Studio 1.23
ml/api_connector.py), with the one task they were drawn on; the answer is one prediction holding
the drawn rectangles as they are and every object like them on that image (the miner's
FindSimilar: no recipe set, head or dataset needed).

    drawn = exemplars_of(context, config)        # [(class, XYXY px)], (width, height); Refused naming a bad one
    prediction = interactive_prediction(task_image, context, config, find_similar, image_path)

A drawn rectangle is `{"type": "rectanglelabels", "value": {"x", "y", "width", "height" (percent
of the image), "rectanglelabels": [label]}, "original_width", "original_height"}`; a label
outside the project's labelling config, a rectangle outside the image or of no area is refused
(HTTP 400 naming it), as the RPC refuses them (INVALID_ARGUMENT)."""

from __future__ import annotations

from pathlib import Path

from minehead.common.v1 import common_pb2
from minehead.core.errors import InvalidArgument
from minehead.drafts.formats import labelstudio_prediction
from minehead.labelstudio.config import LabelConfig
from minehead.miner.v1 import exemplars_pb2

MODEL_VERSION = "exemplars"
DRAWN_TYPES = ("rectanglelabels", "rectangle")


def drawn_results(payload: dict) -> list[dict]:
    """The rectangles of /predict's context (`params.context.result`, or a top-level `context`);
    empty when the request is not interactive."""
    params = payload.get("params") if isinstance(payload.get("params"), dict) else {}
    context = params.get("context") if isinstance(params.get("context"), dict) else payload.get("context")
    result = context.get("result") if isinstance(context, dict) else None
    if not isinstance(result, list):
        return []
    return [r for r in result if isinstance(r, dict) and r.get("type") in DRAWN_TYPES]


def exemplars_of(results: list[dict], config: LabelConfig) -> tuple[list[tuple[str, list[float]]], tuple[int, int]]:
    """Drawn rectangles -> ([(class, [x1, y1, x2, y2] px)], (width, height))."""
    out, size = [], None
    for k, r in enumerate(results):
        what = f"context.result[{k}]"
        v = r.get("value")
        try:
            W, H = int(r["original_width"]), int(r["original_height"])
            x, y, w, h = (float(v[key]) for key in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"{what}: a rectangle needs value.x/y/width/height (percent) and "
                                  "original_width/original_height") from None
        labels = v.get("rectanglelabels") or v.get("labels") or []
        cls = str(labels[0]) if labels else (config.labels[0] if len(config.labels) == 1 else "")
        if not cls:
            raise InvalidArgument(f"{what}: the rectangle has no label; pick one of {', '.join(config.labels)}")
        if cls not in config.labels:
            raise InvalidArgument(f"{what}: unknown class {cls!r}: the project's labels are {', '.join(config.labels)}")
        size = size or (W, H)
        out.append((cls, [x * W / 100, y * H / 100, (x + w) * W / 100, (y + h) * H / 100]))
    return out, size or (0, 0)


def interactive_prediction(results: list[dict], config: LabelConfig, find_similar, image_path: Path,
                           min_score: float = 0.0) -> dict:
    """One prediction: the drawn rectangles, unchanged, then every object like them (rectangles
    in percent, scored by similarity). find_similar(image, options) is MinerClient.find_similar."""
    drawn, _ = exemplars_of(results, config)
    opts = exemplars_pb2.FindOptions(
        exemplars=[exemplars_pb2.Exemplar(box=common_pb2.BoxXYXY(x1=b[0], y1=b[1], x2=b[2], y2=b[3]), class_name=c)
                   for c, b in drawn],
        classes=list(config.labels), omit_exemplars=True, min_score=min_score)
    found = find_similar(image_path, opts).image
    pred = labelstudio_prediction(found, MODEL_VERSION, False, config.from_name, config.to_name)
    for k, r in enumerate(pred["result"]):
        r["id"] = f"found_{k}"
    pred["result"] = [dict(r) for r in results] + pred["result"]
    return pred
