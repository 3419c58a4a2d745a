"""Label Studio tasks -> drafts through the miner -> Label Studio predictions.

Label Studio sends a whole selection of tasks in one /predict request and gives up after
ML_TIMEOUT_PREDICT (100 s by default); drafting takes about a second an image on a CPU. So a
request is answered within a time budget: tasks are drafted in order on one DraftImages stream,
and when the budget runs out with tasks left, the answer holds a single prediction. Label
Studio 1.23 treats a one-result answer to a many-task request as "this backend predicts one task
at a time" (ml/models.py, _get_predictions_from_ml_backend_one_by_one) and asks again task by
task, each request with its own timeout; the tasks already drafted are answered from a cache
keyed by (model version, task id, image), so none is drafted twice. Progress goes to the log.
"""

from __future__ import annotations

import collections
import logging
import tempfile
import threading
import time
from pathlib import Path

from minehead.core.errors import InvalidArgument
from minehead.drafts.formats import labelstudio_prediction
from minehead.importers import fetch_image, resolve_image
from minehead.labelstudio.config import LabelConfig
from minehead.miner.v1 import drafting_pb2

log = logging.getLogger("minehead.labelstudio")

DEFAULT_BUDGET_S = 60.0  # well under Label Studio's 100 s ML_TIMEOUT_PREDICT
CACHE_SIZE = 20000


class PredictionCache:
    """(model_version, task id, image ref) -> prediction, least recently used dropped first."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._d: collections.OrderedDict = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self._size:
                self._d.popitem(last=False)


class Predictor:
    """draft(options, images) is MinerClient.draft_images; images are read where the import rules
    allow: under images_root (local files, /data/local-files/?d=…) or from the Label Studio
    instance itself (authorization: a header value from LabelStudioAPI, or a bare legacy token)."""

    def __init__(self, draft, *, images_root: str | None, labelstudio_url: str | None, authorization=None,
                 budget_s: float = DEFAULT_BUDGET_S, cache: PredictionCache | None = None) -> None:
        self.draft = draft
        self.images_root = images_root
        self.labelstudio_url = labelstudio_url
        self.authorization = authorization or (lambda: None)
        self.budget_s = budget_s
        self.cache = cache or PredictionCache()

    def task_image(self, task: dict, config: LabelConfig, tmp: Path, k: int) -> Path:
        """The task's image as a file in tmp (InvalidArgument naming the task when it may not be read)."""
        what = f"task {task.get('id', '#' + str(k))}"
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or config.data_key not in data:
            raise InvalidArgument(f"{what}: no data.{config.data_key} (the labelling config's image field)")
        source = resolve_image(data[config.data_key], what, self.images_root, self.labelstudio_url)
        dst = tmp / f"{k:06d}"
        fetch_image(source, dst, self.authorization() if source[0] == "url" else None)
        return dst

    def predict(self, tasks: list, config: LabelConfig, recipe_set: str) -> list[dict]:
        """One prediction per task, in order, or a single one when the budget ran out (see above).
        A task whose image cannot be used gets an empty prediction scored 0 (review it first) and
        a log line naming the reason: one bad task never fails the batch."""
        if not isinstance(tasks, list):
            raise InvalidArgument("`tasks` must be a list of Label Studio tasks")
        t0, out, todo = time.monotonic(), [None] * len(tasks), []
        keys = [(recipe_set, t.get("id") if isinstance(t, dict) else None,
                 str((t.get("data") or {}).get(config.data_key)) if isinstance(t, dict) else "") for t in tasks]
        for k, key in enumerate(keys):
            out[k] = self.cache.get(key) if key[1] is not None else None
            if out[k] is None:
                todo.append(k)
        if todo:
            self._draft(tasks, todo, keys, out, config, recipe_set, t0)
        done = sum(p is not None for p in out)
        if done < len(tasks):
            log.info("predict: %d of %d tasks drafted in %.0f s (budget %.0f s); answering one so Label Studio asks "
                     "for the rest task by task", done, len(tasks), time.monotonic() - t0, self.budget_s)
            return [next(p for p in out if p is not None)]
        return out

    def _draft(self, tasks, todo, keys, out, config, recipe_set, t0) -> None:
        opts = drafting_pb2.DraftOptions(recipe_set=recipe_set, polygons=config.polygons)
        with tempfile.TemporaryDirectory(prefix="minehead-ls-") as tmp:
            sent: list[int] = []

            def images():  # lazily, one at a time; stops feeding once the budget is spent
                for k in todo:
                    if sent and time.monotonic() - t0 > self.budget_s:
                        return
                    try:
                        path = self.task_image(tasks[k], config, Path(tmp), k)
                    except InvalidArgument as e:
                        log.warning("predict: %s", e)
                        out[k] = {"model_version": recipe_set, "score": 0.0, "result": []}
                        continue
                    sent.append(k)
                    yield path

            last_log = time.monotonic()
            for n, drafted in enumerate(self.draft(opts, images())):
                k = sent[n]
                drafted.index = k
                if drafted.error:
                    log.warning("predict: task %s: %s", tasks[k].get("id"), drafted.error)
                    out[k] = {"model_version": recipe_set, "score": 0.0, "result": []}
                else:
                    out[k] = labelstudio_prediction(drafted, recipe_set, config.polygons, config.from_name, config.to_name)
                    if keys[k][1] is not None:
                        self.cache.put(keys[k], out[k])
                Path(tmp, f"{k:06d}").unlink(missing_ok=True)
                if time.monotonic() - last_log > 10 or n + 1 == len(todo):
                    last_log = time.monotonic()
                    el = last_log - t0
                    log.info("predict: %d/%d tasks drafted, %.2f tasks/s", n + 1, len(todo), (n + 1) / el if el else 0.0)
