"""minehead.locator.augment: the flipped / turned copies of few labelled images."""

from __future__ import annotations

import numpy as np
import pytest

from minehead.locator import augment


@pytest.mark.parametrize("name", augment.DIHEDRAL)
def test_each_transform_moves_the_boxes_with_the_pixels(name):
    """A box drawn into an image must come out as the tight box of the transformed drawing."""
    H, W = 30, 50  # not square: a quarter turn swaps the sides
    px = np.zeros((H, W, 3), np.uint8)
    boxes = np.array([[3, 4, 11, 9], [20, 2, 47, 28]], float)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        px[y0:y1, x0:x1, k] = 255
    out, moved = augment.apply(name, px, boxes)
    assert out.shape[:2] == ((W, H) if name in ("rot90", "rot270", "transpose", "antitranspose") else (H, W))
    for k in range(2):
        ys, xs = np.nonzero(out[:, :, k])
        assert moved[k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], (name, k)


def test_the_copies_aim_for_about_32_maps_and_stop_with_enough_images():
    assert augment.choose(2) == list(augment.DIHEDRAL)  # 2 images: all 8, 16 maps
    assert augment.choose(6) == list(augment.DIHEDRAL[:6])  # 36 maps
    assert augment.choose(10) == ["identity", "hflip", "vflip", "rot180"]
    assert augment.choose(20) == ["identity", "hflip"]
    assert augment.choose(augment.AUGMENT_TO) == ["identity"]  # enough images: no copies
    assert augment.choose(2, "none") == ["identity"]
    assert augment.choose(2, "flip") == ["identity", "hflip"]
    assert augment.choose(50, "dihedral") == list(augment.DIHEDRAL)  # asked for
    with pytest.raises(ValueError, match="auto, none, flip or dihedral"):
        augment.choose(2, "rotate")


def test_feature_maps_are_asked_for_several_at_once_and_come_back_in_order(tmp_path):
    """FeatureMapCache.get_many (the locator's originals and their copies): several
    GetFeatureMap calls open at once, so the embedder batches them, each answer in its image's
    place, and a second pass reads every map from the disk cache."""
    import threading
    import time
    import types

    from minehead.crop_embeddings import FeatureMapCache
    from minehead.locator.frame import FeatureFrame

    state = {"open": 0, "most": 0, "calls": 0}
    lock = threading.Lock()

    def feature_map(data, model_id):
        with lock:
            state["open"] += 1
            state["calls"] += 1
            state["most"] = max(state["most"], state["open"])
        time.sleep(0.05 if data[0] % 2 else 0.01)  # answers finish out of order
        with lock:
            state["open"] -= 1
        return (np.full((3, 4, 4), data[0], np.float32),
                FeatureFrame.for_image(40 + data[0], 30, 64, "longest_side_pad", 4, 4))

    embeds = types.SimpleNamespace(client=types.SimpleNamespace(feature_map=feature_map))
    model = types.SimpleNamespace(id="m", weights_sha256="w", preprocessing=types.SimpleNamespace(resize="longest_side_pad"))
    cache = FeatureMapCache(embeds, tmp_path)
    datas = [bytes([k, 7]) for k in range(9)]
    got = list(cache.get_many(iter(datas), model, in_flight=4))
    assert [int(f[0, 0, 0]) for f, _ in got] == list(range(9))
    assert [fr.image_width for _, fr in got] == [40 + k for k in range(9)]
    assert state["most"] >= 2 and state["calls"] == 9 and cache.calls == 9
    again = list(cache.get_many(iter(datas), model, in_flight=4))
    assert state["calls"] == 9 and cache.hits == 9
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, again))
