"""The backend's state on disk, shared by every process serving one --data-dir.

    state = StateFile(DATA_DIR / "state.json")
    state.read()              the current dict (re-read only when the file changed)
    with state.update() as s: read-modify-write under an exclusive lock; written atomically
    lock = RunnerLock(DATA_DIR / "runner.lock"); lock.try_acquire()

gunicorn may run several worker processes. Each keeps its own Backend, so anything two workers
must agree on (the model version, the annotation counters, the rounds waiting to run) lives in
state.json, and every change is a locked read-modify-write: two webhooks in two workers cannot
lose each other's counts. Readers never lock: the file is replaced atomically (os.replace), so a
reader sees the old or the new version, never half of one: the serving model version only moves
when a round's set is complete.

Rounds run in one process only, the one holding RunnerLock (an flock on a file: the kernel drops
it when the holder dies, kill -9 included, so another worker or a restart can take over and mark
what the dead one was running INTERRUPTED).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from pathlib import Path


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.Lock()  # flock is per open file: threads of one process queue here first
        self._stamp: tuple | None = None
        self._data: dict = {}

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> dict:
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self._data = json.loads(self.path.read_text(encoding="utf-8"))
            self._stamp = stamp
        return self._data

    def read(self) -> dict:
        with self._mutex:
            return self._load()

    @contextlib.contextmanager
    def update(self):
        with self._mutex, open(self._lock_path, "a+") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            self._stamp = None  # another process may have written within the same mtime tick
            data = json.loads(json.dumps(self._load()))  # a copy: a failed update changes nothing
            yield data
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
            os.replace(tmp, self.path)
            self._data, self._stamp = data, self._stat()


class RunnerLock:
    """Held by the one process that runs rounds; released by the kernel when that process dies."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f = None

    @property
    def held(self) -> bool:
        return self._f is not None

    def try_acquire(self) -> bool:
        if self._f is not None:
            return True
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._f = f
        return True

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file drops the flock
            self._f = None
