"""The ML backend's state and behaviour, without HTTP: what /setup, /predict and /webhook do.

    backend = Backend(miner, head, recipes="recipeSets/ID", data_dir=…, labelstudio=LabelStudioAPI(…))
    backend.setup(payload)    -> {"model_version": …}  (FailedPrecondition when labels differ)
    backend.predict(payload)  -> [prediction per task]
    backend.webhook(payload)  -> what was done (a round started or queued, an annotation counted, ignored)
    backend.close(grace_s)    -> a running round stops at its next safe point (INTERRUPTED)

The current recipe set is the model version. It is kept in DATA_DIR/state.json (state.py: shared
by every worker process, changed under a lock, replaced atomically), so a restarted backend
answers with the set its last finished round made, and a round that fails, is cancelled or is
interrupted leaves it as it was.

Rounds are jobs in DATA_DIR/jobs.sqlite (minehead.core.jobs), one at a time for the whole backend
(every round moves the one model version). A request for a round while one runs is queued:
requests coalesce into one next round per project (DATA_DIR/state.json "pending"), started when
the running one ends. Only the process holding DATA_DIR/runner.lock runs rounds; when it dies
(kill -9 included) the lock is freed and the next holder marks what it ran INTERRUPTED.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

from minehead.common.v1 import common_pb2
from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.core.jobs import FINAL_STATES, JobRunner, JobStore
from minehead.labelstudio.config import check_labels, parse_config
from minehead.importers import resolve_image
from minehead.labelstudio.guard import Limits, check_tasks, project_id, webhook_action
from minehead.labelstudio.interactive import drawn_results, interactive_answer
from minehead.labelstudio.predict import Predictor
from minehead.labelstudio.rounds import RoundSpec, round_job
from minehead.labelstudio.state import RunnerLock, StateFile

log = logging.getLogger("minehead.labelstudio")

TRAIN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
ROUND_KIND = "labelstudio-round"
POLL_S = 0.25  # how soon the round runner notices a queued round or a cancel from another worker


class Backend:
    def __init__(self, miner, head, *, recipes: str, data_dir: Path | str, labelstudio=None,
                 images_root: str | None = None, base_dataset: str | None = None, train_every: int = 0,
                 budget_s: float | None = None, limits: Limits | None = None) -> None:
        self.miner, self.head, self.labelstudio = miner, head, labelstudio
        self.limits = limits or Limits()
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.images_root = images_root
        self.base_dataset = Path(base_dataset) if base_dataset else None
        if self.base_dataset is not None and not self.base_dataset.is_dir():
            raise InvalidArgument(f"--base-dataset {base_dataset}: not a folder")
        self.train_every = train_every
        self._lock = threading.Lock()
        origin = miner.get_recipe_set(recipes).name  # NOT_FOUND early; jobs/ID becomes the set's own name
        self._state = StateFile(self.data_dir / "state.json")
        with self._state.update() as s:
            if s.get("origin") != origin:  # another starting set: a new history
                s.clear()
                s.update({"origin": origin, "recipe_set": origin, "rounds": [], "annotations": {}})
            s.setdefault("pending", {})
        self.store = JobStore(self.data_dir / "jobs.sqlite")
        # Not marked here: another worker may be running a round; the runner lock says when none is.
        self.runner = JobRunner(self.store, max_workers=1, mark_interrupted=False)
        self._runner_lock = RunnerLock(self.data_dir / "runner.lock")
        self._stop = threading.Event()
        url = labelstudio.url if labelstudio is not None else None
        self.predictor = Predictor(miner.draft_images, images_root=images_root, labelstudio_url=url,
                                   authorization=labelstudio.authorization if labelstudio is not None else None,
                                   **({"budget_s": budget_s} if budget_s else {}))
        self._take_over()
        self._poller = threading.Thread(target=self._poll, name="rounds-poller", daemon=True)
        self._poller.start()

    # -- state ------------------------------------------------------------------------------
    @property
    def state(self) -> dict:
        return self._state.read()

    @property
    def model_version(self) -> str:
        return self._state.read()["recipe_set"]

    def _config(self, label_config, version: str | None = None):
        """The project's config checked against the set (FailedPrecondition naming both)."""
        config = parse_config(label_config)
        rset = self.miner.get_recipe_set(version or self.model_version)
        check_labels(config, list(rset.classes), rset.name)
        return config

    # -- the protocol -----------------------------------------------------------------------
    def health(self) -> dict:
        st = self.state
        jobs, _ = self.store.list(kind=ROUND_KIND, page_size=1)
        last = jobs[0] if jobs else None
        rounds = {"running": None, "pending": sorted(int(p) for p in st.get("pending", {})), "last": None}
        if last is not None:
            rounds["last"] = {"round": last.name, "state": common_pb2.Job.State.Name(last.state), "phase": last.phase,
                              "error": last.error}
            if last.state not in FINAL_STATES:
                rounds["running"] = last.name
        return {"status": "UP", "model_class": "minehead", "model_version": st["recipe_set"], "rounds": rounds}

    def setup(self, payload: dict) -> dict:
        if not isinstance(payload, dict):
            raise InvalidArgument("/setup expects a JSON object")
        self._config(payload.get("schema"))
        return {"model_version": self.model_version}

    def predict(self, payload: dict) -> list[dict]:
        if not isinstance(payload, dict):
            raise InvalidArgument("/predict expects a JSON object")
        tasks = check_tasks(payload.get("tasks"), self.limits)
        drawn = drawn_results(payload)
        if drawn:  # interactive: rectangles drawn on one task -> everything like them there
            return [interactive_answer(self.predictor, self.miner.find_similar, tasks, drawn, payload.get("label_config"))]
        version = self.model_version  # one version for the whole answer, even if a round ends meanwhile
        config = self._config(payload.get("label_config"), version)
        log.info("predict: %d task(s) with %s", len(tasks), version)
        return self.predictor.predict(tasks, config, version)

    def webhook(self, payload: dict) -> dict:
        """START_TRAINING asks for a round; with train_every=N, every N-th created or updated
        annotation of a project asks for one too; other actions are acknowledged and ignored."""
        action = webhook_action(payload)
        if action == "START_TRAINING":
            return self.request_round(project_id(payload.get("project"), "project.id"))
        if action in TRAIN_ACTIONS and self.train_every > 0:
            pid = project_id(payload.get("project"), "project.id")
            with self._state.update() as s:
                n = s["annotations"].get(str(pid), 0) + 1
                s["annotations"][str(pid)] = n % self.train_every
            if n >= self.train_every:
                return {**self.request_round(pid), "annotations": n}
            return {"status": "ok", "annotations": n, "train_every": self.train_every}
        return {"status": "ignored", "action": action}

    def train(self, payload: dict) -> dict:
        """Label Studio's older training call, the tasks with their annotations inline: checked
        here (shape, image references by the import rules) so a bad one is refused now, not
        found by the round later."""
        tasks = check_tasks(payload.get("annotations"), self.limits, "annotations")
        for k, t in enumerate(tasks):
            for key, ref in t["data"].items():
                if isinstance(ref, str) and ref.startswith(("http://", "https://", "/data/", "file:", "s3:", "gs:")):
                    resolve_image(ref, f"annotations[{k}].data.{key}", self.images_root,
                                  self.labelstudio.url if self.labelstudio else None)
        return self.request_round(project_id(payload.get("project", 0)), json.dumps(tasks).encode())

    def versions(self) -> dict:
        st = self.state
        return {"versions": [st["origin"]] + [r["recipe_set"] for r in st["rounds"]], "current": st["recipe_set"]}

    # -- rounds -----------------------------------------------------------------------------
    def rounds(self, limit: int = 100) -> list:
        return self.store.list(kind=ROUND_KIND, page_size=limit)[0]

    def round(self, jid: str):
        return self.store.get(jid)

    def cancel_round(self, jid: str):
        return self.store.request_cancel(jid)

    def live_round(self):
        jobs, _ = self.store.list(kind=ROUND_KIND, page_size=1)
        return jobs[0] if jobs and jobs[0].state not in FINAL_STATES else None

    def request_round(self, project_id: int, tasks_json: bytes | None = None) -> dict:
        """A round for the project now, or queued behind the running one: requests for a project
        coalesce into one next round (the newest inline tasks win). tasks_json: an export given
        inline (/train); None: Label Studio's export API when the round starts."""
        if tasks_json is None and self.labelstudio is None:
            raise FailedPrecondition("training needs --labelstudio-url and a token to export the annotations")
        if self._stop.is_set():
            raise FailedPrecondition("the backend is stopping: no new round")
        with self._lock:
            live = self.live_round()
            if live is None and self._runner_lock.held and not self.state["pending"]:
                job = self._start(project_id, tasks_json)
                return {"status": "ok", "round": job.name, "state": common_pb2.Job.State.Name(job.state)}
            ref = ""
            if tasks_json is not None:
                ref = str(self.data_dir / "pending" / f"p{project_id}.json")
                Path(ref).parent.mkdir(exist_ok=True)
                Path(ref).write_bytes(tasks_json)
            with self._state.update() as s:
                s["pending"][str(project_id)] = ref
                pending = sorted(int(p) for p in s["pending"])
        log.info("round for project %s queued (running: %s)", project_id, live.name if live else "none")
        return {"status": "queued", "round": live.name if live else None, "pending": pending}

    def start_round(self, project_id: int, export=None):
        """Start a round for the project now (export: () -> bytes, default Label Studio's export
        API); the running round when there is one. Only in the process that runs rounds."""
        with self._lock:
            live = self.live_round()
            if live is not None:
                log.info("round %s is still running: not starting another", live.name)
                return live
            if export is None and self.labelstudio is None:
                raise FailedPrecondition("training needs --labelstudio-url and a token to export the annotations")
            return self._start(project_id, export)

    def _start(self, project_id: int, export):
        if isinstance(export, bytes):
            export = (lambda data: lambda: data)(export)
        elif export is None:
            export = lambda: self.labelstudio.export_tasks(project_id)  # noqa: E731
        n = len(self.state["rounds"]) + 1
        spec = RoundSpec(recipe_set=self.model_version, work_dir=self.data_dir / "rounds" / f"{n:03d}-p{project_id}",
                         base_dataset=self.base_dataset, images_root=self.images_root,
                         labelstudio_url=self.labelstudio.url if self.labelstudio else None,
                         authorization=self.labelstudio.authorization() if self.labelstudio and
                         self.labelstudio.token else None, head_name=f"labelstudio-p{project_id}-round{n}")
        if spec.work_dir.exists():  # a cancelled, failed or interrupted attempt of this round: start it clean
            shutil.rmtree(spec.work_dir)
        job = self.runner.start(ROUND_KIND, {"project": project_id, "round": n, "recipe_set": spec.recipe_set},
                                round_job(spec, export, self.head, self.miner, self._finished, self._stop))
        log.info("round %d for project %s: %s", n, project_id, job.name)
        return job

    def _finished(self, summary: dict) -> None:
        with self._state.update() as s:
            s["rounds"].append(summary)
            s["recipe_set"] = summary["recipe_set"]
        log.info("model version is now %s", summary["recipe_set"])

    def _take_over(self) -> None:
        """Become the process that runs rounds when none is; what a dead one ran is INTERRUPTED."""
        if self._runner_lock.held or not self._runner_lock.try_acquire():
            return
        ids = self.store.mark_interrupted()
        if ids:
            log.warning("round(s) %s were running when the backend stopped: marked INTERRUPTED (the model version "
                        "stays %s; press Start Training for a new round)", ", ".join(ids), self.model_version)

    def _poll(self) -> None:
        """Queued rounds start here, and a cancel asked in another worker reaches the round."""
        while not self._stop.wait(POLL_S):
            try:
                self._take_over()
                if not self._runner_lock.held:
                    continue
                live = self.live_round()
                if live is not None:
                    if live.state == common_pb2.Job.CANCELLING:
                        self.store.request_cancel(live.name[5:])
                    continue
                self._start_pending()
            except Exception:  # noqa: BLE001 - the poller must outlive one bad round request
                log.exception("rounds poller")

    def _start_pending(self) -> None:
        with self._lock:
            if self._stop.is_set() or self.live_round() is not None:
                return
            with self._state.update() as s:
                if not s["pending"]:
                    return
                pid = next(iter(s["pending"]))
                ref = s["pending"].pop(pid)
            export = None
            if ref:
                export = Path(ref).read_bytes()
                Path(ref).unlink(missing_ok=True)
            self._start(int(pid), export)

    def close(self, grace_s: float = 10.0) -> None:
        """Stop: a running round ends at its next safe point within grace_s (INTERRUPTED, its head
        or miner job cancelled), else it is marked INTERRUPTED here; the model version is either
        the old set or the new one, never a partial one (state.json is replaced atomically)."""
        self._stop.set()
        live = self.live_round() if self._runner_lock.held else None
        if live is not None:
            jid, t_end = live.name[5:], time.monotonic() + grace_s
            while self.store.get(jid).state not in FINAL_STATES and time.monotonic() < t_end:
                time.sleep(0.05)
            job = self.store.get(jid)  # the state the round reached by itself
            if job.state not in FINAL_STATES:
                self.store.finish(jid, common_pb2.Job.INTERRUPTED,
                                  error=f"the backend stopped during {job.phase or 'its start'}; the model version "
                                        f"stays {self.model_version}")
            log.warning("round %s ended %s on shutdown", live.name, common_pb2.Job.State.Name(self.store.get(jid).state))
        self._poller.join(2 * POLL_S + 1)
        self.runner.shutdown()
        self._runner_lock.release()
        self.busy = live is not None and job.state not in FINAL_STATES  # its thread may still write: store left open
        if not self.busy:
            self.store.close()
