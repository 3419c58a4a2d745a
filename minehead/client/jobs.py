"""Jobs client (served by head and miner): get, list, watch with resume, cancel."""

from __future__ import annotations

import time
from typing import Iterator

import grpc

from minehead.common.v1 import common_pb2, common_pb2_grpc
from minehead.core.jobs import FINAL_STATES as FINAL

from minehead.client.channel import connect

__all__ = ["FINAL", "JobFailed", "JobsClient"]


class JobFailed(RuntimeError):
    """A job that ended in any state but SUCCEEDED; `.job` is its final Job message."""

    def __init__(self, job: common_pb2.Job) -> None:
        super().__init__(f"{job.name} ended {common_pb2.Job.State.Name(job.state)}: {job.error or 'no error given'}")
        self.job = job


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

    def result(self, name: str, result_type):
        """Wait for the job to end and return its result unpacked into a new `result_type`
        message (e.g. head_pb2.TrainingResult); JobFailed unless it SUCCEEDED."""
        for _ in self.watch(name):
            pass
        job = self.get(name)
        if job.state != common_pb2.Job.SUCCEEDED:
            raise JobFailed(job)
        out = result_type()
        job.result.Unpack(out)
        return out

    def close(self) -> None:
        self.channel.close()


def _name(name: str) -> str:
    return name if name.startswith("jobs/") else f"jobs/{name}"
