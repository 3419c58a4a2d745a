"""minehead.locator.paste: crowded copies of labelled images for the locator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minehead.locator import paste


def scene(rng: np.random.Generator, n: int, W: int = 160, H: int = 120, cls: int = 0):
    """A flat grey image with n separate squares of colour (50 + 40 * cls, 0, 0); boxes XYXY."""
    px = np.full((H, W, 3), 128, np.uint8)
    boxes = []
    while len(boxes) < n:
        s = int(rng.integers(8, 20))
        x, y = int(rng.integers(0, W - s)), int(rng.integers(0, H - s))
        b = np.array([x, y, x + s, y + s], np.float32)
        if boxes and paste._cover(np.stack(boxes), b).max() > 0:
            continue
        px[y:y + s, x:x + s] = (50 + 40 * cls, 0, 0)
        boxes.append(b)
    return px, np.array(boxes, np.float32).reshape(-1, 4), np.full(n, cls, np.int64)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 4), target=st.integers(0, 30))
def test_a_crowded_copy_keeps_the_image_its_objects_and_hides_none(seed, n, target):
    rng = np.random.default_rng(seed)
    px, boxes, ids = scene(rng, n)
    donor = scene(rng, 3, cls=1)
    pool = paste.cutouts(*donor)
    out, b, c = paste.crowd(rng, px, boxes, ids, pool, target)
    assert out.shape == px.shape and out.dtype == np.uint8
    assert np.array_equal(b[:n], boxes) and np.array_equal(c[:n], ids)  # its own objects first, unchanged
    assert len(b) == len(c) and (len(b) <= max(target, n))
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 160).all() and (b[:, 3] <= 120).all()
    # every pasted object is a donor's, its box of a donor's size, and overlaps no earlier box
    # by more than MAX_COVER of the smaller one: no labelled object is hidden
    sizes = {tuple(np.round(d[2:] - d[:2], 3)) for d in donor[1]}
    for k in range(n, len(b)):
        assert c[k] == 1 and tuple(np.round(b[k, 2:] - b[k, :2], 3)) in sizes
        assert k == 0 or paste._cover(b[:k], b[k]).max() <= paste.MAX_COVER + 1e-6
        x0, y0, x1, y1 = np.ceil(b[k, :2]).astype(int).tolist() + np.floor(b[k, 2:]).astype(int).tolist()
        if k == len(b) - 1:  # the last paste's object shows whole, in the donor's colour
            assert (out[y0:y1, x0:x1] == (90, 0, 0)).all()


def test_a_cutout_fades_its_margin_and_leaves_the_sources_other_objects_behind():
    px = np.full((60, 80, 3), 200, np.uint8)
    boxes = np.array([[20, 20, 40, 40], [41, 20, 60, 40]], np.float32)  # two touching objects
    cut = paste.cutouts(px, boxes, np.array([0, 1]))[0]
    a = cut.alpha[..., 0]
    bx0, by0, bx1, by1 = cut.box.astype(int)
    assert (a[by0:by1, bx0:bx1] == 1).all()  # the object itself, whole
    assert a[by0 + 5, 0] < 0.5 and a[0, bx0 + 5] < 0.5  # the margin fades out
    assert (a[by0:by1, bx1 + 2:] == 0).all()  # the touching neighbour is not carried along


def test_copies_are_deterministic_and_paste_only_within_their_group():
    rng = np.random.default_rng(0)
    imgs = [scene(rng, 2, cls=k % 2) for k in range(4)]  # group = class: 0, 1, 0, 1
    load = lambda i: imgs[i][0]  # noqa: E731

    def run(seed):
        return list(paste.crowded_copies(np.random.default_rng(seed), load, [b for _, b, _ in imgs],
                                         [c for _, _, c in imgs], [k % 2 for k in range(4)], 8))

    a, b = run(3), run(3)
    assert len(a) == 8 and sorted({i for i, *_ in a}) == [0, 1, 2, 3]  # every image in turn
    for (i, px, bx, c), (j, px2, bx2, c2) in zip(a, b):
        assert i == j and np.array_equal(px, px2) and np.array_equal(bx, bx2) and np.array_equal(c, c2)
        assert set(c.tolist()) == {i % 2}  # only objects of its own group
        assert paste.CROWD_LOW * 2 <= len(c) or len(c) > 2  # crowded: more objects than it had
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, run(4)))


def test_how_many_copies():
    assert paste.copies_for(3, None) == 6 and paste.copies_for(12, None) == 24
    assert paste.copies_for(100, None) == paste.PASTE_TO  # auto: bounded encoder passes
    assert paste.copies_for(5, 0) == 0 and paste.copies_for(5, 3) == 15
    with pytest.raises(ValueError, match="0..8"):
        paste.copies_for(5, 9)
