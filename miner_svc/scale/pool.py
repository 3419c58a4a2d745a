"""The one seam between the miner and where its per-image work runs.

    pool = LocalPool()                      # in this process (the default)
    pool = RayPool(address, ...)            # on Ray workers (--ray-address), ray_pool.py

chosen once, when the miner starts (`miner_svc.__main__.build`). Mining's detection phase calls
`pool.detect`, drafting calls `pool.draft`; neither asks where the work runs, and both pools
leave the miner's caches and counters as the in-process run would: what a worker computes is
stored in the miner's detection cache, its pass counters added to the miner's.

Both methods are generators, cancelled through `ctx` (checked before each image, and while
waiting on workers) and closed by their caller when it stops early.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol

from minehead.core.images import decode_image
from minehead.core.jobs import JobContext
from minehead.heads.bundle import HeadBundle
from minehead.miner.v1 import drafting_pb2

from miner_svc.detectors.base import ImageState
from miner_svc.recipes.drafter import Drafter
from miner_svc.recipes.detection_cache import CachedDetector

log = logging.getLogger("minehead.mining")

ImageToDetect = tuple[int, str, Path]  # (position in the job, file name, path)
ImageToDraft = tuple[int, Path]  # (index in the folder, path)


class DetectedImage(NamedTuple):
    """An image whose floor runs for every prompt are in the detection cache, or, with
    `failure` set (the error's type and message), one whose detection raised an unexpected
    error: logged with its traceback where it happened, left out of mining, counted in the
    run's summary."""

    position: int
    data: bytes  # the image file's bytes
    state: ImageState | None
    failure: str = ""


class DraftedFile(NamedTuple):
    index: int
    path: Path
    drafted: drafting_pb2.DraftedImage  # `error` set when the image could not be read or decoded


class ImagePool(Protocol):
    def detect(self, ctx: JobContext, det: CachedDetector, head: HeadBundle, model,
               images: list[ImageToDetect], prompts: list[str]) -> Iterator[DetectedImage]:
        """Mining's detection phase: the floor run of every prompt on every image, stored in
        `det`. model: the head embedder's embedder_pb2.Model. Yields each image as it is ready,
        in any order."""

    def draft(self, ctx: JobContext, drafter: Drafter, images: list[ImageToDraft]) -> Iterator[DraftedFile]:
        """Drafting's per-image work. Yields each image as it is drafted, in any order; the
        drafter's counters and warnings include the work wherever it ran."""

    def close(self) -> None:
        ...


class LocalPool:
    """Everything in the miner's process, one image after another, in order."""

    def detect(self, ctx: JobContext, det: CachedDetector, head: HeadBundle, model,
               images: list[ImageToDetect], prompts: list[str]) -> Iterator[DetectedImage]:
        for k, name, path in images:
            ctx.check_cancelled()
            data = path.read_bytes()
            state = det.set_image(decode_image(data, name))
            try:
                for p in prompts:
                    det.text(state, p)  # the one floor run per (image, prompt)
            except Exception as e:  # noqa: BLE001 - one image never fails the job
                yield DetectedImage(k, data, None, failure(name, e))
                continue
            yield DetectedImage(k, data, state)

    def draft(self, ctx: JobContext, drafter: Drafter, images: list[ImageToDraft]) -> Iterator[DraftedFile]:
        for i, p in images:
            ctx.check_cancelled()
            yield DraftedFile(i, p, read_and_draft(drafter, i, p))

    def close(self) -> None:
        pass


def failure(name: str, e: Exception) -> str:
    """An unexpected error on one image, logged with its traceback: its type and message."""
    log.exception("detecting %s failed", name)
    return f"{type(e).__name__}: {e}"


def unreadable(index: int, path: Path, e: OSError) -> drafting_pb2.DraftedImage:
    return drafting_pb2.DraftedImage(image=path.name, index=index, error=f"unreadable: {e.strerror}")


def read_and_draft(drafter: Drafter, index: int, path: Path) -> drafting_pb2.DraftedImage:
    try:
        data = path.read_bytes()
    except OSError as e:
        return unreadable(index, path, e)
    return drafter.draft(data, path.name, index)
