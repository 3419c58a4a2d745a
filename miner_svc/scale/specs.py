"""What travels between the miner and its Ray workers (`ray_pool` <-> `ray_worker`): one job's
setup, put in Ray's object store once, and each chunk's result. Plain dataclasses of bytes,
numpy arrays and numbers, pickled by reference to this module (every Ray node has the minehead
package installed).

Chunks go out as lists of (key, file name, image bytes): the key is the image's position in the
job (mining) or its index in the folder (drafting).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from miner_svc.recipes.detection_cache import FloorRun


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What a worker builds once per job and keeps (the last few, by `key`).

    model_id: the detector's registry id. head_zip: the head bundle (zip bytes). model: the head
    embedder's `embedder_pb2.Model`, serialized (its weights_sha256 decides whether crop
    embeddings are pooled from the detector's feature map)."""

    key: str
    model_id: str
    head_zip: bytes
    model: bytes


@dataclasses.dataclass(frozen=True)
class DetectSpec(WorkerSetup):
    """Mining's detection phase: the floor run of every prompt on every image of a chunk."""

    floor: float
    prompts: tuple[str, ...]
    out_of_fold: bool = False  # the bound detector's (Detector.with_head)


@dataclasses.dataclass(frozen=True)
class DraftSpec(WorkerSetup):
    """Drafting: a whole Drafter, as the miner builds it.

    recipe_set / options: the RecipeSet and DraftOptions, serialized. embedder: the embedder's
    address (crop embeddings the feature map cannot give). cache_dir: the miner's detection
    cache, read where this node sees it."""

    recipe_set: bytes
    options: bytes
    embedder: str
    cache_dir: str


@dataclasses.dataclass
class DetectedRows:
    """One image detected on a worker.

    runs: prompt -> its FloorRun, as the miner's detection cache keeps it. boxes: M x 4 float32
    XYXY image pixels, the distinct boxes of all runs. vectors: M x D float32 crop embeddings of
    those boxes pooled from the worker's feature map (the head's crop policy), or None where the
    detector's encoder is not the head's embedder."""

    key: int
    runs: dict[str, FloorRun]
    boxes: np.ndarray
    vectors: np.ndarray | None
    failure: str = ""  # an unexpected error on this image (logged on the worker): nothing else is set


@dataclasses.dataclass
class DetectedChunk:
    images: list[DetectedRows]
    passes: dict[str, int]  # the worker's pass counters for the chunk (PassCounters.since)


@dataclasses.dataclass
class DraftedChunk:
    drafted: list[bytes]  # serialized DraftedImages, in the chunk's order
    passes: dict[str, int]
    boxes_embedded: int
    boxes_pooled: int
    warnings: list[str]
    relabelled: int = 0  # look-alikes written as the class the head named (--lookalikes relabel)
    lookalikes_dropped: int = 0  # look-alikes left out (--lookalikes drop)
