"""Numbers read from float proto fields, as the user entered them.

`float` in a proto is float32: 0.1 arrives as 0.10000000149011612 once widened to a Python
float, and that noise then lands in meta.json, mining settings and run summaries. Every value
a user typed is read back through `user_float`, the shortest decimal that round-trips the
float32 (what the user most likely typed), so 0.1 is stored as 0.1.
"""

from __future__ import annotations

import numpy as np


def user_float(v: float) -> float:
    """The shortest decimal that reads back as the same float32: user_float(np.float32(0.1)) == 0.1.
    Non-finite values pass through (validation reports them)."""
    f = np.float32(v)
    if not np.isfinite(f):
        return float(f)
    return float(np.format_float_positional(f, unique=True, trim="-"))
