"""Long-running jobs: an SQLite store with a per-job event log, and a runner.

A job function receives a `JobContext` and reports through it (phase, progress, log lines,
metrics); it checks `ctx.check_cancelled()` at its safe points. The runner records the outcome:
SUCCEEDED with the function's result message, CANCELLED (never FAILED) when it stopped on
request, FAILED with the error in words otherwise. Every change is an event with a per-job
sequence number, so a watcher can reconnect and resume with `after_seq`.

Because state lives in SQLite, a restarted server finds jobs that were running when it died and
marks them INTERRUPTED instead of forgetting them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from google.protobuf import any_pb2, json_format, message, struct_pb2, timestamp_pb2

from minehead.common.v1 import common_pb2
from minehead.core.errors import Cancelled, FailedPrecondition, Interrupted, InvalidArgument, MineheadError, NotFound

log = logging.getLogger("minehead.jobs")

State = common_pb2.Job.State
FINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.INTERRUPTED})
_LIVE_STATES = (State.QUEUED, State.RUNNING, State.CANCELLING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  state INTEGER NOT NULL,
  create_time REAL NOT NULL,
  update_time REAL NOT NULL,
  phase TEXT NOT NULL DEFAULT '',
  done INTEGER NOT NULL DEFAULT 0,
  total INTEGER NOT NULL DEFAULT 0,
  unit TEXT NOT NULL DEFAULT '',
  error TEXT NOT NULL DEFAULT '',
  result BLOB,
  request TEXT NOT NULL DEFAULT '{}',
  last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (create_time DESC);
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  payload BLOB NOT NULL,
  PRIMARY KEY (job_id, seq)
);
"""


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def job_id_from_name(name: str) -> str:
    """'jobs/abc' or 'abc' -> 'abc'."""
    jid = name[len("jobs/"):] if name.startswith("jobs/") else name
    if not jid or "/" in jid:
        raise InvalidArgument(f"job name {name!r} is not of the form 'jobs/{{id}}'")
    return jid


class JobStore:
    """Jobs and their events in one SQLite file. Thread-safe; watchers wait on a condition."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._cancel_requested: set[str] = set()

    # -- writes ---------------------------------------------------------------------------
    def create(self, kind: str, request: dict | None = None) -> str:
        jid = uuid.uuid4().hex
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, state, create_time, update_time, request) VALUES (?,?,?,?,?,?)",
                (jid, kind, State.QUEUED, now, now, json.dumps(request or {}, default=str)),
            )
            self._append(jid, state=State.QUEUED)
        return jid

    def append(self, jid: str, **payload) -> int:
        """Record one event (exactly one payload keyword: phase, progress, log, metrics, state)
        and update the job row to match. Returns the event's sequence number."""
        with self._lock:
            return self._append(jid, **payload)

    def _append(self, jid: str, **payload) -> int:
        (key, value), = payload.items()
        row = self._db.execute("SELECT last_seq FROM jobs WHERE id=?", (jid,)).fetchone()
        if row is None:
            raise NotFound(f"job 'jobs/{jid}' not found")
        seq = row[0] + 1
        now = time.time()
        ev = common_pb2.JobEvent(seq=seq, time=_ts(now), job=f"jobs/{jid}")
        sets = {"last_seq": seq, "update_time": now}
        if key == "phase":
            ev.phase = value
            sets["phase"] = value
        elif key == "progress":
            ev.progress.CopyFrom(value)
            sets.update(done=value.done, total=value.total, unit=value.unit)
        elif key == "log":
            ev.log.CopyFrom(value)
        elif key == "metrics":
            ev.metrics.update(value)
        elif key == "state":
            ev.state = value
            sets["state"] = value
        else:
            raise ValueError(f"unknown event payload {key}")
        self._db.execute("INSERT INTO events (job_id, seq, payload) VALUES (?,?,?)", (jid, seq, ev.SerializeToString()))
        cols = ", ".join(f"{k}=?" for k in sets)
        self._db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*sets.values(), jid))
        self._changed.notify_all()
        return seq

    def finish(self, jid: str, state: int, *, error: str = "", result: message.Message | None = None) -> None:
        with self._lock:
            blob = None
            if result is not None:
                anyr = any_pb2.Any()
                anyr.Pack(result)
                blob = anyr.SerializeToString()
            self._db.execute("UPDATE jobs SET error=?, result=COALESCE(?, result) WHERE id=?", (error, blob, jid))
            self._append(jid, state=state)
            self._cancel_requested.discard(jid)

    def request_cancel(self, jid: str) -> common_pb2.Job:
        with self._lock:
            job = self.get(jid)
            if job.state in FINAL_STATES:
                raise FailedPrecondition(f"job 'jobs/{jid}' already ended ({State.Name(job.state)}); nothing to cancel")
            # the set too when already CANCELLING: another process sharing the file may have asked
            self._cancel_requested.add(jid)
            if job.state != State.CANCELLING:
                self._append(jid, state=State.CANCELLING)
            return self.get(jid)

    def mark_running(self, jid: str) -> bool:
        """QUEUED -> RUNNING, unless a cancel was asked first: here, or by another process sharing
        the file (its CANCELLING state; that process's own set of requests is not seen here). One
        write transaction, so such a cancel lands either before (False: the job must not run) or
        after (the running job sees CANCELLING), never overwritten by RUNNING."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT state FROM jobs WHERE id=?", (jid,)).fetchone()
                if row is None:
                    raise NotFound(f"job 'jobs/{jid}' not found")
                go = row[0] != State.CANCELLING and jid not in self._cancel_requested
                if go:
                    self._append(jid, state=State.RUNNING)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return go

    def cancel_requested(self, jid: str) -> bool:
        with self._lock:
            return jid in self._cancel_requested

    def mark_interrupted(self) -> list[str]:
        """At server start: jobs left live by a previous process are INTERRUPTED."""
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(_LIVE_STATES))})", _LIVE_STATES)]
            for jid in ids:
                self._db.execute("UPDATE jobs SET error=? WHERE id=?", ("the server stopped while this job ran", jid))
                self._append(jid, log=common_pb2.LogLine(level=common_pb2.LogLine.WARNING, message="server restarted: job interrupted"))
                self._append(jid, state=State.INTERRUPTED)
        return ids

    # -- reads ----------------------------------------------------------------------------
    def get(self, jid: str) -> common_pb2.Job:
        with self._lock:
            row = self._db.execute(
                "SELECT id, kind, state, create_time, update_time, phase, done, total, unit, error, result, request, last_seq "
                "FROM jobs WHERE id=?", (jid,)).fetchone()
        if row is None:
            raise NotFound(f"job 'jobs/{jid}' not found")
        return self._to_proto(row)

    def list(self, kind: str = "", page_size: int = 50, page_token: str = "") -> tuple[list[common_pb2.Job], str]:
        page_size = page_size if 0 < page_size <= 1000 else 50
        try:
            offset = int(page_token or 0)
        except ValueError:
            raise InvalidArgument(f"page_token {page_token!r} is not one this server issued") from None
        q = ("SELECT id, kind, state, create_time, update_time, phase, done, total, unit, error, result, request, last_seq "
             "FROM jobs {} ORDER BY create_time DESC LIMIT ? OFFSET ?")
        with self._lock:
            if kind:
                rows = self._db.execute(q.format("WHERE kind=?"), (kind, page_size + 1, offset)).fetchall()
            else:
                rows = self._db.execute(q.format(""), (page_size + 1, offset)).fetchall()
        more = len(rows) > page_size
        return [self._to_proto(r) for r in rows[:page_size]], (str(offset + page_size) if more else "")

    def events_after(self, jid: str, after_seq: int) -> list[common_pb2.JobEvent]:
        with self._lock:
            rows = self._db.execute("SELECT payload FROM events WHERE job_id=? AND seq>? ORDER BY seq", (jid, after_seq)).fetchall()
        return [common_pb2.JobEvent.FromString(r[0]) for r in rows]

    def watch(self, jid: str, after_seq: int = 0, *, is_active: Callable[[], bool] = lambda: True,
              poll_s: float = 0.5) -> Iterator[common_pb2.JobEvent]:
        """Events after `after_seq`, then live ones; ends after the event of a final state."""
        self.get(jid)  # NOT_FOUND early
        seq = after_seq
        while is_active():
            events = self.events_after(jid, seq)
            for ev in events:
                seq = ev.seq
                yield ev
                if ev.WhichOneof("payload") == "state" and ev.state in FINAL_STATES:
                    return
            if not events:
                if self.get(jid).state in FINAL_STATES and not self.events_after(jid, seq):
                    return  # after_seq was past the final event
                with self._lock:
                    if self._db.execute("SELECT last_seq FROM jobs WHERE id=?", (jid,)).fetchone()[0] <= seq:
                        self._changed.wait(poll_s)

    @staticmethod
    def _to_proto(row) -> common_pb2.Job:
        (jid, kind, state, ct, ut, phase, done, total, unit, error, result, request, last_seq) = row
        job = common_pb2.Job(
            name=f"jobs/{jid}", kind=kind, state=state, create_time=_ts(ct), update_time=_ts(ut), phase=phase,
            progress=common_pb2.Progress(done=done, total=total, unit=unit), error=error, last_event_seq=last_seq,
        )
        if result:
            job.result.ParseFromString(result)
        try:
            job.request.update(json.loads(request))
        except (ValueError, TypeError):
            pass
        return job

    def close(self) -> None:
        with self._lock:
            self._db.close()


class JobContext:
    """What a running job sees: report progress, check for cancellation, keep partial results."""

    def __init__(self, store: JobStore, jid: str) -> None:
        self.store = store
        self.job_id = jid
        self.partial_result: message.Message | None = None

    @property
    def name(self) -> str:
        return f"jobs/{self.job_id}"

    def phase(self, name: str) -> None:
        self.check_cancelled()
        self.store.append(self.job_id, phase=name)

    def progress(self, done: int, total: int = 0, unit: str = "") -> None:
        self.store.append(self.job_id, progress=common_pb2.Progress(done=done, total=total, unit=unit))

    def log(self, msg: str, level: int = common_pb2.LogLine.INFO) -> None:
        self.store.append(self.job_id, log=common_pb2.LogLine(level=level, message=msg))

    def warn(self, msg: str) -> None:
        self.log(msg, common_pb2.LogLine.WARNING)

    def metrics(self, values: dict) -> None:
        self.store.append(self.job_id, metrics=values)

    def check_cancelled(self) -> None:
        """Raise Cancelled if a cancel was requested. Call at safe points."""
        if self.store.cancel_requested(self.job_id):
            raise Cancelled("cancelled on request")


JobFn = Callable[[JobContext], message.Message | None]


class JobRunner:
    """Runs job functions on a small thread pool and records their outcome in the store."""

    def __init__(self, store: JobStore, max_workers: int = 1, mark_interrupted: bool = True) -> None:
        """mark_interrupted=False: the caller decides when no other process runs jobs of the store."""
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="job")
        interrupted = store.mark_interrupted() if mark_interrupted else []
        if interrupted:
            log.warning("marked %d job(s) INTERRUPTED after a restart", len(interrupted))

    def start(self, kind: str, request: dict | message.Message | None, fn: JobFn) -> common_pb2.Job:
        if isinstance(request, message.Message):
            request = json_format.MessageToDict(request, preserving_proto_field_name=True)
        jid = self.store.create(kind, request)
        job = self.store.get(jid)  # the QUEUED snapshot, before the worker can move it on
        self._pool.submit(self._run, jid, fn)
        return job

    def _run(self, jid: str, fn: JobFn) -> None:
        ctx = JobContext(self.store, jid)
        try:
            if not self.store.mark_running(jid):
                raise Cancelled(f"job {jid} cancelled before it started")
            result = fn(ctx)
            ctx.check_cancelled()
            self.store.finish(jid, State.SUCCEEDED, result=result)
        except Interrupted as e:
            ctx.log(str(e), common_pb2.LogLine.WARNING)
            self.store.finish(jid, State.INTERRUPTED, error=str(e), result=ctx.partial_result)
        except Cancelled:
            ctx.log("cancelled on request; partial results kept" if ctx.partial_result is not None else "cancelled on request")
            self.store.finish(jid, State.CANCELLED, result=ctx.partial_result)
        except MineheadError as e:
            ctx.log(str(e), common_pb2.LogLine.ERROR)
            self.store.finish(jid, State.FAILED, error=str(e), result=ctx.partial_result)
        except Exception as e:  # noqa: BLE001 - a job must always reach a final state
            if hasattr(e, "code") and hasattr(e, "details"):  # a gRPC error from a service the job called
                msg = f"{e.code().name}: {e.details()}"
            else:
                log.exception("job %s failed", jid)
                msg = f"{type(e).__name__}: {e}"
            ctx.log(msg, common_pb2.LogLine.ERROR)
            self.store.finish(jid, State.FAILED, error=msg, result=ctx.partial_result)

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def struct_from_dict(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(json.loads(json.dumps(d, default=str)))
    return s
