"""The SQLite job store, the runner, and the Jobs gRPC service (served by head and miner)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from minehead.client.jobs import JobsClient
from minehead.common.v1 import common_pb2
from minehead.core.errors import FailedPrecondition, InvalidArgument, NotFound
from minehead.core.jobs import JobRunner, JobStore, struct_from_dict

S = common_pb2.Job


def _wait(store, jid, timeout=10):
    t0 = time.time()
    while store.get(jid).state not in (S.SUCCEEDED, S.FAILED, S.CANCELLED, S.INTERRUPTED):
        assert time.time() - t0 < timeout, store.get(jid)
        time.sleep(0.01)
    return store.get(jid)


def test_success_records_events_and_result(tmp_path):
    runner = JobRunner(JobStore(tmp_path / "j.sqlite"))

    def fn(ctx):
        ctx.phase("working")
        for i in range(3):
            ctx.progress(i + 1, 3, "things")
        ctx.log("done")
        ctx.metrics({"loss": 0.5})
        return struct_from_dict({"answer": 42})

    job = runner.start("demo", {"x": 1}, fn)
    assert job.name.startswith("jobs/") and job.state == S.QUEUED
    jid = job.name.split("/")[1]
    done = _wait(runner.store, jid)
    assert done.state == S.SUCCEEDED and done.phase == "working"
    assert (done.progress.done, done.progress.total, done.progress.unit) == (3, 3, "things")
    from google.protobuf import struct_pb2

    res = struct_pb2.Struct()
    assert done.result.Unpack(res) and res["answer"] == 42
    assert done.request["x"] == 1
    kinds = [e.WhichOneof("payload") for e in runner.store.events_after(jid, 0)]
    assert kinds == ["state", "state", "phase", "progress", "progress", "progress", "log", "metrics", "state"]
    seqs = [e.seq for e in runner.store.events_after(jid, 0)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_failure_and_cancel_are_distinct(tmp_path):
    runner = JobRunner(JobStore(tmp_path / "j.sqlite"))
    failed = runner.start("demo", None, lambda ctx: (_ for _ in ()).throw(InvalidArgument("bad dataset")))
    f = _wait(runner.store, failed.name[5:])
    assert f.state == S.FAILED and f.error == "bad dataset"

    started = threading.Event()

    def slow(ctx):
        started.set()
        ctx.partial_result = struct_from_dict({"partial": True})
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    job = runner.start("demo", None, slow)
    jid = job.name[5:]
    started.wait(5)
    c = runner.store.request_cancel(jid)
    assert c.state == S.CANCELLING
    done = _wait(runner.store, jid)
    assert done.state == S.CANCELLED and done.error == ""
    assert done.result.type_url.endswith("google.protobuf.Struct")
    with pytest.raises(FailedPrecondition, match="already ended"):
        runner.store.request_cancel(jid)


def test_a_cancel_from_another_process_before_the_job_starts_keeps_it_from_running(tmp_path):
    """Another process sharing the file (its own JobStore) cancels a queued job: when a worker
    takes it, it ends CANCELLED without running, instead of RUNNING over the CANCELLING (the race
    a Label Studio round lost when a second gunicorn worker cancelled it just as it was queued)."""
    runner = JobRunner(JobStore(tmp_path / "j.sqlite"))  # one worker: the second job waits
    other = JobStore(tmp_path / "j.sqlite")
    release, ran = threading.Event(), []
    first = runner.start("demo", None, lambda ctx: release.wait(10) and None)
    queued = runner.start("demo", None, lambda ctx: ran.append(1))
    assert other.request_cancel(queued.name[5:]).state == S.CANCELLING
    release.set()
    assert _wait(runner.store, first.name[5:]).state == S.SUCCEEDED
    done = _wait(runner.store, queued.name[5:])
    assert done.state == S.CANCELLED and not ran


def test_restart_marks_running_jobs_interrupted(tmp_path):
    store = JobStore(tmp_path / "j.sqlite")
    jid = store.create("demo")
    store.append(jid, state=S.RUNNING)
    store.close()
    runner = JobRunner(JobStore(tmp_path / "j.sqlite"))  # a new process starting on the same file
    job = runner.store.get(jid)
    assert job.state == S.INTERRUPTED and "server stopped" in job.error


def test_watch_resumes_after_seq_and_ends_at_final_state(tmp_path):
    store = JobStore(tmp_path / "j.sqlite")
    runner = JobRunner(store)
    gate = threading.Event()

    def fn(ctx):
        ctx.log("one")
        gate.wait(5)
        ctx.log("two")

    job = runner.start("demo", None, fn)
    jid = job.name[5:]
    seen = []
    it = store.watch(jid, 0)
    for ev in it:
        seen.append(ev)
        if ev.WhichOneof("payload") == "log" and ev.log.message == "one":
            break
    gate.set()
    rest = list(store.watch(jid, seen[-1].seq))
    assert [e.seq for e in rest] == list(range(seen[-1].seq + 1, seen[-1].seq + 1 + len(rest)))
    assert rest[-1].state == S.SUCCEEDED
    assert list(store.watch(jid, rest[-1].seq)) == []  # nothing after the end; returns at once


def test_list_pages_newest_first(tmp_path):
    store = JobStore(tmp_path / "j.sqlite")
    ids = [store.create("a" if i % 2 else "b") for i in range(5)]
    page, token = store.list(page_size=2)
    assert [j.name[5:] for j in page] == ids[::-1][:2] and token
    page2, token2 = store.list(page_size=2, page_token=token)
    assert [j.name[5:] for j in page2] == ids[::-1][2:4]
    only_a, _ = store.list(kind="a")
    assert len(only_a) == 2
    with pytest.raises(NotFound):
        store.get("nope")


def test_jobs_service_over_grpc(tmp_path):
    from head_svc.__main__ import build
    from minehead.core.server import start_server
    from tests.conftest import make_config

    cfg = make_config("head", tmp_path)
    runner, bindings = build(cfg)
    server = start_server(cfg, bindings)
    try:
        job = runner.start("demo", {"n": 2}, lambda ctx: [ctx.progress(i, 2, "steps") for i in (1, 2)] and None)
        c = JobsClient(f"127.0.0.1:{server.port}")
        events = list(c.watch(job.name))
        assert events[-1].state == S.SUCCEEDED
        assert c.get(job.name).state == S.SUCCEEDED
        assert [j.name for j in c.list()] == [job.name]
        with pytest.raises(grpc.RpcError) as e:
            c.get("jobs/does-not-exist")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            c.cancel(job.name)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as e:
            c.get("jobs/a/b")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        c.close()
    finally:
        server.stop(0.5)
        runner.shutdown()
