"""minehead.common.v1.JobService for the services that run jobs (head, miner): its gRPC edge
over the JobStore, and the bootstrap that makes a service's store, runner and binding."""

from __future__ import annotations

from minehead.common.v1 import common_pb2, common_pb2_grpc
from minehead.core.config import ServiceConfig
from minehead.core.jobs import JobRunner, JobStore, job_id_from_name
from minehead.core.server import ServiceBinding


class JobServicer(common_pb2_grpc.JobServiceServicer):
    """A thin gRPC edge over the JobStore."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def GetJob(self, request, context):
        return self.store.get(job_id_from_name(request.name))

    def ListJobs(self, request, context):
        jobs, token = self.store.list(request.kind, request.page_size, request.page_token)
        return common_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    def WatchJob(self, request, context):
        yield from self.store.watch(job_id_from_name(request.name), request.after_seq, is_active=context.is_active)

    def CancelJob(self, request, context):
        return self.store.request_cancel(job_id_from_name(request.name))


def jobs_binding(runner: JobRunner) -> ServiceBinding:
    return ServiceBinding(common_pb2_grpc.add_JobServiceServicer_to_server, JobServicer(runner.store), "minehead.common.v1.JobService")


def job_runtime(config: ServiceConfig, max_workers: int = 1) -> tuple[JobRunner, ServiceBinding]:
    """A JobStore under the service's data dir, a runner over it, and the JobService binding."""
    config.service_dir.mkdir(parents=True, exist_ok=True)
    runner = JobRunner(JobStore(config.service_dir / "jobs.sqlite"), max_workers=max_workers)
    return runner, jobs_binding(runner)
