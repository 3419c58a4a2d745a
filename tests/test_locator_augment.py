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
