"""Seeded torch initialisation that threads cannot interleave.

torch.manual_seed seeds one process-wide generator. Two fits that seed it and then draw their
initial weights at the same time (the locator's early-stopping and final fits run side by side,
and jobs run in threads) would each take some of the other's numbers, and a seed would no
longer decide the weights. Holding one lock from the seed to the last draw keeps them a function
of their own seed.
"""

from __future__ import annotations

import contextlib
import threading

_lock = threading.Lock()


@contextlib.contextmanager
def seeded_torch(seed: int):
    """Seed torch's default generator and keep it to this thread for the block (draw the
    initial weights inside it)."""
    import torch

    with _lock:
        torch.manual_seed(seed)
        yield
