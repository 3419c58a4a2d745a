"""Single flight: concurrent callers that need the same expensive value share one computation.

    flights = SingleFlight()
    fmap = flights.do((model_id, image_sha256), lambda: encoder_pass(image))

While a call for a key is running, every other call for that key waits for it and gets the
same value, or the same exception. Nothing is remembered once the call finishes (a cache is a
separate concern: check it first, and put into it inside `fn`), so finished keys never pile up
and a failure is not replayed to later callers: the next call after a failure tries again.

For batching several keys into one pass, claim them first and compute only the ones you lead:

    flights_ = [flights.claim(k) for k in keys]
    mine = [f for f in flights_ if f.leader]
    try:
        values = encode_batch([...for f in mine...])
    except BaseException as e:
        for f in mine: f.fail(e)
        raise
    for f, v in zip(mine, values): f.resolve(v)
    results = [f.result() for f in flights_]

Resolve (or fail) everything you lead *before* waiting on flights led by others; two callers
then never wait on each other. A leader that forgets to finish would strand its waiters, so
prefer `do` (which always finishes) where one key is enough.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class Flight(Generic[T]):
    """One caller's handle on a key: `leader` says whether this caller must compute it."""

    __slots__ = ("key", "leader", "_future", "_owner")

    def __init__(self, owner: "SingleFlight", key: Hashable, future: Future, leader: bool) -> None:
        self._owner = owner
        self.key = key
        self.leader = leader
        self._future = future

    def resolve(self, value: T) -> None:
        self._finish(lambda: self._future.set_result(value))

    def fail(self, error: BaseException) -> None:
        self._finish(lambda: self._future.set_exception(error))

    def result(self, timeout: float | None = None) -> T:
        """The shared value; raises the leader's exception; TimeoutError after `timeout` s."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def _finish(self, settle: Callable[[], None]) -> None:
        if not self.leader:
            raise RuntimeError("only the leader of a flight may finish it")
        # Forget the key before waking waiters: a caller arriving after the value is known
        # must start afresh (and normally finds the value in the caller's cache instead).
        self._owner._forget(self.key, self._future)
        if not self._future.done():
            settle()


class SingleFlight:
    """Thread-safe; one instance per kind of value (its keys must not collide)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future] = {}
        self.started = 0  # computations run (leaders)
        self.joined = 0  # callers that shared a running computation instead

    def claim(self, key: Hashable) -> Flight:
        """Lead the key if no one is computing it, else follow the running computation."""
        with self._lock:
            fut = self._running.get(key)
            if fut is not None:
                self.joined += 1
                return Flight(self, key, fut, leader=False)
            fut = Future()
            fut.set_running_or_notify_cancel()
            self._running[key] = fut
            self.started += 1
            return Flight(self, key, fut, leader=True)

    def do(self, key: Hashable, fn: Callable[[], T]) -> T:
        """fn() once for all concurrent callers of `key`; each gets its value or its exception."""
        flight = self.claim(key)
        if flight.leader:
            try:
                value = fn()
            except BaseException as e:
                flight.fail(e)
                raise
            flight.resolve(value)
            return value
        return flight.result()

    def in_flight(self) -> int:
        """Keys being computed now (0 when idle: finished keys are never kept)."""
        with self._lock:
            return len(self._running)

    def _forget(self, key: Hashable, fut: Future) -> None:
        with self._lock:
            if self._running.get(key) is fut:
                del self._running[key]
