"""Head service client: training jobs, the registry, scoring. numpy in, protos out."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from minehead.common.v1 import common_pb2
from minehead.core import embeddings as codec
from minehead.core.file_chunks import file_chunks
from minehead.head.v1 import head_pb2, head_pb2_grpc

from minehead.client.channel import ServiceClient
from minehead.client.embedder import boxes_proto, image_ref
from minehead.client.jobs import JobsClient

def chunked(first, data: bytes, wrap):
    """Client-stream messages: `first` (if any), then `data` in 1 MiB FileChunks via `wrap`."""
    if first is not None:
        yield first
    for chunk in file_chunks(data):
        yield wrap(chunk)


class HeadClient(ServiceClient):
    service = "head"

    def __init__(self, address: str | None = None, **kw) -> None:
        super().__init__(address, **kw)
        self.stub = head_pb2_grpc.HeadServiceStub(self.channel)
        self.jobs = JobsClient(self.address, channel=self.channel)

    def start_training(self, spec: head_pb2.TrainingSpec) -> common_pb2.Job:
        return self.stub.StartTraining(head_pb2.StartTrainingRequest(spec=spec), timeout=self.timeout)

    def train(self, spec: head_pb2.TrainingSpec) -> head_pb2.TrainingResult:
        """Start a training job and wait for its result (JobFailed if it does not succeed)."""
        return self.jobs.result(self.start_training(spec).name, head_pb2.TrainingResult)

    def compare(self, request: head_pb2.CompareHeadsRequest) -> common_pb2.Job:
        return self.stub.CompareHeads(request, timeout=self.timeout)

    def list(self, full: bool = False) -> head_pb2.ListHeadsResponse:
        return self.stub.ListHeads(head_pb2.ListHeadsRequest(full=full), timeout=self.timeout)

    def get(self, name: str) -> head_pb2.Head:
        return self.stub.GetHead(head_pb2.GetHeadRequest(name=name), timeout=self.timeout)

    def download(self, name: str) -> bytes:
        return b"".join(c.data for c in self.stub.DownloadHead(head_pb2.DownloadHeadRequest(name=name), timeout=self.timeout))

    def upload(self, data: bytes, display_name: str = "") -> head_pb2.Head:
        first = head_pb2.UploadHeadRequest(display_name=display_name) if display_name else None
        return self.stub.UploadHead(chunked(first, data, lambda c: head_pb2.UploadHeadRequest(chunk=c)), timeout=self.timeout)

    def delete(self, name: str) -> None:
        self.stub.DeleteHead(head_pb2.DeleteHeadRequest(name=name), timeout=self.timeout)

    def upload_dataset(self, zip_bytes: bytes, display_name: str = "") -> head_pb2.Dataset:
        first = head_pb2.UploadDatasetRequest(display_name=display_name) if display_name else None
        return self.stub.UploadDataset(chunked(first, zip_bytes, lambda c: head_pb2.UploadDatasetRequest(chunk=c)),
                                       timeout=self.timeout)

    def get_dataset(self, name: str) -> head_pb2.Dataset:
        return self.stub.GetDataset(head_pb2.GetDatasetRequest(name=name), timeout=self.timeout)

    def export_dataset(self, name: str) -> bytes:
        """A stored dataset ("datasets/{id}") as the zip of its folder."""
        return b"".join(c.data for c in self.stub.ExportDataset(head_pb2.ExportDatasetRequest(name=name), timeout=self.timeout))

    def score_embeddings(self, head: str, X: np.ndarray, target_class: str = "", **thresholds) -> head_pb2.ScoreResponse:
        req = head_pb2.ScoreRequest(head=head, embeddings=codec.to_proto(np.asarray(X, np.float32)), target_class=target_class,
                                    thresholds=head_pb2.Thresholds(**thresholds))
        return self.stub.Score(req, timeout=self.timeout)

    def score_boxes(self, head: str, image: str | Path | bytes, boxes: Iterable, target_class: str = "",
                    ambiguity_margin: float | None = None, **thresholds) -> head_pb2.ScoreResponse:
        req = head_pb2.ScoreRequest(head=head, image_boxes=head_pb2.ImageBoxes(image=image_ref(image), boxes=boxes_proto(boxes)),
                                    target_class=target_class, thresholds=head_pb2.Thresholds(**thresholds))
        if ambiguity_margin is not None:
            req.ambiguity_margin = ambiguity_margin
        return self.stub.Score(req, timeout=self.timeout)
