"""Decoding limits, crop geometry and ROI pooling: the pure functions under the embedder."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from minehead import crops, roi
from minehead.crops import CropPolicy
from minehead.core.errors import InvalidArgument, ResourceExhausted
from minehead.core.images import decode_image
from tests.conftest import jpeg_bytes, png_bytes, scene


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (decoders must refuse before allocating)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def test_decode_roundtrip_and_hash():
    px = scene()
    im = decode_image(png_bytes(px), "a.png")
    assert im.pixels.shape == (240, 320, 3) and im.pixels.dtype == np.uint8
    assert np.array_equal(im.pixels, px)
    assert len(im.sha256) == 64


@pytest.mark.parametrize("data,exc,words", [
    (b"", InvalidArgument, "empty"),
    (b"not an image at all", InvalidArgument, "not a recognised image"),
    (jpeg_bytes(scene())[:300], InvalidArgument, "corrupt or truncated"),
    (_png_claiming(20000, 20000), ResourceExhausted, "over the limit"),
])
def test_decode_rejects_bad_input(data, exc, words):
    with pytest.raises(exc, match=words):
        decode_image(data, "bad")


def test_decode_rejects_unsupported_format():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(scene(32, 32)).save(buf, format="ICO")
    with pytest.raises(InvalidArgument, match="unsupported format ICO"):
        decode_image(buf.getvalue())


def test_crop_regions_pad_and_square():
    r = crops.crop_regions(np.array([[10, 20, 110, 70]]), CropPolicy(padding_ratio=0.1))
    # 100x50 box padded by 10% a side -> 120x60, squared around the centre (60, 45) -> 120x120
    np.testing.assert_allclose(r[0], [0, -15, 120, 105])
    r = crops.crop_regions(np.array([[10, 20, 110, 70]]), CropPolicy(padding_ratio=0.1, square=False))
    np.testing.assert_allclose(r[0], [0, 15, 120, 75])


def test_crop_pixels_fills_outside_with_mean_colour():
    px = np.zeros((40, 40, 3), np.uint8)
    px[:, :] = (10, 20, 30)
    out = crops.crop_pixels(px, np.array([-20, -20, 20, 20.0]), "mean", 40)
    assert out.shape == (40, 40, 3)
    assert np.all(out == (10, 20, 30))  # the outside quarter-image is filled with the mean colour
    out0 = crops.crop_pixels(px, np.array([-20, -20, 20, 20.0]), "zero", 40)
    assert np.all(out0[0, 0] == 0) and np.all(out0[-1, -1] == (10, 20, 30))


@pytest.mark.parametrize("box,words", [
    ([5, 5, 5, 10], "zero or negative area"),
    ([5, 10, 8, 2], "zero or negative area"),
    ([400, 10, 500, 50], "outside"),
    ([-50, -50, -1, -1], "outside"),
    ([0, 0, float("nan"), 4], "non-finite"),
])
def test_validate_boxes(box, words):
    with pytest.raises(InvalidArgument, match=words):
        crops.validate_boxes(np.array([box], float), 320, 240)


def test_crop_policy_from_proto_defaults_and_bounds():
    from minehead.common.v1 import common_pb2

    p = CropPolicy.from_proto(common_pb2.CropPolicy())
    assert p == CropPolicy(padding_ratio=0.08, square=True, fill="mean", output_size=0)
    with pytest.raises(InvalidArgument, match="padding_ratio"):
        CropPolicy.from_proto(common_pb2.CropPolicy(padding_ratio=-1))


def test_prepare_image_longest_side_pad():
    px = np.full((50, 100, 3), 200, np.uint8)
    out, scale = crops.prepare_image(px, 64, "longest_side_pad", np.array([1, 2, 3], np.uint8))
    assert scale == pytest.approx(0.64)
    assert out.shape == (64, 64, 3)
    assert np.all(out[:32] == 200) and np.all(out[33:] == (1, 2, 3))


def test_roi_pooling_area_weighted():
    fmap = np.zeros((2, 4, 4), np.float32)
    fmap[0] = np.arange(16).reshape(4, 4)
    fmap[1] = 1.0
    # Exactly cell (row 1, col 2) at stride 10.
    out = roi.pool_regions(fmap, np.array([[20, 10, 30, 20]]), 10.0, (40, 40))
    np.testing.assert_allclose(out[0], [6, 1], rtol=1e-6)
    # Half of cell (1,2) and half of (1,3): the mean of 6 and 7.
    out = roi.pool_regions(fmap, np.array([[25, 10, 35, 20]]), 10.0, (40, 40))
    np.testing.assert_allclose(out[0], [6.5, 1], rtol=1e-6)
    # A box smaller than a cell still gets its cell; a box over the padding is clipped to the image.
    out = roi.pool_regions(fmap, np.array([[21, 11, 22, 12], [0, 0, 40, 40]]), 10.0, (20, 40))
    np.testing.assert_allclose(out[0], [6, 1], rtol=1e-6)
    np.testing.assert_allclose(out[1], [fmap[0, :2].mean(), 1], rtol=1e-6)
