"""Bootstrap for services that run jobs (head, miner): a JobStore under the service's data dir,
a runner, and the Jobs gRPC binding."""

from __future__ import annotations

from minehead.core.config import ServiceConfig
from minehead.core.jobs import JobRunner, JobStore
from minehead.core.jobs_servicer import jobs_binding
from minehead.core.server import ServiceBinding


def job_runtime(config: ServiceConfig, max_workers: int = 1) -> tuple[JobRunner, ServiceBinding]:
    config.service_dir.mkdir(parents=True, exist_ok=True)
    runner = JobRunner(JobStore(config.service_dir / "jobs.sqlite"), max_workers=max_workers)
    return runner, jobs_binding(runner)
