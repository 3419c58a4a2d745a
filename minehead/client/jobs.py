"""Jobs client (served by head and miner): get, list, watch with resume, cancel."""

from __future__ import annotations

import time
from typing import Iterator

import grpc

from minehead.common.v1 import common_pb2, common_pb2_grpc
from minehead.core.jobs import FINAL_STATES as FINAL

from minehead.client.channel import connect

__all__ = ["FINAL", "JobsClient"]



class JobsClient:
    def __init__(self, address: str, *, channel: grpc.Channel | None = None, **connect_kw) -> None:
        self.channel = channel or connect(address, **connect_kw)
        self.stub = common_pb2_grpc.JobServiceStub(self.channel)

    def get(self, name: str) -> common_pb2.Job:
        return self.stub.GetJob(common_pb2.GetJobRequest(name=_name(name)))

    def list(self, kind: str = "", page_size: int = 50) -> list[common_pb2.Job]:
        return list(self.stub.ListJobs(common_pb2.ListJobsRequest(kind=kind, page_size=page_size)).jobs)

    def cancel(self, name: str) -> common_pb2.Job:
        return self.stub.CancelJob(common_pb2.CancelJobRequest(name=_name(name)))

    def watch(self, name: str, after_seq: int = 0, *, retries: int = 5) -> Iterator[common_pb2.JobEvent]:
        """Events until the job ends. A dropped stream (UNAVAILABLE) is resumed after the last
        event seen, up to `retries` times in a row with backoff; events are never repeated."""
        seq, failures = after_seq, 0
        while True:
            try:
                for ev in self.stub.WatchJob(common_pb2.WatchJobRequest(name=_name(name), after_seq=seq)):
                    seq, failures = ev.seq, 0
                    yield ev
                return
            except grpc.RpcError as e:
                failures += 1
                if e.code() != grpc.StatusCode.UNAVAILABLE or failures > retries:
                    raise
                time.sleep(min(0.2 * 2 ** failures, 5.0))

    def close(self) -> None:
        self.channel.close()


def _name(name: str) -> str:
    return name if name.startswith("jobs/") else f"jobs/{name}"
