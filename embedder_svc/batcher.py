"""Dynamic micro-batching across concurrent requests.

Requests from many gRPC handler threads are queued; one worker thread per model concatenates
what is waiting (up to `max_batch` rows), runs the encoder once, and hands each caller its rows.
The worker waits up to `max_wait_s` for more rows only while other callers have *announced*
that a request is on its way (they are decoding or cropping): a lone caller never pays the wait.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np

log = logging.getLogger("minehead.batcher")


class _Request:
    __slots__ = ("items", "future")

    def __init__(self, items: np.ndarray) -> None:
        self.items = items
        self.future: Future = Future()


class MicroBatcher:
    """`fn(batch: N x ...) -> N x ...` run on batches gathered from `submit` calls."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 64, max_wait_s: float = 0.005,
                 name: str = "batcher") -> None:
        self.fn = fn
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max_wait_s
        self._q: queue.Queue[_Request | None] = queue.Queue()
        self._announced = 0
        self._lock = threading.Lock()
        self.batches_run = 0
        self.rows_run = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def announce(self):
        """Wrap the work that prepares a request, so the worker knows more rows are coming."""
        with self._lock:
            self._announced += 1
        try:
            yield
        finally:
            with self._lock:
                self._announced -= 1

    def submit(self, items: np.ndarray) -> Future:
        req = _Request(items)
        if len(items) == 0:
            req.future.set_result(items[:0])
            return req.future
        self._q.put(req)
        return req.future

    def run(self, items: np.ndarray) -> np.ndarray:
        return self.submit(items).result()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            rows = len(first.items)
            deadline = time.perf_counter() + self.max_wait_s
            while rows < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    with self._lock:
                        coming = self._announced > 0
                    remaining = deadline - time.perf_counter()
                    if not coming or remaining <= 0:
                        break
                    try:
                        nxt = self._q.get(timeout=remaining)
                    except queue.Empty:
                        break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
                rows += len(nxt.items)
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            items = np.concatenate([r.items for r in live]) if len(live) > 1 else live[0].items
            outs = [self.fn(items[i:i + self.max_batch]) for i in range(0, len(items), self.max_batch)]
            out = np.concatenate(outs) if len(outs) > 1 else outs[0]
            self.batches_run += len(outs)
            self.rows_run += len(items)
        except BaseException as e:  # noqa: BLE001 - every caller must hear about it
            for r in live:
                r.future.set_exception(e)
            return
        start = 0
        for r in live:
            n = len(r.items)
            r.future.set_result(out[start:start + n])
            start += n
