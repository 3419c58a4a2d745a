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
(HTTP 400 naming it), as the RPC refuses them (INVALID_ARGUMENT).

Label Studio's browser app sends, with each finished drawing, only the region(s) of that drawing
(`regionFinishedDrawing`: the serialized annotation filtered to the new region ids) to
`POST /api/ml/{id}/interactive-annotating` {"task": ID, "context": {"result": [...]}}; Label
Studio adds the task (with its drafts, predictions and annotations) and forwards it to /predict
(ml/models.py interactive_annotating, ml/api_connector.py _prep_prediction_req), and hands the
first prediction of the answer back as {"data": prediction}.

Started without a recipe set (`minehead labelstudio serve` with no --recipes), the backend is an
ExemplarBackend: this mode only. /predict without drawn rectangles answers no prediction
(`{"results": []}`, what Label Studio's own SAM backends answer before any interaction: Label
Studio stores nothing and asks again next time), and training is refused naming --recipes."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from minehead.common.v1 import common_pb2
from minehead.core.errors import InvalidArgument
from minehead.drafts.formats import labelstudio_prediction
from minehead.labelstudio.config import LabelConfig, parse_config
from minehead.labelstudio.guard import Limits, Refused, check_tasks, webhook_action
from minehead.miner.v1 import exemplars_pb2

log = logging.getLogger("minehead.labelstudio")

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


def interactive_answer(predictor, find_similar, tasks: list, drawn: list[dict], label_config) -> dict:
    """/predict's interactive branch, with or without a recipe set: one task, its drawn
    rectangles -> one prediction; the task's image read by the Predictor's rules."""
    config = parse_config(label_config)
    if len(tasks) != 1:
        raise Refused(f"interactive /predict: drawn rectangles come with one task, got {len(tasks)}")
    log.info("predict: interactive, %d drawn rectangle(s) on task %s", len(drawn), tasks[0].get("id"))
    with tempfile.TemporaryDirectory(prefix="minehead-ls-") as tmp:
        path = predictor.task_image(tasks[0], config, Path(tmp), 0)  # local files, or from Label Studio
        return interactive_prediction(drawn, config, find_similar, path)


NEEDS_RECIPES = ("training needs a recipe set: this backend was started without one (interactive find only); "
                 "restart it with --recipes SET_OR_JOB (`minehead labelstudio serve --recipes recipeSets/ID`). "
                 "A first set: export the reviewed tasks, `minehead datasets import` them, then `minehead heads train` "
                 "and `minehead mine start`")


class NeedsRecipes(Refused):
    """A training call to a backend started without --recipes."""


class ExemplarBackend:
    """The ML backend with no recipe set: interactive find only. The same protocol as
    minehead.labelstudio.backend.Backend (health, setup, predict, webhook, train, versions,
    rounds, close), with no state on disk: nothing here outlives a request."""

    model_version = MODEL_VERSION

    def __init__(self, miner, *, labelstudio=None, images_root: str | None = None, budget_s: float | None = None,
                 limits: Limits | None = None) -> None:
        from minehead.labelstudio.predict import Predictor

        self.miner, self.labelstudio, self.limits = miner, labelstudio, limits or Limits()
        self.predictor = Predictor(None, images_root=images_root, labelstudio_url=labelstudio.url if labelstudio else None,
                                   authorization=labelstudio.authorization if labelstudio is not None else None,
                                   **({"budget_s": budget_s} if budget_s else {}))

    def health(self) -> dict:
        return {"status": "UP", "model_class": "minehead", "model_version": MODEL_VERSION,
                "mode": "interactive find only (no recipe set: no drafts, no training rounds)",
                "rounds": {"running": None, "pending": [], "last": None}}

    def setup(self, payload: dict) -> dict:
        if not isinstance(payload, dict):
            raise InvalidArgument("/setup expects a JSON object")
        parse_config(payload.get("schema"))  # any labels: the drawn rectangles say what to find
        return {"model_version": MODEL_VERSION}

    def predict(self, payload: dict) -> list[dict]:
        if not isinstance(payload, dict):
            raise InvalidArgument("/predict expects a JSON object")
        tasks = check_tasks(payload.get("tasks"), self.limits)
        drawn = drawn_results(payload)
        if drawn:
            return [interactive_answer(self.predictor, self.miner.find_similar, tasks, drawn, payload.get("label_config"))]
        parse_config(payload.get("label_config"))
        log.info("predict: %d task(s) without drawn rectangles: no prediction (no recipe set to draft with)", len(tasks))
        return []

    def webhook(self, payload: dict) -> dict:
        action = webhook_action(payload)
        if action == "START_TRAINING":
            raise NeedsRecipes(NEEDS_RECIPES)
        return {"status": "ignored", "action": action}

    def train(self, payload: dict) -> dict:
        raise NeedsRecipes(NEEDS_RECIPES)

    def versions(self) -> dict:
        return {"versions": [], "current": MODEL_VERSION}

    def rounds(self) -> list:
        return []

    def round(self, jid: str):
        raise NeedsRecipes(NEEDS_RECIPES)

    cancel_round = round

    def close(self, grace_s: float = 0.0) -> None:
        self.busy = False
