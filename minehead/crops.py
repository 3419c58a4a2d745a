"""Crop policy and image preparation: the one place boxes and images become encoder inputs.

Arrays at this edge:
- pixels: HxWx3 uint8, RGB.
- boxes: Nx4 float, XYXY in pixels of `pixels` (x right, y down, origin top-left).

The policy (design notes section 2): pad the box by `padding_ratio` of its size on each side,
square it around its centre, fill what falls outside the image with the crop's mean colour,
resize to the encoder's input size. The head service records the policy in meta.json and the
miner crops through this same code, so training and scoring see identical inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from minehead.common.v1 import common_pb2
from minehead.core.errors import InvalidArgument
from minehead.core.floats import user_float

DEFAULT_PADDING = 0.08
MAX_BOXES = 4096


@dataclasses.dataclass(frozen=True)
class CropPolicy:
    padding_ratio: float = DEFAULT_PADDING
    square: bool = True
    fill: str = "mean"  # "mean" | "zero"
    output_size: int = 0  # 0 = the encoder's input size

    @classmethod
    def from_proto(cls, msg: common_pb2.CropPolicy | None) -> "CropPolicy":
        if msg is None:
            return cls()
        if not np.isfinite(msg.padding_ratio) or msg.padding_ratio < 0 or msg.padding_ratio > 4:
            raise InvalidArgument(f"crop_policy.padding_ratio must be in [0, 4], got {msg.padding_ratio}")
        if msg.output_size < 0 or msg.output_size > 2048:
            raise InvalidArgument(f"crop_policy.output_size must be in [0, 2048], got {msg.output_size}")
        return cls(
            padding_ratio=user_float(msg.padding_ratio) or DEFAULT_PADDING,  # float32 field: stored as typed
            square=msg.square != common_pb2.CropPolicy.SQUARE_MODE_NONE,
            fill="zero" if msg.fill == common_pb2.CropPolicy.FILL_MODE_ZERO else "mean",
            output_size=msg.output_size,
        )

    def to_proto(self) -> common_pb2.CropPolicy:
        return common_pb2.CropPolicy(
            padding_ratio=self.padding_ratio,
            square=common_pb2.CropPolicy.SQUARE_MODE_EXPAND if self.square else common_pb2.CropPolicy.SQUARE_MODE_NONE,
            fill=common_pb2.CropPolicy.FILL_MODE_ZERO if self.fill == "zero" else common_pb2.CropPolicy.FILL_MODE_MEAN,
            output_size=self.output_size,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def key(self) -> str:
        """A stable string for cache keys."""
        return f"p{self.padding_ratio:.6g}-{'sq' if self.square else 'ns'}-{self.fill}-{self.output_size}"


def boxes_from_proto(boxes) -> np.ndarray:
    """repeated BoxXYXY -> Nx4 float64 XYXY."""
    return np.array([[b.x1, b.y1, b.x2, b.y2] for b in boxes], dtype=np.float64).reshape(-1, 4)


def validate_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    """InvalidArgument naming the first bad box: non-finite, zero/negative area, or no overlap."""
    if len(boxes) > MAX_BOXES:
        raise InvalidArgument(f"{len(boxes)} boxes in one request; the limit is {MAX_BOXES}")
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if not np.all(np.isfinite([x1, y1, x2, y2])):
            raise InvalidArgument(f"box {i} has a non-finite coordinate: ({x1}, {y1}, {x2}, {y2})")
        if x2 <= x1 or y2 <= y1:
            raise InvalidArgument(f"box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has zero or negative area (need x2 > x1 and y2 > y1)")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise InvalidArgument(f"box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image")


def crop_regions(boxes: np.ndarray, policy: CropPolicy) -> np.ndarray:
    """Nx4 XYXY boxes -> Nx4 XYXY regions after padding and squaring (may leave the image)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    pw = w * (1 + 2 * policy.padding_ratio)
    ph = h * (1 + 2 * policy.padding_ratio)
    if policy.square:
        pw = ph = np.maximum(pw, ph)
    return np.stack([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], axis=1)


def crop_pixels(pixels: np.ndarray, region: np.ndarray, fill: str, out_size: int) -> np.ndarray:
    """Cut `region` (XYXY, may exceed the image) out of HxWx3 `pixels`, fill the outside, and
    resize to out_size x out_size. Returns out_size x out_size x 3 uint8."""
    H, W = pixels.shape[:2]
    x1, y1, x2, y2 = region
    # Integer canvas covering the region; at least 1 px.
    ix1, iy1 = int(np.floor(x1)), int(np.floor(y1))
    ix2, iy2 = max(int(np.ceil(x2)), ix1 + 1), max(int(np.ceil(y2)), iy1 + 1)
    sx1, sy1, sx2, sy2 = max(ix1, 0), max(iy1, 0), min(ix2, W), min(iy2, H)
    inside = pixels[sy1:sy2, sx1:sx2]
    if fill == "mean" and inside.size:
        colour = inside.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    else:
        colour = np.zeros(3, np.uint8)
    if (ix1, iy1, ix2, iy2) == (sx1, sy1, sx2, sy2):
        canvas = inside
    else:
        canvas = np.empty((iy2 - iy1, ix2 - ix1, 3), np.uint8)
        canvas[:] = colour
        canvas[sy1 - iy1:sy2 - iy1, sx1 - ix1:sx2 - ix1] = inside
    return resize(canvas, out_size, out_size)


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return np.ascontiguousarray(pixels)
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def input_scale(width: int, height: int, input_size: int, resize_mode: str) -> float:
    """Image pixels -> input pixels for prepare_image's resize (for "squash", the x axis's)."""
    return input_size / (width if resize_mode == "squash" else max(height, width))


def prepare_image(pixels: np.ndarray, input_size: int, resize_mode: str, pad_value: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """A whole image -> input_size x input_size x 3 uint8, and the scale from image pixels to
    input pixels.

    "squash": stretch to the square (scale is only meaningful per axis; returned for x).
    "longest_side_pad": resize the longest side to input_size, pad bottom-right with
    `pad_value` (the normalisation mean, so padding is zero after normalising, as SAM does).
    """
    H, W = pixels.shape[:2]
    if resize_mode == "squash":
        return resize(pixels, input_size, input_size), input_scale(W, H, input_size, resize_mode)
    if resize_mode != "longest_side_pad":
        raise ValueError(f"unknown resize mode {resize_mode!r}")
    scale = input_scale(W, H, input_size, resize_mode)
    nw, nh = max(1, int(round(W * scale))), max(1, int(round(H * scale)))
    out = np.empty((input_size, input_size, 3), np.uint8)
    out[:] = pad_value if pad_value is not None else 0
    out[:nh, :nw] = resize(pixels, nw, nh)
    return out, scale
