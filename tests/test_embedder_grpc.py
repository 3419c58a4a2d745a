"""The embedder over real gRPC: every backend, caching, and clear errors for bad input."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from minehead.client.embedder import EmbedderClient
from minehead.crops import CropPolicy
from minehead.core.images import decode_image
from tests.conftest import TINY_IDS, jpeg_bytes, png_bytes, scene, start_embedder
from embedder_svc.minisam import DIM as MINISAM_DIM


@pytest.fixture(scope="module")
def client(embedder_server):
    with EmbedderClient(embedder_server.address) as c:
        yield c


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_default_model_is_minisam_and_crops_are_normalised(client, embedder_server):
    img = scene(seed=1)
    boxes = [[40, 30, 140, 110], [200, 100, 300, 200], [0, 0, 20, 20]]
    resp = client.embed_crops_raw(jpeg_bytes(img), boxes)
    assert resp.model.model_id == "minisam-tinyvit" and resp.model.dim == MINISAM_DIM
    assert len(resp.model.weights_sha256) == 64
    from minehead.core import embeddings

    v = embeddings.from_proto(resp.embeddings)
    assert v.shape == (3, MINISAM_DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert resp.crop_policy.padding_ratio == pytest.approx(0.08)
    # The same image and boxes again come from the cache, bit for bit.
    again = client.embed_crops_raw(jpeg_bytes(img), boxes)
    assert again.cache_hits == 3
    np.testing.assert_array_equal(embeddings.from_proto(again.embeddings), v)
    # And they equal the in-process library's answer (the service adds nothing but transport).
    local, _, _, _ = embedder_server.embedder.embed_crops(decode_image(jpeg_bytes(img)), np.array(boxes, float), CropPolicy())
    np.testing.assert_allclose(local, v, atol=1e-6)


def test_minisam_crops_tell_colours_apart(client):
    """Real pretrained features: two red squares are closer to each other than to a blue one."""
    img = scene(seed=2, boxes=((20, 20, 80, 80), (120, 20, 180, 80), (220, 20, 280, 80)),
                colours=((220, 30, 30), (225, 35, 25), (30, 40, 220)))
    v = client.embed_crops(png_bytes(img), [[20, 20, 80, 80], [120, 20, 180, 80], [220, 20, 280, 80]])
    assert v[0] @ v[1] > v[0] @ v[2]


def test_embed_images_minisam(client):
    imgs = [png_bytes(scene(seed=s)) for s in range(2)]
    v = client.embed_images(imgs)
    assert v.shape == (2, MINISAM_DIM)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("model_id", TINY_IDS)
def test_torch_backends_over_grpc(client, model_id):
    img = png_bytes(scene(seed=3))
    v = client.embed_crops(img, [[40, 30, 140, 110], [10, 10, 60, 60]], model=model_id)
    assert v.shape[0] == 2 and v.shape[1] in (24, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    w = client.embed_images([img, img], model=model_id)
    np.testing.assert_allclose(w[0], w[1], atol=1e-6)
    m = client.get_model(model_id, load=True)
    assert m.loaded and m.dim == v.shape[1] and m.preprocessing.input_size == 32 and len(m.weights_sha256) == 64


@pytest.mark.parametrize("model_id", ["open_clip:tiny-clip/random", "hf-clip:tiny/clip"])
def test_text_embeddings_for_clip_models(client, model_id):
    t = client.embed_text(["a red car", "a dog", "a red car"], model=model_id)
    assert t.shape[0] == 3
    np.testing.assert_allclose(t[0], t[2], atol=1e-6)
    assert not np.allclose(t[0], t[1])


def test_list_models_shows_local_models_before_loading(client):
    models = {m.id: m for m in client.list_models()}
    assert {"minisam-tinyvit", *TINY_IDS} <= set(models)
    assert models["minisam-tinyvit"].is_default and models["minisam-tinyvit"].dim == MINISAM_DIM


def test_bad_inputs_get_clear_codes_and_server_keeps_serving(client):
    img = png_bytes(scene())
    cases = [
        (lambda: client.embed_crops(b"", [[0, 0, 5, 5]]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (lambda: client.embed_crops(b"garbage!", [[0, 0, 5, 5]]), grpc.StatusCode.INVALID_ARGUMENT, "not a recognised image"),
        (lambda: client.embed_crops(jpeg_bytes(scene())[:200], [[0, 0, 5, 5]]), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (lambda: client.embed_crops(img, [[10, 10, 10, 50]]), grpc.StatusCode.INVALID_ARGUMENT, "zero or negative area"),
        (lambda: client.embed_crops(img, [[1000, 10, 1100, 50]]), grpc.StatusCode.INVALID_ARGUMENT, "outside"),
        (lambda: client.embed_crops(img, []), grpc.StatusCode.INVALID_ARGUMENT, "no boxes"),
        (lambda: client.embed_images([]), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        (lambda: client.embed_crops(img, [[0, 0, 5, 5]], model="no-such-model"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lambda: client.embed_text(["x"]), grpc.StatusCode.INVALID_ARGUMENT, "no text tower"),
        (lambda: client.embed_text(["x"], model="dinov3:tiny/dinov3"), grpc.StatusCode.INVALID_ARGUMENT, "no text tower"),
    ]
    for call, code, words in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code, (words, e.value.details())
        assert words in e.value.details()
    assert client.embed_crops(img, [[0, 0, 50, 50]]).shape == (1, MINISAM_DIM)


@pytest.mark.parametrize("model_id,words", [
    ("hf-clip:openai/clip-vit-base-patch32", "save_pretrained folder"),
    ("dinov3:facebook/dinov3-vits16-pretrain-lvd1689m", "not available"),
    ("open_clip:ViT-B-32/laion2b_s34b_b79k", "ViT-B-32/laion2b_s34b_b79k.safetensors"),
])
def test_missing_weights_are_failed_precondition_naming_the_fix(client, model_id, words):
    with pytest.raises(grpc.RpcError) as e:
        client.embed_crops(png_bytes(scene()), [[0, 0, 50, 50]], model=model_id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert model_id.split(":")[1].split("/")[0] in e.value.details() and words in e.value.details()


def test_paths_only_under_allowed_roots(embedder_server, tmp_path):
    from minehead.common.v1 import common_pb2
    from minehead.embedder.v1 import embedder_pb2

    inside = embedder_server.data_dir / "in.png"
    inside.write_bytes(png_bytes(scene()))
    outside = tmp_path / "out.png"
    outside.write_bytes(png_bytes(scene()))
    with EmbedderClient(embedder_server.address) as c:
        ok = c.stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=[common_pb2.ImageRef(path=str(inside))]))
        assert ok.embeddings.count == 1
        with pytest.raises(grpc.RpcError) as e:
            c.stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=[common_pb2.ImageRef(path=str(outside))]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "allowed roots" in e.value.details()


def test_oversize_message_is_resource_exhausted(tmp_path, models_dir):
    r = start_embedder(tmp_path, models_dir, max_message_mb=1)
    try:
        with EmbedderClient(r.address) as c:
            big = np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)
            with pytest.raises(grpc.RpcError) as e:
                c.embed_images([png_bytes(big)])
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.embed_crops(png_bytes(scene()), [[0, 0, 50, 50]]).shape == (1, MINISAM_DIM)
    finally:
        r.stop()


def test_concurrent_clients_through_the_batcher(embedder_server):
    """8 clients at once through one model's batcher: every caller gets its own rows back.
    (That batches form is tested deterministically in test_batcher_cache.)"""
    import threading

    from minehead.encoders.export import export_vision_tower

    export_vision_tower("open_clip:tiny-clip/random", "tiny-clip-batched", embedder_server.embedder.models_dir)
    lm = embedder_server.embedder.model("tiny-clip-batched")
    rows_before = lm.vectors.rows_run
    errors = []
    local = embedder_server.embedder

    def work(i):
        try:
            with EmbedderClient(embedder_server.address) as c:
                for j in range(4):
                    data = png_bytes(scene(64, 64, seed=100 + 10 * i + j))
                    got = c.embed_images([data], model="tiny-clip-batched")
                    want = local.model("tiny-clip-batched").encoder.encode(
                        local_prepare(local, data))
                    want /= np.linalg.norm(want, axis=1, keepdims=True)
                    np.testing.assert_allclose(got, want, atol=1e-5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert lm.vectors.rows_run - rows_before == 32


def local_prepare(embedder, data):
    from minehead import crops

    lm = embedder.model("tiny-clip-batched")
    pre = lm.info.preprocessing
    return crops.prepare_image(decode_image(data).pixels, pre.input_size, pre.resize, lm.pad_value)[0][None]


def test_unreachable_hub_fails_fast_with_the_reason(models_dir, monkeypatch):
    """Not offline, but no route to the hub: one quick probe, then FAILED_PRECONDITION (no retries)."""
    import time

    from embedder_svc.embedder import Embedder
    from minehead.encoders import registry
    from minehead.core.errors import ModelUnavailable

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setattr(registry, "_hub_probe", None)
    e = Embedder(models_dir, offline=False)
    t0 = time.perf_counter()
    for model_id in ("hf-clip:openai/clip-vit-base-patch32", "open_clip:ViT-B-32/laion2b_s34b_b79k"):
        with pytest.raises(ModelUnavailable, match="unreachable"):
            e.model(model_id)
    assert time.perf_counter() - t0 < 20
