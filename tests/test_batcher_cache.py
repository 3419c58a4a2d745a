"""The micro-batcher gathers rows across concurrent callers; the LRU cache stays within bytes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from embedder_svc.batcher import MicroBatcher
from embedder_svc.cache import LRUCache


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    calls = []

    def fn(x):
        calls.append(len(x))
        time.sleep(0.02)  # an encoder pass: requests pile up meanwhile
        return x * 2

    b = MicroBatcher(fn, max_batch=64, max_wait_s=0.05)
    results = {}

    def client(i):
        with b.announce():
            time.sleep(0.001)
            fut = b.submit(np.full((3, 2), i, np.float32))
        results[i] = fut.result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    for i in range(16):
        assert np.all(results[i] == 2 * i) and results[i].shape == (3, 2)
    assert sum(calls) == 48
    assert len(calls) < 16, f"expected shared batches, got {calls}"
    assert max(calls) <= 64


def test_lone_request_does_not_wait():
    b = MicroBatcher(lambda x: x, max_batch=64, max_wait_s=1.0)
    t0 = time.perf_counter()
    b.run(np.zeros((1, 1)))
    assert time.perf_counter() - t0 < 0.5
    b.close()


def test_large_request_is_split_to_max_batch():
    sizes = []
    b = MicroBatcher(lambda x: (sizes.append(len(x)), x)[1], max_batch=8)
    out = b.run(np.arange(20).reshape(20, 1))
    b.close()
    assert sizes == [8, 8, 4]
    assert np.array_equal(out[:, 0], np.arange(20))


def test_errors_reach_every_caller():
    def boom(x):
        raise RuntimeError("encoder exploded")

    b = MicroBatcher(boom, max_batch=8)
    with pytest.raises(RuntimeError, match="exploded"):
        b.run(np.zeros((2, 1)))
    # and the worker survives
    b.fn = lambda x: x + 1
    assert b.run(np.zeros((1, 1)))[0, 0] == 1
    b.close()


def test_lru_cache_evicts_by_bytes():
    c = LRUCache(max_bytes=3 * 400)
    for i in range(5):
        c.put(i, np.zeros(100, np.float32))
    assert len(c) == 3 and c.get(0) is None and c.get(4) is not None
    c.get(2)
    c.put(9, np.zeros(100, np.float32))
    assert c.get(2) is not None and c.get(3) is None
    assert c.nbytes <= 1200


def test_cache_files_are_read_one_at_a_time(tmp_path, monkeypatch):
    """minehead.core.npz.load_arrays: np.load parses headers with ast.literal_eval, which CPython
    3.11 cannot run in two threads at once (python/cpython#106905: a SystemError failed a
    training's parallel feature-map reads once). Every cache read goes through it, one at a time,
    and returns the arrays themselves (usable after the file is closed)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from minehead.core import npz

    path = tmp_path / "a.npz"
    np.savez(path, fmap=np.arange(12, dtype=np.float32).reshape(3, 4), frame=np.array([40, 30, 64]))
    state = {"open": 0, "most": 0}
    lock = threading.Lock()
    real = np.load

    def load(*a, **k):
        with lock:
            state["open"] += 1
            state["most"] = max(state["most"], state["open"])
        time.sleep(0.01)
        with lock:
            state["open"] -= 1
        return real(*a, **k)

    monkeypatch.setattr(np, "load", load)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: npz.load_arrays(path, "fmap", "frame"), range(12)))
    assert state["most"] == 1
    assert all(np.array_equal(f, np.arange(12).reshape(3, 4)) and list(g) == [40, 30, 64] for f, g in got)
