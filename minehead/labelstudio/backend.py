"""The ML backend's state and behaviour, without HTTP: what /setup, /predict and /webhook do.

    backend = Backend(miner, head, recipes="recipeSets/ID", data_dir=…, labelstudio=LabelStudioAPI(…))
    backend.setup(payload)    -> {"model_version": …}  (FailedPrecondition when labels differ)
    backend.predict(payload)  -> [prediction per task]
    backend.webhook(payload)  -> what was done (a round started, an annotation counted, ignored)

The current recipe set is the model version. It is kept in DATA_DIR/state.json, so a restarted
backend answers with the set its last finished round made. Rounds are jobs in
DATA_DIR/jobs.sqlite (minehead.core.jobs): one at a time; a running round is not started twice.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from minehead.common.v1 import common_pb2
from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.core.jobs import FINAL_STATES, JobRunner, JobStore
from minehead.labelstudio.config import check_labels, parse_config
from minehead.labelstudio.predict import Predictor
from minehead.labelstudio.rounds import RoundSpec, round_job

log = logging.getLogger("minehead.labelstudio")

TRAIN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
ROUND_KIND = "labelstudio-round"


class Backend:
    def __init__(self, miner, head, *, recipes: str, data_dir: Path | str, labelstudio=None,
                 images_root: str | None = None, base_dataset: str | None = None, train_every: int = 0,
                 budget_s: float | None = None) -> None:
        self.miner, self.head, self.labelstudio = miner, head, labelstudio
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.images_root = images_root
        self.base_dataset = Path(base_dataset) if base_dataset else None
        if self.base_dataset is not None and not self.base_dataset.is_dir():
            raise InvalidArgument(f"--base-dataset {base_dataset}: not a folder")
        self.train_every = train_every
        self._lock = threading.Lock()
        origin = miner.get_recipe_set(recipes).name  # NOT_FOUND early; jobs/ID becomes the set's own name
        self._state_file = self.data_dir / "state.json"
        state = json.loads(self._state_file.read_text()) if self._state_file.is_file() else {}
        if state.get("origin") != origin:  # another starting set: a new history
            state = {"origin": origin, "recipe_set": origin, "rounds": [], "annotations": {}}
        self.state = state
        self._save()
        self.store = JobStore(self.data_dir / "jobs.sqlite")
        self.runner = JobRunner(self.store, max_workers=1)
        url = labelstudio.url if labelstudio is not None else None
        self.predictor = Predictor(miner.draft_images, images_root=images_root, labelstudio_url=url,
                                   authorization=labelstudio.authorization if labelstudio is not None else None,
                                   **({"budget_s": budget_s} if budget_s else {}))

    # -- state ------------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self.state["recipe_set"]

    def _save(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f, indent=2)
        os.replace(tmp, self._state_file)

    def _config(self, label_config):
        """The project's config checked against the current set (FailedPrecondition naming both)."""
        config = parse_config(label_config)
        rset = self.miner.get_recipe_set(self.model_version)
        check_labels(config, list(rset.classes), rset.name)
        return config

    # -- the protocol -----------------------------------------------------------------------
    def health(self) -> dict:
        return {"status": "UP", "model_class": "minehead", "model_version": self.model_version}

    def setup(self, payload: dict) -> dict:
        if not isinstance(payload, dict):
            raise InvalidArgument("/setup expects a JSON object")
        self._config(payload.get("schema"))
        return {"model_version": self.model_version}

    def predict(self, payload: dict) -> list[dict]:
        if not isinstance(payload, dict):
            raise InvalidArgument("/predict expects a JSON object")
        config = self._config(payload.get("label_config"))
        tasks = payload.get("tasks")
        log.info("predict: %d task(s) with %s", len(tasks) if isinstance(tasks, list) else 0, self.model_version)
        return self.predictor.predict(tasks, config, self.model_version)

    def webhook(self, payload: dict) -> dict:
        """START_TRAINING starts a round; with train_every=N, every N-th created or updated
        annotation of a project starts one too; other actions are acknowledged and ignored."""
        if not isinstance(payload, dict):
            raise InvalidArgument("/webhook expects a JSON object")
        action, project = payload.get("action"), payload.get("project")
        pid = project.get("id") if isinstance(project, dict) else None
        if action == "START_TRAINING":
            if pid is None:
                raise InvalidArgument("START_TRAINING without project.id")
            job = self.start_round(int(pid))
            return {"status": "ok", "round": job.name, "state": common_pb2.Job.State.Name(job.state)}
        if action in TRAIN_ACTIONS and pid is not None and self.train_every > 0:
            with self._lock:
                n = self.state["annotations"].get(str(pid), 0) + 1
                self.state["annotations"][str(pid)] = n % self.train_every
                self._save()
            if n >= self.train_every:
                job = self.start_round(int(pid))
                return {"status": "ok", "round": job.name, "annotations": n}
            return {"status": "ok", "annotations": n, "train_every": self.train_every}
        return {"status": "ignored", "action": action}

    # -- rounds -----------------------------------------------------------------------------
    def live_round(self):
        jobs, _ = self.store.list(kind=ROUND_KIND, page_size=1)
        return jobs[0] if jobs and jobs[0].state not in FINAL_STATES else None

    def start_round(self, project_id: int, export=None):
        """Start a round for the project (export: () -> bytes, default Label Studio's export API);
        the running round when there is one."""
        with self._lock:
            live = self.live_round()
            if live is not None:
                log.info("round %s is still running: not starting another", live.name)
                return live
            if export is None:
                if self.labelstudio is None:
                    raise FailedPrecondition("training needs --labelstudio-url and a token to export the annotations")
                export = lambda: self.labelstudio.export_tasks(project_id)  # noqa: E731
            n = len(self.state["rounds"]) + 1
            spec = RoundSpec(recipe_set=self.model_version, work_dir=self.data_dir / "rounds" / f"{n:03d}-p{project_id}",
                             base_dataset=self.base_dataset, images_root=self.images_root,
                             labelstudio_url=self.labelstudio.url if self.labelstudio else None,
                             authorization=self.labelstudio.authorization() if self.labelstudio and
                             self.labelstudio.token else None, head_name=f"labelstudio-p{project_id}-round{n}")
            if spec.work_dir.exists():  # a cancelled or failed attempt of this round: start it clean
                import shutil

                shutil.rmtree(spec.work_dir)
            job = self.runner.start(ROUND_KIND, {"project": project_id, "round": n, "recipe_set": self.model_version},
                                    round_job(spec, export, self.head, self.miner, self._finished))
            log.info("round %d for project %s: %s", n, project_id, job.name)
            return job

    def _finished(self, summary: dict) -> None:
        with self._lock:
            self.state["rounds"].append(summary)
            self.state["recipe_set"] = summary["recipe_set"]
            self._save()
        log.info("model version is now %s", summary["recipe_set"])

    def close(self) -> None:
        self.runner.shutdown()
        self.store.close()
