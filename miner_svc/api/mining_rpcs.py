"""Mining RPCs: a MiningSpec checked and turned into a MiningRun, the job started; hard
negatives; the detector registry."""

from __future__ import annotations

from minehead.core.errors import InvalidArgument
from minehead.core.file_chunks import file_chunks
from minehead.core.floats import user_float
from minehead.core.jobs import job_id_from_name
from minehead.datasets import load_dataset
from minehead.miner.v1 import miner_pb2

from miner_svc.detectors import default_for_head, listed_detectors
from miner_svc.mining import negatives
from miner_svc.mining.benchmark import benchmark_job
from miner_svc.mining.job import MiningRun, mining_job
from miner_svc.mining.settings import MiningSettings
from miner_svc.recipes.background import BackgroundPolicy
from miner_svc.recipes.codec import STAGE_NAMES
from miner_svc.recipes.detection_cache import DEFAULT_FLOOR
from miner_svc.resources import MinerResources


def settings_of(spec: miner_pb2.MiningSpec, classes: list[str]) -> MiningSettings:
    """The spec's settings, checked; unset fields take their documented defaults."""
    uf = user_float  # float32 proto fields back to what the user typed (0.1, not 0.10000000149011612)
    background = BackgroundPolicy(
        veto=spec.clip_head_background_guard, margin=uf(spec.clip_head_background_margin),
        stage=STAGE_NAMES[spec.clip_head_background_apply], penalty=uf(spec.clip_head_background_penalty),
        filter_prompts=spec.prompt_filter if spec.HasField("prompt_filter") else True,
        filter_max_veto=uf(spec.prompt_filter_max_veto) if spec.HasField("prompt_filter_max_veto") else 0.8,
        filter_min_seeds=spec.prompt_filter_min_seeds if spec.HasField("prompt_filter_min_seeds") else 5)
    return MiningSettings(
        classes=classes, prompts={k: list(v.prompts) for k, v in spec.prompts.items()},
        target_precision=uf(spec.target_precision) or 0.75, floor=uf(spec.floor_threshold) or DEFAULT_FLOOR,
        max_steps=spec.max_steps or 3, report_fraction=uf(spec.report_fraction) or 0.3, seed=spec.seed,
        background=background, auto_tune=spec.clip_head_auto_tune, max_images=spec.max_images,
        hard_negative_min_bg_prob=uf(spec.hard_negative_min_bg_prob) if spec.HasField("hard_negative_min_bg_prob") else 0.5,
        refit_all_images=spec.refit_all_images if spec.HasField("refit_all_images") else True,
        out_of_fold=spec.out_of_fold if spec.HasField("out_of_fold") else True,
    ).check()


def prepare(res: MinerResources, spec: miner_pb2.MiningSpec) -> MiningRun:
    """The run a spec asks for, checked before a job starts (a bad dataset, head or class fails
    the call, not a job later)."""
    if not spec.head:
        raise InvalidArgument("mining needs a head (--head)")
    ds = load_dataset(res.resolve_dataset(spec.dataset))
    head = res.fetch_head(spec.head)
    classes = list(spec.classes) or [c for c in ds.classes if c in head.real_classes]
    for c in classes:
        if c not in ds.classes:
            raise InvalidArgument(f"class {c!r} is not in the dataset ({', '.join(ds.classes)})")
        if c not in head.real_classes:
            raise InvalidArgument(f"class {c!r} is not a class of head {head.head_id} ({', '.join(head.real_classes)})")
    for k in spec.prompts:
        if k not in classes:
            raise InvalidArgument(f"prompts given for {k!r}, which is not mined (classes: {', '.join(classes)})")
    settings = settings_of(spec, classes)
    det = res.detector(spec.detector or default_for_head(res.default_detector, head), spec.floor_threshold or DEFAULT_FLOOR,
                       head, out_of_fold=settings.out_of_fold)
    return MiningRun(ds, head, det, settings, spec.dataset)


class MiningRPCs:
    res: MinerResources

    def StartMining(self, request, context):
        res, run = self.res, prepare(self.res, request.spec)
        return res.runner.start("mining", request, lambda ctx: mining_job(
            ctx, run, lambda: res.scorer_for(run.head, run.det, out_of_fold=run.settings.out_of_fold), res.pool, res.store, res.sets, res.negatives_dir))

    def StartBenchmark(self, request, context):
        res, run = self.res, prepare(self.res, request.spec)
        margin = user_float(request.margin) or 0.1
        return res.runner.start("benchmark", request, lambda ctx: benchmark_job(
            ctx, run, margin, lambda: res.scorer_for(run.head, run.det, out_of_fold=run.settings.out_of_fold), res.pool))

    def ExportNegatives(self, request, context):
        yield from file_chunks(negatives.negatives_zip(self.res.negatives_dir, job_id_from_name(request.job), request.job))

    def ListDetectors(self, request, context):
        return miner_pb2.ListDetectorsResponse(detectors=[
            miner_pb2.DetectorInfo(model_id=d.info.model_id, class_agnostic=d.info.class_agnostic,
                                   meaningless=d.info.meaningless, available=d.available, note=d.info.note)
            for d in listed_detectors(self.res.models_dir)])

