"""Reading the .npz caches (crop embeddings, feature maps, detections) from many threads.

np.load parses each array's header with ast.literal_eval, and CPython 3.11's AST constructor
keeps its recursion depth in state that all threads share: two parses at once can fail with
"SystemError: AST constructor recursion depth mismatch" (python/cpython#106905). It failed a
training's FeatureMapCache.get_many once in this suite, its threads reading cached maps side by
side. So every cache read goes through one lock: a read is milliseconds, the work around it is not.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

_LOCK = threading.Lock()


def load_arrays(path: Path, *names: str) -> tuple[np.ndarray, ...]:
    """The arrays `names` of the .npz file at path (never unpickled), read under one lock."""
    with _LOCK, np.load(path, allow_pickle=False) as z:
        return tuple(z[n] for n in names)
