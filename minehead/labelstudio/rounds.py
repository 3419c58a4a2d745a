"""A training round: reviewed annotations from Label Studio -> a new head -> new recipes -> a new
recipe set, run as a job (minehead.core.jobs: phases, progress, log, cancel).

    export   the project's finished tasks (Label Studio's JSON export), or bytes given directly
    import   minehead.importers.import_labelstudio into ROUND/reviewed (the upload rules: no
             traversal, no foreign host, size caps; labels must be the set's classes)
    dataset  ROUND/dataset = the base dataset (--base-dataset: what the first head was trained
             on) plus every reviewed image so far (the export is cumulative, so a round never
             builds on the previous round's folder: no image is counted twice)
    train    a head like the previous one (its meta: embedder, head type, soft targets, seed,
             holdout, background classes; a locator when it had one), on ROUND/dataset
    mine     recipes for the set's classes with the set's detector and target precision
    set      the mining job's recipe set: the next model version

A cancel stops the round at the next safe point and cancels the head or miner job it waits on;
the previous recipe set stays current. So does a stop (the backend's SIGTERM): the round ends
INTERRUPTED at the next safe point (a phase boundary, or the head or miner job it waits on,
which is cancelled). Nothing here speaks HTTP: backend.py starts rounds, the
Flask edge only forwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path

import grpc
from google.protobuf import json_format

from minehead.common.v1 import common_pb2
from minehead.core.errors import Cancelled, FailedPrecondition, Interrupted
from minehead.core.jobs import FINAL_STATES, JobContext, struct_from_dict
from minehead.dataset_store import folder_zip
from minehead.datasets import split_dirs, read_class_names
from minehead.head.v1 import head_pb2
from minehead.importers import import_labelstudio
from minehead.miner.v1 import miner_pb2
from minehead.recipes.v2 import recipes_pb2


@dataclasses.dataclass
class RoundSpec:
    recipe_set: str  # the set whose corrections these are (its classes, head and detector)
    work_dir: Path  # ROUND: reviewed/, dataset/ are written here
    base_dataset: Path | None = None  # images the previous head was trained on (kept in every round)
    images_root: str | None = None  # where Label Studio's local-files / relative image paths are read
    labelstudio_url: str | None = None  # the only host images are fetched from
    authorization: str | None = None  # for those fetches (a bare legacy token or a header value)
    head_name: str = ""  # display name of the new head
    stop: threading.Event | None = None  # set when the backend is stopping


def _step(ctx: JobContext, spec: RoundSpec, name: str) -> None:
    """A phase boundary: a safe point to stop at (nothing of the round is in use yet)."""
    if spec.stop is not None and spec.stop.is_set():
        raise Interrupted(f"the backend stopped before the {name} phase; the model version is unchanged")
    ctx.check_cancelled()
    if ctx.store.get(ctx.job_id).state == common_pb2.Job.CANCELLING:  # asked in another worker (one process's
        raise Cancelled(f"cancelled on request before the {name} phase")  # set of requests does not see it)
    ctx.phase(name)


def _follow(ctx: JobContext, jobs, job: common_pb2.Job, what: str, stop: threading.Event | None = None) -> common_pb2.Job:
    """Wait for a head/miner job, forwarding its progress; a cancel of the round, or the backend
    stopping, cancels it."""
    for ev in jobs.watch(job.name):
        stopping = stop is not None and stop.is_set()
        if stopping or ctx.store.cancel_requested(ctx.job_id):
            try:
                jobs.cancel(job.name)
            except grpc.RpcError:
                pass  # it ended meanwhile
            if stopping:
                raise Interrupted(f"the backend stopped during {what} ({job.name} cancelled); the model version is "
                                  "unchanged")
            raise Cancelled(f"cancelled on request during {what} ({job.name} cancelled too)")
        kind = ev.WhichOneof("payload")
        if kind == "progress" and ev.progress.total:
            ctx.progress(ev.progress.done, ev.progress.total, ev.progress.unit)
        elif kind == "log" and ev.log.level >= common_pb2.LogLine.WARNING:
            ctx.log(f"{what}: {ev.log.message}", ev.log.level)
    done = jobs.get(job.name)
    if done.state != common_pb2.Job.SUCCEEDED:
        raise FailedPrecondition(f"{what} job {done.name} ended {common_pb2.Job.State.Name(done.state)}: "
                                 f"{done.error or 'no error given'}")
    return done


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def merge_datasets(base: Path | None, reviewed: Path, out: Path, classes: list[str]) -> tuple[int, int]:
    """out = base ∪ reviewed as one YOLO folder over `classes` (ids remapped by name; base labels
    of other classes left out). Returns (base images kept, reviewed images)."""
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    ids = {c: i for i, c in enumerate(classes)}
    kept = 0
    if base is not None:
        names = read_class_names(base)  # classes the set does not draft are left out, as the first head's training did
        for split, images, labels in split_dirs(base):
            for img in sorted(images.iterdir()):
                if not img.is_file():
                    continue
                stem = f"{split}_{img.stem}" if split else img.stem
                lab = labels / f"{img.stem}.txt"
                lines = lab.read_text(encoding="utf-8").splitlines() if lab.is_file() else []
                out_lines = [f"{ids[names[int(ln.split()[0])]]} {' '.join(ln.split()[1:])}" for ln in lines
                             if ln.split() and ln.split()[0].isdigit() and int(ln.split()[0]) < len(names)
                             and names[int(ln.split()[0])] in ids]
                _link(img, out / "images" / f"{stem}{img.suffix}")
                (out / "labels" / f"{stem}.txt").write_text("".join(x + "\n" for x in out_lines), encoding="utf-8")
                kept += 1
    n = 0
    for img in sorted((reviewed / "images").iterdir()):
        _link(img, out / "images" / f"reviewed_{img.name}")
        shutil.copyfile(reviewed / "labels" / f"{img.stem}.txt", out / "labels" / f"reviewed_{img.stem}.txt")
        n += 1
    (out / "labelmap.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")
    return kept, n


def training_spec(prev: head_pb2.Head, dataset: head_pb2.DatasetRef, classes: list[str],
                  display_name: str) -> head_pb2.TrainingSpec:
    """A head like `prev` (from its meta.json) for the set's classes on a new dataset."""
    meta = json_format.MessageToDict(prev.meta) if prev.meta.fields else {}
    hp, soft = meta.get("hyperparameters", {}), meta.get("soft_targets", {})
    spec = head_pb2.TrainingSpec(
        dataset=dataset, model=prev.embedder.model_id, head_type=prev.head_type, classes=classes,
        soft_targets=head_pb2.SoftTargets(**{k: float(soft[k]) for k in ("label_smoothing", "teacher_temperature",
                                                                           "margin_loss") if k in soft}),
        seed=int(hp.get("seed", 0)), holdout_fraction=float(hp.get("holdout_fraction", 0.0)), display_name=display_name)
    if "background_classes" in hp:
        spec.background_classes = int(hp["background_classes"])
    spec.locator = bool(prev.has_locator)
    return spec


def mining_spec(prev: "recipes_pb2.Recipe", dataset: str, head_id: str, classes: list[str], detector: str,
                seed: int) -> miner_pb2.MiningSpec:
    """Mining settings as the previous set was mined with (its provenance): the same target,
    gate tuning, background policy and search limits, on the round's dataset and head."""
    try:
        st = json.loads(prev.provenance.mining_settings_json or "{}")
    except ValueError:
        st = {}
    spec = miner_pb2.MiningSpec(dataset=dataset, head=head_id, classes=classes, detector=detector,
                                target_precision=prev.target_precision or 0.0, seed=seed,
                                clip_head_auto_tune=bool(st.get("auto_tune", True)),
                                clip_head_background_guard=bool(st.get("guard", False)),
                                clip_head_background_margin=float(st.get("background_margin", 0.0)),
                                max_steps=int(st.get("max_steps", 0)), floor_threshold=float(st.get("floor", 0.0)))
    if st.get("apply") in ("seed", "final", "both"):
        spec.clip_head_background_apply = recipes_pb2.BackgroundApply.Value(st["apply"].upper())
    return spec


def run_round(ctx: JobContext, spec: RoundSpec, export, head, miner) -> dict:
    """export: () -> bytes of a Label Studio JSON export; head/miner: HeadClient, MinerClient.
    Returns the round's summary (also the job's result)."""
    _step(ctx, spec, "export")
    rset = miner.get_recipe_set(spec.recipe_set)
    classes = list(rset.classes)
    data = export()
    ctx.log(f"exported {len(data)} bytes of reviewed tasks")
    _step(ctx, spec, "import")
    work = Path(spec.work_dir)
    report = import_labelstudio(data, work / "reviewed", spec.images_root, labelstudio_url=spec.labelstudio_url,
                                labelmap=classes, token=spec.authorization)
    ctx.log(report.describe())
    _step(ctx, spec, "dataset")
    kept, n = merge_datasets(spec.base_dataset, work / "reviewed", work / "dataset", classes)
    ctx.log(f"round dataset: {kept} base images + {n} reviewed images ({work / 'dataset'})")
    prev = head.get(rset.head_id)
    _step(ctx, spec, "train")
    tspec = training_spec(prev, head_pb2.DatasetRef(path=str(work / "dataset")), classes, spec.head_name)
    try:
        job = head.start_training(tspec)
        ds_ref = str(work / "dataset")
    except grpc.RpcError as e:  # the head service may not read our folder: upload it once, for both services
        if e.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND):
            raise
        up = head.upload_dataset(folder_zip(work / "dataset"), work.name)
        ctx.log(f"the services cannot read {work / 'dataset'}: uploaded as {up.name}")
        tspec.dataset.CopyFrom(head_pb2.DatasetRef(name=up.name))
        job, ds_ref = head.start_training(tspec), up.name
    done = _follow(ctx, head.jobs, job, "head training", spec.stop)
    tres = head_pb2.TrainingResult()
    done.result.Unpack(tres)
    ctx.log(f"trained head {tres.head.head_id}" + (" with its locator" if tres.head.has_locator else ""))
    _step(ctx, spec, "mine")
    mspec = mining_spec(rset.recipes[0], ds_ref, tres.head.head_id, classes, rset.detector, int(tspec.seed))
    done = _follow(ctx, miner.jobs, miner.start_mining(mspec), "mining", spec.stop)
    mres = miner_pb2.MiningResult()
    done.result.Unpack(mres)
    if not mres.recipe_set:
        raise FailedPrecondition(f"mining job {done.name} made no recipe set (a class without a recipe?)")
    ctx.log(f"new recipe set {mres.recipe_set} (was {spec.recipe_set})")
    return {"recipe_set": mres.recipe_set, "previous": spec.recipe_set, "head": tres.head.head_id,
            "locator": tres.head.has_locator, "reviewed_images": n, "base_images": kept,
            "import": report.to_dict(), "dataset": ds_ref}


def round_job(spec: RoundSpec, export, head, miner, on_done=None, stop: threading.Event | None = None):
    """A JobRunner function for run_round; on_done(summary) runs before the job succeeds (the
    backend switches its model version there)."""
    spec = dataclasses.replace(spec, stop=stop) if stop is not None else spec

    def fn(ctx: JobContext):
        summary = run_round(ctx, spec, export, head, miner)
        ctx.check_cancelled()
        if ctx.store.get(ctx.job_id).state in FINAL_STATES:  # the backend gave up waiting and marked it
            raise Interrupted("the backend stopped before this round's set could become the model version")
        if on_done is not None:
            on_done(summary)
        return struct_from_dict(summary)
    return fn
