"""A thread-safe LRU cache bounded by bytes (embeddings and feature maps are numpy arrays)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

import numpy as np


class LRUCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if self.max_bytes <= 0 or value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._d[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, ev = self._d.popitem(last=False)
                self._bytes -= ev.nbytes

    def __len__(self) -> int:
        return len(self._d)

    @property
    def nbytes(self) -> int:
        return self._bytes
